#!/usr/bin/env bash
# The main job, end to end on a fresh machine: set up, build a real Qwen2-architecture model
# locally (no hub needed), reshard it into a serving directory, verify every byte.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
WORK="${PREWARM_DEMO_DIR:-$(mktemp -d /tmp/prewarm-demo.XXXXXX)}"
echo "== building a small Qwen2 checkpoint (random weights, 4 shards) in $WORK/checkpoint"
.venv/bin/python -c 'import sys; from pathlib import Path; from prewarm.synthetic import build_tiny_qwen2; build_tiny_qwen2(Path(sys.argv[1]))' "$WORK/checkpoint" >/dev/null 2>&1
echo "== prewarm reshard (at most 1.5MB a shard, to show the split)"
.venv/bin/prewarm reshard "$WORK/checkpoint" "$WORK/serving" --max-shard-size 1.5MB
echo "== prewarm verify"
.venv/bin/prewarm verify "$WORK/serving"
echo "== prewarm evict, then status: nothing in the page cache"
.venv/bin/prewarm evict "$WORK/serving"
.venv/bin/prewarm status "$WORK/serving"
echo "== prewarm warm, then status: everything resident"
.venv/bin/prewarm warm "$WORK/serving"
.venv/bin/prewarm status "$WORK/serving"
echo "== the serving directory: $WORK/serving"
ls -l "$WORK/serving"
