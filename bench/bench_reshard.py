#!/usr/bin/env python3
"""Benchmark ``prewarm reshard`` and ``prewarm verify`` against the alternatives (issue 2).

On a synthetic checkpoint with Qwen2.5-7B's tensor names, shapes and dtype (random bytes,
~15.2 GB in 4 shards at ``--scale 1``), in one run on one machine, this measures wall time and
peak RSS of:

1. ``prewarm reshard SRC DST`` (default 5GB limit), as a subprocess;
2. ``cp -r SRC DST`` followed by ``sync`` of the copied files (the copy floor);
3. transformers ``from_pretrained`` + ``save_pretrained(max_shard_size="5GB")``, as a subprocess;
4. ``prewarm verify`` on the warm output, and ``sha256sum`` / ``b3sum`` over the same files.

How things are measured:

- wall time: ``time.perf_counter()`` around each child, from ``Popen`` to its reaping;
- peak RSS: ``os.wait4(pid)`` on the child. Linux returns the child's own rusage merged with
  that of every descendant it waited for, and ``ru_maxrss`` is merged as a *max* (not a sum).
  So for ``bash -c "cp -r ... && sync ..."`` it is the largest of bash, cp and sync. It counts
  resident file-backed pages a process maps (e.g. safetensors' mmap in transformers) but not
  the page cache a process fills through read()/write(). MB here are 10**6 bytes.
- ``sync`` runs (untimed) before every timed run; before each of steps 1-3 the source is read
  once (untimed) so every contender starts with it as cached as memory allows;
- before step 4 the source is dropped from the page cache (posix_fadvise DONTNEED; the files
  stay) and the output is read once by an untimed ``prewarm verify``, so the timed runs hash a
  warm page cache; residency is checked with ``fincore`` when it is installed.

With ``--repeat N`` each of steps 1-3 runs N times, the order rotating each round (on a VM
the step right after a large write - the source generation included - can be slowed by the
host still flushing it), and each of step 4 N times; the table shows the *median* wall time
(min-max) and the *largest* peak RSS of the N runs (all runs are in ``--json``). A missed target is a result,
not an error: the exit code is 0 unless the benchmark itself could not run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import (
    GB,
    MB,
    REPO,
    Run,
    Step,
    add_common_options,
    cached_fraction,
    check_target,
    dir_bytes,
    dir_files,
    drop_from_cache,
    log,
    machine_info,
    measure,
    parse_common,
    prewarm_command,
    print_targets_and_notes,
    read_through,
    remove,
    run_and_report,
    sync,
    write_synthetic,
)

# Targets from the issue.
RESHARD_VS_CP_MAX = 1.25
RESHARD_VS_TRANSFORMERS_MIN = 3.0
RESHARD_RSS_MAX_MB = 300.0
VERIFY_MIN_GBPS = 3.0

TRANSFORMERS_SNIPPET = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
from transformers import AutoModelForCausalLM
t1 = time.perf_counter()

def mem():
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                fields[key + "_kib"] = int(value.split()[0])
    return fields

model = AutoModelForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.bfloat16)
t2 = time.perf_counter()
after_load = mem()
model.save_pretrained(sys.argv[2], max_shard_size="5GB")
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "save_s": t3 - t2,
                  "after_load": after_load, "after_save": mem()}))
"""


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workdir: Path = args.workdir.resolve()
        self.src = self.workdir / f"src-scale{args.scale:g}"
        self.out_prewarm = self.workdir / "out-prewarm"
        self.out_cp = self.workdir / "out-cp"
        self.out_tf = self.workdir / "out-transformers"
        self.steps: dict[str, Step] = {}
        self.notes: list[str] = []
        self.cache: dict[str, float | None] = {}
        self.machine: dict[str, Any] = {}
        self.src_bytes = 0
        self.prewarm = prewarm_command()

    # -- setup ---------------------------------------------------------------------------------

    def prepare(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for stale in (self.out_prewarm, self.out_cp, self.out_tf):
            remove(stale)
        marker = self.workdir / f"{self.src.name}.json"
        if self.src.is_dir() and marker.exists() and json.loads(marker.read_text()).get("scale") == self.args.scale:
            log(f"reusing source {self.src} ({dir_bytes(self.src) / GB:.2f} GB)")
        else:
            remove(self.src)
            remove(marker)
            log(f"writing synthetic Qwen2.5-7B-like checkpoint (scale {self.args.scale:g}) to {self.src}")
            started = time.perf_counter()
            write_synthetic(self.src, self.args.scale)
            marker.write_text(json.dumps({"scale": self.args.scale}))
            log(f"  {dir_bytes(self.src) / GB:.2f} GB in {time.perf_counter() - started:.1f} s")
        self.src_bytes = dir_bytes(self.src)
        free = shutil.disk_usage(self.workdir).free
        needed = 2 * self.src_bytes + 512 * MB  # the kept prewarm output plus one other output
        if free < needed:
            raise SystemExit(
                f"not enough free space in {self.workdir}: {free / GB:.1f} GB free, "
                f"{needed / GB:.1f} GB needed besides the source"
            )

    def before_timed_run(self, warm_source: bool = True) -> None:
        if warm_source:
            read_through(dir_files(self.src))
        sync()

    # -- steps ---------------------------------------------------------------------------------

    def step(self, name: str, nbytes: int) -> Step:
        return self.steps.setdefault(name, Step(name, nbytes))

    def run_cp(self, i: int) -> None:
        step = self.step("cp", self.src_bytes)
        remove(self.out_cp)
        self.before_timed_run()
        self.cache.setdefault("source_cached_before_cp", cached_fraction(dir_files(self.src)))
        script = 'set -e; cp -r "$1" "$2"; sync -- "$2"/* "$2" "$(dirname "$2")"'
        run = measure(["bash", "-c", script, "bench-cp", str(self.src), str(self.out_cp)])
        step.runs.append(run)
        log(
            f"  cp -r + sync #{i + 1}: {run.wall_s:.2f} s, {run.maxrss_kib / 1024:.1f} MiB"
            + ("" if run.ok else f" FAILED: {run.failure()}")
        )
        remove(self.out_cp)

    def run_reshard(self, i: int) -> None:
        step = self.step("reshard", self.src_bytes)
        remove(self.out_prewarm)
        self.before_timed_run()
        self.cache.setdefault("source_cached_before_reshard", cached_fraction(dir_files(self.src)))
        run = measure([*self.prewarm, "reshard", str(self.src), str(self.out_prewarm), "--json"])
        with contextlib.suppress(ValueError):
            result = json.loads(run.stdout)
            run.extra.update(timings=result["timings"], shards=result["shards"])
        step.runs.append(run)
        t = run.extra.get("timings", {})
        log(
            f"  prewarm reshard #{i + 1}: {run.wall_s:.2f} s, {run.maxrss_kib / 1024:.1f} MiB "
            f"(internal: plan {t.get('plan', 0):.2f} s, copy {t.get('copy', 0):.1f} s, sync {t.get('sync', 0):.1f} s)"
            + ("" if run.ok else f" FAILED: {run.failure()}")
        )
        # the last repeat's output stays for the verify step

    def run_transformers(self, i: int) -> None:
        step = self.step("transformers", self.src_bytes)
        step_sync = self.step("transformers+sync", self.src_bytes)
        if step.failed:
            return  # it failed already (OOM, timeout): once is enough
        remove(self.out_tf)
        self.before_timed_run()
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
        run = measure(
            [sys.executable, "-c", TRANSFORMERS_SNIPPET, str(self.src), str(self.out_tf)],
            timeout=self.args.transformers_timeout,
            env=env,
        )
        with contextlib.suppress(ValueError, IndexError):
            run.extra.update(json.loads(run.stdout.strip().splitlines()[-1]))
        step.runs.append(run)
        if run.ok:
            # what the copy floor and prewarm include: making the written files durable
            synced = measure(["bash", "-c", 'sync -- "$1"/* "$1" "$(dirname "$1")"', "bench-sync", str(self.out_tf)])
            total = Run(
                run.cmd + " ; sync",
                run.wall_s + synced.wall_s,
                max(run.maxrss_kib, synced.maxrss_kib),
                synced.returncode,
                extra={"sync_s": synced.wall_s},
            )
            step_sync.runs.append(total)
            e = run.extra
            log(
                f"  transformers #{i + 1}: {run.wall_s:.2f} s (import {e.get('import_s', 0):.1f}, "
                f"load {e.get('load_s', 0):.1f}, save {e.get('save_s', 0):.1f}) + sync {synced.wall_s:.2f} s, "
                f"{run.maxrss_kib / 1024:.0f} MiB"
            )
        else:
            log(f"  transformers #{i + 1}: FAILED: {run.failure()}")
            step_sync.skipped = "transformers failed"
        remove(self.out_tf)

    def run_verify_steps(self) -> None:
        reshard = self.steps.get("reshard")
        if not reshard or not reshard.ok_runs or not self.out_prewarm.is_dir():
            self.notes.append("verify steps skipped: no prewarm output")
            return
        manifest = json.loads((self.out_prewarm / "prewarm.manifest.json").read_text())
        files = [self.out_prewarm / name for name in sorted(manifest["files"])]
        nbytes = sum(p.stat().st_size for p in files)
        log("verify: dropping the source from the page cache, warming the output (untimed verify)")
        sync()
        drop_from_cache(dir_files(self.src))
        warm = measure([*self.prewarm, "verify", str(self.out_prewarm)])
        if not warm.ok:
            self.notes.append(f"untimed warm-up verify failed: {warm.failure()}")
        self.cache["output_cached_before_verify"] = cached_fraction(files)
        names = [str(p) for p in files]
        commands: list[tuple[str, list[str]]] = [
            ("verify", [*self.prewarm, "verify", str(self.out_prewarm), "--json"]),
            ("sha256sum", ["sha256sum", *names]),
            ("sha256sum-P2", ["bash", "-c", 'printf "%s\\0" "$@" | xargs -0 -P 2 -n 1 sha256sum', "bench", *names]),
        ]
        if shutil.which("b3sum"):
            commands.append(("b3sum", ["b3sum", *names]))
        else:
            self.steps["b3sum"] = Step("b3sum", nbytes, skipped="b3sum not installed (apt-get install -y b3sum)")
        for i in range(self.args.repeat):
            for name, cmd in commands:
                sync()
                run = measure(cmd)
                if name == "verify":
                    with contextlib.suppress(ValueError, KeyError):
                        result = json.loads(run.stdout)
                        run.extra.update(ok=result["ok"], internal_s=result["seconds"], bytes_checked=result["bytes_checked"])
                self.step(name, nbytes).runs.append(run)
                log(
                    f"  {name} #{i + 1}: {run.wall_s:.2f} s ({nbytes / run.wall_s / GB:.2f} GB/s), "
                    f"{run.maxrss_kib / 1024:.1f} MiB" + ("" if run.ok else f" FAILED: {run.failure()}")
                )
        self.cache["output_cached_after_verify"] = cached_fraction(files)

    def run(self) -> None:
        self.prepare()
        self.machine = machine_info(
            self.workdir, tools=("cp", "sha256sum", "b3sum"), dists=("prewarm", "xxhash", "torch", "transformers", "safetensors")
        )
        if self.args.skip_transformers:
            self.steps["transformers"] = Step("transformers", self.src_bytes, skipped="--skip-transformers")
        steps = [self.run_cp, self.run_reshard] + ([] if self.args.skip_transformers else [self.run_transformers])
        for i in range(self.args.repeat):
            # Rotate the order each round: on a VM the host may still be flushing what the previous
            # step (or the source generation) wrote, which penalises whoever comes next.
            order = steps[i % len(steps) :] + steps[: i % len(steps)]
            log(f"round {i + 1} of {self.args.repeat}: " + ", ".join(f.__name__[4:] for f in order))
            for run_step in order:
                run_step(i)
        self.run_verify_steps()

    def cleanup(self) -> None:
        for path in (self.out_cp, self.out_tf, self.out_prewarm):
            remove(path)
        if not self.args.keep:
            remove(self.src)
            remove(self.workdir / f"{self.src.name}.json")
            with contextlib.suppress(OSError):
                self.workdir.rmdir()  # only if empty

    # -- results -------------------------------------------------------------------------------

    def targets(self) -> list[dict[str, Any]]:
        check = check_target
        cp, rs, tf, vf = (self.steps.get(n) for n in ("cp", "reshard", "transformers", "verify"))
        ratio_cp = rs.wall / cp.wall if rs and cp and rs.wall and cp.wall else None
        speedup = tf.wall / rs.wall if rs and tf and rs.wall and tf.wall else None
        tf_missing = (tf.skipped or (tf.failed.failure() if tf.failed else "")) if tf else "not run"
        return [
            check("reshard wall <= 1.25x (cp -r + sync)", ratio_cp, RESHARD_VS_CP_MAX, False, "x", "not measured"),
            check(
                "reshard >= 3x faster than transformers",
                speedup,
                RESHARD_VS_TRANSFORMERS_MIN,
                True,
                "x",
                f"transformers: {tf_missing}",
            ),
            check(
                "reshard peak RSS < 300 MB",
                rs.rss_mb if rs and rs.runs else None,
                RESHARD_RSS_MAX_MB,
                False,
                " MB",
                "not measured",
            ),
            check(
                "prewarm verify >= 3 GB/s (warm cache)", vf.gbps if vf else None, VERIFY_MIN_GBPS, True, " GB/s", "not measured"
            ),
        ]

    def table(self, targets: list[dict[str, Any]]) -> str:
        status = {t["target"]: t["status"] for t in targets}
        t_cp, t_tf, t_rss, t_vf = (t["target"] for t in targets)
        reshard_status = [status[t_cp], status[t_tf], status[t_rss]]
        reshard_overall = "MISS" if "MISS" in reshard_status else "PASS" if all(s == "PASS" for s in reshard_status) else "PASS*"
        rows_spec = [
            ("cp -r + sync (floor)", "cp", "cp", "baseline", ""),
            ("prewarm reshard", "reshard", "cp", "<=1.25x cp; 3x tf; <300MB", reshard_overall),
            ("transformers load+save", "transformers", "cp", "reshard >= 3x faster", status[t_tf]),
            ("transformers + sync", "transformers+sync", "cp", "(info)", ""),
            ("prewarm verify (warm)", "verify", "sha256sum", ">= 3 GB/s", status[t_vf]),
            ("sha256sum (1 proc)", "sha256sum", "sha256sum", "baseline", ""),
            ("sha256sum (xargs -P2)", "sha256sum-P2", "sha256sum", "(info)", ""),
            ("b3sum", "b3sum", "sha256sum", "(info)", ""),
        ]
        header = ("step", "wall s", "GB/s", "peak RSS MB", "ratio vs base", "target", "result")
        repeated = self.args.repeat > 1
        rows = [header]
        for label, key, base_key, target, result in rows_spec:
            step, base = self.steps.get(key), self.steps.get(base_key)
            if step is None:
                continue
            if step.skipped or step.failed:
                why = step.skipped or step.failed.failure()  # type: ignore[union-attr]
                rss = f"{step.rss_mb:.0f}" if step.rss_mb is not None else "-"
                rows.append((label, "-", "-", rss, "-", target, ("FAILED: " if step.failed else "skipped: ") + why))
                continue
            ratio = f"{step.wall / base.wall:.2f}x" if step.wall and base and base.wall else "-"
            wall = f"{step.wall:.2f}" if step.wall else "-"
            if repeated and step.wall:
                walls = [r.wall_s for r in step.runs]
                wall += f" ({min(walls):.2f}-{max(walls):.2f})"
            rows.append(
                (
                    label,
                    wall,
                    f"{step.gbps:.2f}" if step.gbps else "-",
                    f"{step.rss_mb:.1f}" if step.rss_mb is not None else "-",
                    ratio,
                    target,
                    result or "-",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
        lines = []
        for n, row in enumerate(rows):
            cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:5], widths[1:5], strict=True)]
            cells += [row[5].ljust(widths[5]), row[6]]
            lines.append("| " + " | ".join(cells) + " |")
            if n == 0:
                lines.append("|" + "|".join("-" * (len(c) + 2) for c in cells) + "|")
        return "\n".join(lines)

    def report(self) -> dict[str, Any]:
        targets = self.targets()
        return {
            "command": shlex.join([sys.executable, *sys.argv]),
            "machine": self.machine,
            "params": {
                "scale": self.args.scale,
                "repeat": self.args.repeat,
                "source": str(self.src),
                "source_bytes": self.src_bytes,
                "statistic": "median wall time, max peak RSS over repeats",
            },
            "page_cache": self.cache,
            "steps": {name: step.summary() for name, step in self.steps.items()},
            "targets": targets,
            "notes": self.notes,
            "table": self.table(targets),
        }


