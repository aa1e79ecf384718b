"""Benchmark `prewarm fetch` against huggingface_hub's snapshot_download, both from a hub on loopback.

No machine here reaches the real hub, so both clients download from tests/hubserver.py (the
server the tests use, speaking the hub's protocol) serving a synthetic checkpoint with
Qwen2.5-7B's names, shapes and dtype. Steps: a cold fetch, a second run with every file present
(target: well under a second whatever the model's size), an offline run, and the same first and
second runs through ``snapshot_download(local_dir=...)``.

    .venv/bin/python bench/bench_fetch.py --scale 1.0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import (
    REPO,
    Step,
    check_target,
    dir_bytes,
    log,
    machine_info,
    markdown_table,
    measure,
    prewarm_command,
    remove,
    sync,
    write_synthetic,
)

from tests.hubserver import Hub, _digests

REPO_ID = "Qwen/Qwen2.5-7B-Synthetic"
COMMIT = "c0ffee" + "0" * 34
SNAPSHOT_CODE = (
    "import sys; from huggingface_hub import snapshot_download; "
    "snapshot_download(sys.argv[1], local_dir=sys.argv[2], allow_patterns=['*.safetensors', '*.json'])"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--workdir", type=Path, default=REPO / "bench-data")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    work = args.workdir / f"fetch-scale{args.scale:g}"
    remove(work)
    work.mkdir(parents=True)
    src = work / "src"
    log(f"writing the synthetic checkpoint (scale {args.scale:g}) to {src}")
    write_synthetic(src, args.scale)
    total = dir_bytes(src)
    hub = Hub()
    hub.add_commit(REPO_ID, src, COMMIT, by_path=True)
    log(f"hashing {total / 1e9:.2f} GB once for the server's model info (sha256, git blob ids)")
    for content in hub.repos[REPO_ID].commits[COMMIT].values():
        _digests(content)
    hub.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {"HF_ENDPOINT": hub.url, "HF_HOME": str(work / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    try:
        steps = run_steps(work, env, total)
    finally:
        hub.stop()
    report(args, steps, total, work)
    if not args.keep:
        remove(work)


def run_steps(work: Path, env: dict[str, str], total: int) -> dict[str, Step]:
    fetch = [*prewarm_command(), "-q", "fetch", REPO_ID, "--dest", str(work / "prewarm"), "--json"]
    snapshot = [sys.executable, "-c", SNAPSHOT_CODE, REPO_ID, str(work / "hf")]
    plan = [
        ("prewarm fetch (cold)", fetch, env, total),
        ("prewarm fetch (all present)", fetch, env, 0),
        ("prewarm fetch (HF_HUB_OFFLINE=1)", fetch, env | {"HF_HUB_OFFLINE": "1"}, 0),
        ("snapshot_download (cold)", snapshot, env, total),
        ("snapshot_download (all present)", snapshot, env, 0),
    ]
    steps = {}
    for name, cmd, step_env, nbytes in plan:
        sync()
        run = measure(cmd, timeout=3600, env=step_env)
        if run.ok and cmd is fetch:
            run.extra["own_seconds"] = json.loads(run.stdout)["seconds"]
        steps[name] = Step(name, nbytes, [run])
        own = f" (own timer {run.extra['own_seconds']:.2f} s)" if "own_seconds" in run.extra else ""
        log(f"  {name}: {run.wall_s:.2f} s{own}, {run.maxrss_kib / 1024:.1f} MiB" if run.ok else run.failure())
    return steps


def report(args: argparse.Namespace, steps: dict[str, Step], total: int, work: Path) -> None:
    present = steps["prewarm fetch (all present)"]
    targets = [check_target("second run with everything present < 1 s (wall)", present.wall, 1.0, False, " s", "the run failed")]
    rows = [["step", "wall s", "GB/s", "peak RSS MB"]]
    for step in steps.values():
        rows.append(
            [
                step.name,
                f"{step.wall:.2f}" if step.wall else step.failed.failure() if step.failed else "-",
                f"{step.gbps:.2f}" if step.gbps and step.bytes else "-",
                f"{step.rss_mb:.1f}" if step.rss_mb else "-",
            ]
        )
    machine = machine_info(work)
    result: dict[str, Any] = {
        "scale": args.scale,
        "bytes": total,
        "machine": machine,
        "steps": [s.summary() for s in steps.values()],
        "targets": targets,
    }
    table = markdown_table(rows, right=(1, 2, 3))
    text = f"{total / 1e9:.2f} GB synthetic checkpoint, served from loopback\n\n{table}\n\n" + "\n".join(
        f"{t['status']:<5} {t['target']}: {t['detail']}" for t in targets
    )
    print(text, file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
