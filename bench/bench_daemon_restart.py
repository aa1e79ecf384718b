"""How soon a (re)started `prewarm daemon` accepts clients: process start to its socket bound.

    .venv/bin/python bench/bench_daemon_restart.py MODEL_DIR [--runs 5]

The daemon binds its sockets before any slow work, so this is Python start-up plus imports; each
daemon is stopped with SIGTERM right after (its engine start is interrupted).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    prewarm = Path(sys.executable).with_name("prewarm")
    times = []
    for _ in range(args.runs):
        work = Path(tempfile.mkdtemp(prefix="pwr-", dir="/tmp"))
        env = {**os.environ, "RUNTIME_DIRECTORY": str(work), "PREWARM_CACHE": str(work / "cache")}
        started = time.perf_counter()
        cmd = [str(prewarm), "daemon", "--model", args.model, "--socket", str(work / "s.sock")]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not (work / "s.sock").exists():
            time.sleep(0.002)
        times.append(time.perf_counter() - started)
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    print("start to socket bound (s):", " ".join(f"{t:.3f}" for t in times), f"median {statistics.median(times):.3f}")
    print("target: well under a second:", "met" if statistics.median(times) < 1 else "missed")


if __name__ == "__main__":
    main()
