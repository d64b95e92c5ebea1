#!/usr/bin/env bash
# Lint (ruff), format (ruff format) and types (mypy), as CI runs them; needs `bash scripts/setup.sh` first.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
