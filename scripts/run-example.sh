#!/usr/bin/env bash
# The main job: set up, then run the example pipeline on the embedded default
# (MLflow: ./mlflow.db + ./mlruns/ in the repo root; Prefect: ephemeral, no server).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PREFECT_SERVER_ANALYTICS_ENABLED="${PREFECT_SERVER_ANALYTICS_ENABLED:-false}"
exec .venv/bin/int8flow run "${1:-pipelines/minilm-int8.yaml}"
