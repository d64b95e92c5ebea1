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
# Debian's qemu-user: the tests run the kernel-dependent tests again on an emulated AVX2-only CPU
# (tests/test_cpu_kinds.py). Optional: without it (no root, no apt) those tests say they were skipped.
if ! command -v qemu-x86_64 >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get install -y -qq qemu-user >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq qemu-user >/dev/null 2>&1; } || echo "setup: qemu-user not installed (emulated-CPU tests will be skipped)" >&2
fi
