#!/usr/bin/env bash
# Set up, then run the whole test suite (real ORT, real MLflow on temp SQLite, real Prefect flows).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
