#!/usr/bin/env bash
# What the hardening of issue 7 costs: the same commands, before (BASE, a commit) and after (this
# tree), side by side under hyperfine on one synthetic Qwen2.5-7B-shaped checkpoint.
#   bench/bench_hardening.sh [BASE_COMMIT] [SCALE]     (defaults: 9b7b283, 0.25 = 1.6 GB)
set -euo pipefail
cd "$(dirname "$0")/.."
BASE="${1:-9b7b283}"
SCALE="${2:-0.25}"
WORK="$(mktemp -d /tmp/prewarm-bench-hardening.XXXXXX)"
trap 'rm -rf "$WORK"; git worktree remove --force "$WORK/base" 2>/dev/null || true' EXIT
git worktree add --detach "$WORK/base" "$BASE" >/dev/null 2>&1
PY="$PWD/.venv/bin/python"
OLD="env PYTHONPATH=$WORK/base $PY -m prewarm -q"
NEW="env PYTHONPATH=$PWD $PY -m prewarm -q"
$PY -c 'import sys; from pathlib import Path; from prewarm.synthetic import write_qwen25_7b_like; write_qwen25_7b_like(Path(sys.argv[1]), scale=float(sys.argv[2]))' "$WORK/src" "$SCALE"
$NEW reshard "$WORK/src" "$WORK/served" >/dev/null
$NEW verify "$WORK/served" >/dev/null
du -sh "$WORK/src" "$WORK/served"
H="hyperfine --style basic"
echo "## reshard (5GB shards, fsync included)"
$H --runs 3 --prepare "rm -rf $WORK/dst" -n before "$OLD reshard $WORK/src $WORK/dst" -n after "$NEW reshard $WORK/src $WORK/dst"
echo "## verify, page cache warm"
$H --warmup 1 --runs 8 -n before "$OLD verify $WORK/served" -n after "$NEW verify $WORK/served"
echo "## warm from a cold cache (evicted before each run)"
$H --runs 5 --prepare "$NEW evict $WORK/served" -n before "$OLD warm $WORK/served" -n after "$NEW warm $WORK/served"
echo "## warm when everything is resident"
$H --warmup 1 --runs 10 -n before "$OLD warm $WORK/served" -n after "$NEW warm $WORK/served"
echo "## status"
$H --warmup 2 --runs 20 -n before "$OLD status $WORK/served" -n after "$NEW status $WORK/served"
echo "## manifest (hash every file, page cache warm)"
$H --warmup 1 --runs 5 -n before "$OLD manifest $WORK/served" -n after "$NEW manifest $WORK/served"
