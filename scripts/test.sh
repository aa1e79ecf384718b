#!/usr/bin/env bash
# Set up, then run the linters and the whole test suite (what CI runs through .ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/ruff check prewarm tests bench
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
