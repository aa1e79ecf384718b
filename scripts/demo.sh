#!/usr/bin/env bash
# The main job on a fresh machine: set up, run `prewarm daemon` on a model, ask it through its
# Unix socket (curl, `prewarm ask`, the openai package), show where the start-up time went, stop.
#
#   ./scripts/demo.sh                                      # a small real Qwen2 model built here (random weights: noise)
#   ./scripts/demo.sh --model Qwen/Qwen2.5-7B-Instruct     # the real thing, on a GPU host
#   ./scripts/demo.sh --keep                               # leave the daemon running afterwards
set -euo pipefail
cd "$(dirname "$0")/.."
KEEP=0
MODEL=""
while [ $# -gt 0 ]; do
  case "$1" in
    --keep) KEEP=1 ;;
    --model) MODEL="${2:?--model needs a hub repo id or a directory}"; shift ;;
    *) echo "usage: $0 [--keep] [--model REPO_OR_DIR]" >&2; exit 2 ;;
  esac
  shift
done
./scripts/setup.sh demo
WORK="${PREWARM_DEMO_DIR:-$(mktemp -d /tmp/prewarm-demo.XXXXXX)}"
SOCK="$WORK/api.sock"
export PREWARM_CACHE="$WORK/cache" RUNTIME_DIRECTORY="$WORK"
PY=.venv/bin/python
if [ -z "$MODEL" ]; then
  MODEL="$WORK/checkpoint"
  echo "== building a small Qwen2-architecture checkpoint in $MODEL (random weights: its answers are noise)"
  $PY -c 'import sys; from pathlib import Path; from prewarm.synthetic import build_tiny_qwen2; build_tiny_qwen2(Path(sys.argv[1]))' "$MODEL" >/dev/null 2>&1
fi
echo "== prewarm daemon --model $MODEL --socket $SOCK"
echo "   (log: $WORK/daemon.log)"
.venv/bin/prewarm daemon --model "$MODEL" --socket "$SOCK" >"$WORK/daemon.log" 2>&1 &
DAEMON=$!
stop() { if [ "$KEEP" = 0 ]; then kill -TERM "$DAEMON" 2>/dev/null && wait "$DAEMON" || true; fi; }
trap stop EXIT
until [ -S "$SOCK" ]; do
  sleep 0.05
  kill -0 "$DAEMON" 2>/dev/null || { echo "the daemon stopped; its log:"; tail -20 "$WORK/daemon.log"; exit 1; }
done
echo "== the socket is there at once; requests sent now wait until the engine is hot"
status() { curl -s --unix-socket "$SOCK" http://prewarm/prewarm/status; }
field() { $PY -c 'import json, sys; s = json.load(sys.stdin); print(eval(sys.argv[1], {}, {"s": s}))' "$1"; }
state=""
started=$(date +%s.%N)
while [ "$state" != "ready" ]; do
  new=$(status | field 's["state"]')
  [ "$new" != "$state" ] && awk -v a="$started" -v b="$(date +%s.%N)" -v s="$new" 'BEGIN { printf "   %6.1f s  state: %s\n", b - a, s }'
  state=$new
  [ "$state" = failed ] && { status | field 's["failure"]["reason"]'; exit 1; }
  kill -0 "$DAEMON" 2>/dev/null || { echo "the daemon stopped; its log:"; tail -20 "$WORK/daemon.log"; exit 1; }
  sleep 0.5
done
NAME=$(status | field 's["model"]["served_name"]')
echo "== where the start-up time went (GET /prewarm/status)"
status | $PY -c '
import json, sys
s = json.load(sys.stdin)
for p in s["phases"]:
    print("   %-13s %8.2f s" % (p["name"], p["seconds"]))
print("   engine pid %s, serving %s as %r" % (s["engine"]["pid"], s["model"]["serving_dir"], s["model"]["served_name"]))'
BODY=$($PY -c 'import json, sys; print(json.dumps({"model": sys.argv[1], "messages": [{"role": "user", "content": "Say hello in three languages."}], "max_tokens": 24, "stream": True}))' "$NAME")
echo "== a streamed answer through the socket with curl"
curl -sN --unix-socket "$SOCK" http://prewarm/v1/chat/completions -H 'content-type: application/json' -d "$BODY" |
  $PY -c '
import json, sys, time
start, first = time.perf_counter(), None
for line in sys.stdin:
    if line.startswith("data: {"):
        delta = json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
        first = first or time.perf_counter()
        print(delta if delta.isprintable() else delta.encode("unicode_escape").decode(), end="", flush=True)
print("\n   (first token after %.3f s, all in %.3f s)" % ((first or start) - start, time.perf_counter() - start))'
echo "== the same with prewarm ask"
.venv/bin/prewarm ask --socket "$SOCK" --max-tokens 24 "Say hello in three languages."
echo
echo "== the same from Python: the openai package, over the handoff socket (the daemon steps out of the data path)"
$PY - "$SOCK" "$NAME" <<'EOF'
import sys, time, httpx, openai
from prewarm.client import PrewarmTransport
http = httpx.Client(transport=PrewarmTransport(sys.argv[1]), trust_env=False)
ai = openai.OpenAI(base_url="http://prewarm/v1", api_key="unused", http_client=http)
start = time.perf_counter()
answer = ai.chat.completions.create(model=sys.argv[2], messages=[{"role": "user", "content": "Say hello in three languages."}], max_tokens=24)
print(f"   {answer.choices[0].message.content!r} ({time.perf_counter() - start:.3f} s)")
EOF
cat <<EOF
== try it yourself
   .venv/bin/prewarm ask --socket $SOCK "Hello!"
   .venv/bin/prewarm status --socket $SOCK
   curl --unix-socket $SOCK http://prewarm/v1/chat/completions -H 'content-type: application/json' \\
        -d '{"model": "$NAME", "messages": [{"role": "user", "content": "Hello!"}]}'
   .venv/bin/python -c '
import httpx, openai
from prewarm.client import PrewarmTransport
ai = openai.OpenAI(base_url="http://prewarm/v1", api_key="unused",
                   http_client=httpx.Client(transport=PrewarmTransport("$SOCK"), trust_env=False))
print(ai.chat.completions.create(model="$NAME", messages=[{"role": "user", "content": "Hello!"}]).choices[0].message.content)'
EOF
if [ "$KEEP" = 1 ]; then
  trap - EXIT
  echo "== the daemon keeps running (pid $DAEMON, log $WORK/daemon.log); stop it with: kill $DAEMON"
else
  echo "== stopping the daemon (SIGTERM); run with --keep to leave it running"
fi