def print_human(report: dict[str, Any], out: Any) -> None:
    m, p = report["machine"], report["params"]
    print(f"\nprewarm reshard/verify benchmark, {m['date']}", file=out)
    print(
        f"machine: {m['nproc']} CPUs ({m['cpu']}), {m['mem_total_gib']} GiB RAM, kernel {m['kernel']}, "
        f"workdir fs: {m['workdir_fs']}",
        file=out,
    )
    print(
        f"source: {p['source_bytes'] / GB:.2f} GB synthetic Qwen2.5-7B-like (scale {p['scale']:g}); "
        f"{p['repeat']} repeat(s): median wall (min-max), max peak RSS (MB = 10^6 B, GNU time %M)",
        file=out,
    )
    cache = {k: (f"{v * 100:.0f}%" if v is not None else "n/a") for k, v in report["page_cache"].items()}
    if cache:
        print("page cache residency: " + ", ".join(f"{k} {v}" for k, v in cache.items()), file=out)
    steps = report["steps"]
    rs = steps.get("reshard", {}).get("runs", [])
    if rs and rs[-1].get("extra", {}).get("timings"):
        t = rs[-1]["extra"]["timings"]
        print(
            f"reshard internal timings (last run): plan {t['plan']:.2f} s, copy {t['copy']:.2f} s, "
            f"fsync wait after copy {t['sync']:.2f} s, total {t['total']:.2f} s",
            file=out,
        )
    tf = steps.get("transformers", {}).get("runs", [])
    if tf and tf[-1].get("extra", {}).get("load_s") is not None:
        e = tf[-1]["extra"]
        al = e.get("after_load", {})
        print(
            f"transformers phases (last run): import {e['import_s']:.1f} s, load {e['load_s']:.1f} s, "
            f"save {e['save_s']:.1f} s; after load RssAnon {al.get('RssAnon_kib', 0) / 1024:.0f} MiB, "
            f"RssFile {al.get('RssFile_kib', 0) / 1024:.0f} MiB",
            file=out,
        )
    vf = steps.get("verify", {}).get("runs", [])
    if vf and vf[-1].get("extra", {}).get("internal_s"):
        e = vf[-1]["extra"]
        print(
            f"prewarm verify (last run): its own timer {e['internal_s']:.2f} s for {e['bytes_checked'] / GB:.2f} GB "
            f"({e['bytes_checked'] / e['internal_s'] / GB:.2f} GB/s without interpreter start-up)",
            file=out,
        )
    print("\n" + report["table"] + "\n", file=out)
    print_targets_and_notes(report, out, width=42)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_options(parser, repeat=1, kept="the source checkpoint")
    parser.add_argument(
        "--workdir", type=Path, default=REPO / "bench-data", help="where the source and outputs go (default: %(default)s)"
    )
    parser.add_argument("--skip-transformers", action="store_true", help="skip the from_pretrained/save_pretrained step")
    parser.add_argument(
        "--transformers-timeout",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="kill the transformers step after this long (default: %(default)s)",
    )
    args = parse_common(parser, argv)

    return run_and_report(Bench(args), args.json, "the source" if args.keep else None, print_human)


if __name__ == "__main__":
    sys.exit(main())
