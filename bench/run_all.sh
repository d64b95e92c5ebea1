#!/usr/bin/env bash
# Every number in docs/benchmarks.md: both flagships through the pipeline (wall time and peak RSS of
# `int8flow run`), then compared side by side with FP32 and plain ORT defaults (and, for MiniLM, where
# the time goes by op type), then the pipeline's overhead against a bare script, calibration memory
# against the number of samples, and the development set.
#   bash bench/run_all.sh > /tmp/benchmarks.md
set -euo pipefail
cd "$(dirname "$0")/.."
export PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true PREFECT_LOGGING_LEVEL=ERROR
PY=.venv/bin/python
store="$(mktemp -d)"
export MLFLOW_TRACKING_URI="sqlite:///$store/mlflow.db" PREFECT_HOME="$store/prefect"
flags=$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx2|fma|f16c|avx512f|avx512bw|avx512_vnni|avx_vnni|amx_int8|amx_bf16)$' | tr '\n' ' ')
echo "Machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores, flags: ${flags}; onnxruntime $($PY -c 'import onnxruntime; print(onnxruntime.__version__)'); $(date -u +%F)"
echo
for spec in pipelines/minilm-int8.yaml pipelines/mnist-cnn-int8.yaml; do
  watched=$( (cd "$store" && "$OLDPWD/$PY" "$OLDPWD/bench/watch_rss.py" "$store/watch-$(basename "$spec" .yaml)" -- "$OLDPWD/.venv/bin/int8flow" run "$OLDPWD/$spec") )
  echo "\`int8flow run $spec\` (fresh embedded store, ephemeral Prefect): $watched"
  echo
  ops=""; [ "$spec" = pipelines/minilm-int8.yaml ] && ops="--ops"
  $PY bench/compare.py "$spec" --runs 40 --runs-b32 6 $ops 2>/dev/null
  echo
done
$PY bench/overhead.py pipelines/mnist-cnn-int8.yaml --repeats 3 2>/dev/null
$PY bench/overhead.py pipelines/mnist-cnn-int8.yaml --repeats 3 --local-server 2>/dev/null | tail -1
$PY bench/overhead.py pipelines/minilm-int8.yaml --repeats 2 2>/dev/null | tail -1
$PY bench/overhead.py pipelines/minilm-int8.yaml --repeats 2 --local-server 2>/dev/null | tail -1
echo
$PY bench/calibration_memory.py --samples 100 2000 --methods minmax percentile --ort 100 2000 2>/dev/null
echo
$PY bench/calibration_memory.py --model minilm --samples 128 --methods minmax percentile --ort 128 2>/dev/null
echo
$PY bench/devset.py 2>/dev/null
