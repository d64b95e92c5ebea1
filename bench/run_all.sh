#!/usr/bin/env bash
# Every number in docs/benchmarks.md: both flagships through the pipeline, then compared side by side
# with FP32 and plain ORT defaults, then the pipeline's overhead against a bare script.
#   bash bench/run_all.sh > /tmp/benchmarks.md
set -euo pipefail
cd "$(dirname "$0")/.."
export PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true PREFECT_LOGGING_LEVEL=ERROR
PY=.venv/bin/python
store="$(mktemp -d)"
export MLFLOW_TRACKING_URI="sqlite:///$store/mlflow.db" PREFECT_HOME="$store/prefect"
echo "Machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; onnxruntime $($PY -c 'import onnxruntime; print(onnxruntime.__version__)'); $(date -u +%F)"
echo
for spec in pipelines/minilm-int8.yaml pipelines/mnist-cnn-int8.yaml; do
  (cd "$store" && "$OLDPWD/.venv/bin/int8flow" run "$OLDPWD/$spec" >/dev/null 2>&1)
  $PY bench/compare.py "$spec" --runs 40 --runs-b32 6 2>/dev/null
  echo
done
$PY bench/overhead.py pipelines/mnist-cnn-int8.yaml --repeats 3 2>/dev/null
$PY bench/overhead.py pipelines/minilm-int8.yaml --repeats 2 2>/dev/null | tail -1
