#!/usr/bin/env bash
# Create .venv (Python 3.11) and install int8flow with what the examples and tests need. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip >/dev/null
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test,examples,flagships,servers,dask,dev]"
# Debian packages the tests use: qemu-user runs the kernel-dependent tests again on an emulated AVX2-only
# CPU (tests/test_cpu_kinds.py); chromium checks the MLflow UI in a real browser (tests/test_review_ui.py).
# Optional: without them (no root, no apt) those tests say they were skipped.
debian_package() {  # command, package
  command -v "$1" >/dev/null && return 0
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || { echo "setup: $2 not installed (its tests will be skipped)" >&2; return 0; }
  apt-get install -y -qq "$2" >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq "$2" >/dev/null 2>&1; } ||
    echo "setup: $2 not installed (its tests will be skipped)" >&2
}
debian_package qemu-x86_64 qemu-user
debian_package chromium chromium
