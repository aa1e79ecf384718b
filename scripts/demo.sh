#!/usr/bin/env bash
# The main job on a fresh machine: set up, build a small real Qwen2-architecture model (random
# weights: its answers are noise), run `prewarm daemon` on it, ask it something through its Unix
# socket, show where the start-up time went, stop. `--keep` leaves the daemon running.
set -euo pipefail
cd "$(dirname "$0")/.."
KEEP=0
[ "${1:-}" = "--keep" ] && KEEP=1
./scripts/setup.sh
WORK="${PREWARM_DEMO_DIR:-$(mktemp -d /tmp/prewarm-demo.XXXXXX)}"
SOCK="$WORK/api.sock"
export PREWARM_CACHE="$WORK/cache" RUNTIME_DIRECTORY="$WORK"
echo "== building a small Qwen2 checkpoint (random weights) in $WORK/checkpoint"
.venv/bin/python -c 'import sys; from pathlib import Path; from prewarm.synthetic import build_tiny_qwen2; build_tiny_qwen2(Path(sys.argv[1]))' "$WORK/checkpoint" >/dev/null 2>&1
echo "== prewarm daemon --model $WORK/checkpoint --socket $SOCK   (log: $WORK/daemon.log)"
.venv/bin/prewarm daemon --model "$WORK/checkpoint" --socket "$SOCK" >"$WORK/daemon.log" 2>&1 &
DAEMON=$!
stop() { if [ "$KEEP" = 0 ]; then kill -TERM "$DAEMON" 2>/dev/null && wait "$DAEMON" || true; fi; }
trap stop EXIT
until [ -S "$SOCK" ]; do sleep 0.1; done
echo "== the socket answers at once; a request sent now waits until the engine is hot"
state=""
while [ "$state" != "ready" ]; do
  sleep 2
  new=$(curl -s --unix-socket "$SOCK" http://prewarm/prewarm/status | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["state"])')
  [ "$new" != "$state" ] && echo "   state: $new"
  state=$new
  kill -0 "$DAEMON" 2>/dev/null || { echo "the daemon stopped; its log:"; tail -20 "$WORK/daemon.log"; exit 1; }
done
echo "== where the time went (GET /prewarm/status)"
curl -s --unix-socket "$SOCK" http://prewarm/prewarm/status | .venv/bin/python -c '
import json, sys
s = json.load(sys.stdin)
for p in s["phases"]:
    print("   %-13s %8.2f s" % (p["name"], p["seconds"]))
print("   engine pid %s, serving %s" % (s["engine"]["pid"], s["model"]["serving_dir"]))'
echo "== a streamed answer through the socket (noise: the weights are random)"
curl -sN --unix-socket "$SOCK" http://prewarm/v1/chat/completions -H 'content-type: application/json' \
  -d '{"model": "checkpoint", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16, "stream": true}' |
  .venv/bin/python -c '
import json, sys, time
start = time.perf_counter()
for line in sys.stdin:
    if line.startswith("data: {"):
        delta = json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
        print(repr(delta), end=" ", flush=True)
print("\n   (%.3f s)" % (time.perf_counter() - start))'
echo "== the same from Python, with the openai package over the handoff socket"
.venv/bin/python - "$SOCK" <<'EOF'
import sys, time, httpx, openai
from prewarm.client import PrewarmTransport
http = httpx.Client(transport=PrewarmTransport(sys.argv[1]), trust_env=False)
ai = openai.OpenAI(base_url="http://prewarm/v1", api_key="unused", http_client=http)
start = time.perf_counter()
answer = ai.chat.completions.create(model="checkpoint", messages=[{"role": "user", "content": "Hello!"}], max_tokens=16)
print(f"   {answer.choices[0].message.content!r} ({time.perf_counter() - start:.3f} s)")
EOF
echo "== try it yourself:"
echo "   curl --unix-socket $SOCK http://prewarm/v1/models"
if [ "$KEEP" = 1 ]; then
  echo "== the daemon keeps running (pid $DAEMON); stop it with: kill $DAEMON"
else
  echo "== stopping the daemon (SIGTERM); run with --keep to leave it running"
fi
