#!/usr/bin/env python3
"""Benchmark ``prewarm warm``, ``status`` and ``evict`` against ``cat`` and ``vmtouch`` (issue 3).

On the serving directory ``prewarm reshard`` makes of the synthetic Qwen2.5-7B-like checkpoint
(~15.2 GB in 4 shards at ``--scale 1``; the source is deleted once resharded), in one run on one
machine, this measures the wall time of each command as a subprocess:

a. cold ``prewarm warm DIR`` (default threads: one per CPU);
b. cold ``cat FILES > /dev/null``;
c. cold ``vmtouch -t FILES``;
d. ``prewarm warm DIR`` with every page already resident (3 times per round);
e. cold ``prewarm verify --warm DIR`` (verify and warm in one read);
f. cold ``prewarm warm DIR`` then ``prewarm verify DIR`` (two passes, for comparison).

FILES are the files ``prewarm status`` lists (the shards, index, config and manifest; not the
hidden verification record), so every contender reads the same bytes.

"Cold" means: ``sync``; ``prewarm evict DIR`` (posix_fadvise DONTNEED, no drop_caches); ``prewarm
status DIR --json`` must report ~0 resident bytes; then ``prewarm evict`` once more, because
``status`` reads the manifest (to compare it with the last verification) and so caches it. On a VM
that is cold in this guest's page cache only: the host caches the virtual disk below it.

Then ``prewarm status --json`` is compared with ``vmtouch FILE`` (no flags, one call per file,
"Resident Pages: X/Y") in five states: cold, after ``warm --budget`` of 40% of the bytes, after
reading half of the largest shard with ``head -c``, with holes dropped by posix_fadvise, and fully
resident. Per file the difference must be under one page (prewarm counts a resident partial last
page as the bytes it holds; vmtouch counts whole pages). vmtouch runs just before status, and again
just after it, to show status's own effect on the page cache.

Wall time is ``time.perf_counter()`` around each child; peak RSS is GNU time's ``%M`` (see
``common.measure``). With ``--repeat N`` the order of a, b and c rotates each round, as does that
of e and f; tables show the median (min-max). A missed target is a result, not an error: the exit
code is 0 unless the benchmark itself could not run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from common import (
    GB,
    MB,
    REPO,
    Run,
    Step,
    add_common_options,
    check_target,
    log,
    machine_info,
    markdown_table,
    measure,
    parse_common,
    prewarm_command,
    print_targets_and_notes,
    remove,
    run_and_report,
    sync,
    write_synthetic,
)

# Targets from the issue.
WARM_VS_BEST_MAX = 1.1  # cold warm <= 1.1 x the faster of cat and vmtouch -t
RESIDENT_WARM_MAX_S = 0.5  # warm with everything resident, wall time, for 15 GB
VERIFY_WARM_VS_WARM_MAX = 1.15  # cold verify --warm <= 1.15 x cold warm

PAGE = os.sysconf("SC_PAGE_SIZE")
PARTIAL_BUDGET_SHARE = 0.4
RESIDENT_REPEATS = 3  # step d per round: it is cheap
STEP_TIMEOUT = 3600.0
FULL_SCALE_BYTES = 15.3 * GB  # the synthetic checkpoint at scale 1 (15.23 GB)


READBACK_CODE = """
import mmap, sys, xxhash
for name in sys.argv[1:]:
    with open(name, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        view, hasher = memoryview(m), xxhash.xxh3_64()
        for offset in range(0, len(view), 16 << 20):
            hasher.update(view[offset : offset + (16 << 20)])
        view.release()
        m.close()
"""


def parse_json(run: Run) -> dict[str, Any]:
    with contextlib.suppress(ValueError):
        doc = json.loads(run.stdout)
        if isinstance(doc, dict):
            return doc
    return {}


def vmtouch_version(vmtouch: str) -> str:
    proc = subprocess.run([vmtouch, "-h"], capture_output=True, text=True)
    found = re.search(r"vmtouch v[\w.]+", proc.stdout + proc.stderr)
    return found.group(0) if found else "?"


def read_first_line(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def block_device_readahead(directory: Path) -> str:
    """read_ahead_kb of the block device holding ``directory`` (sysfs), or ''."""
    dev = os.stat(directory).st_dev
    ra = read_first_line(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/queue/read_ahead_kb")
    if not ra:  # a partition: the queue is the parent's
        ra = read_first_line(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/../queue/read_ahead_kb")
    return f"{ra} KiB" if ra else ""


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def fmt_range(walls: Sequence[float]) -> str:
    if not walls:
        return "-"
    med = statistics.median(walls)
    return f"{med:.2f}" + (f" ({min(walls):.2f}-{max(walls):.2f})" if len(walls) > 1 else "")


class WarmBench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workdir: Path = args.workdir.resolve()
        self.src = self.workdir / f"warm-src-scale{args.scale:g}"
        self.serving = self.workdir / f"warm-serving-scale{args.scale:g}"
        self.marker = self.workdir / f"{self.serving.name}.json"
        self.prewarm = prewarm_command()
        self.vmtouch = shutil.which("vmtouch")
        self.steps: dict[str, Step] = {}
        self.rounds: list[dict[str, Any]] = []
        self.agreement: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.machine: dict[str, Any] = {}
        self.setup: dict[str, Any] = {}
        self.names: list[str] = []
        self.sizes: dict[str, int] = {}
        self.total = 0

    @property
    def files(self) -> list[str]:
        return [str(self.serving / name) for name in self.names]

    def note(self, text: str) -> None:
        log(f"  note: {text}")
        self.notes.append(text)

    def step(self, name: str, nbytes: int) -> Step:
        return self.steps.setdefault(name, Step(name, nbytes))

    # -- setup ---------------------------------------------------------------------------------

    def prepare(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        remove(self.src)
        reuse = (
            self.serving.is_dir() and self.marker.exists() and json.loads(self.marker.read_text()).get("scale") == self.args.scale
        )
        if reuse:
            log(f"reusing serving directory {self.serving}")
        else:
            remove(self.serving)
            remove(self.marker)
            free = shutil.disk_usage(self.workdir).free
            needed = 2 * FULL_SCALE_BYTES * self.args.scale + 512 * MB
            if free < needed:
                raise SystemExit(f"not enough free space in {self.workdir}: {free / GB:.1f} GB free, {needed / GB:.1f} GB needed")
            log(f"writing synthetic Qwen2.5-7B-like checkpoint (scale {self.args.scale:g}) to {self.src}")
            write_synthetic(self.src, self.args.scale)
            log(f"resharding it into {self.serving} (default 5GB limit)")
            run = measure([*self.prewarm, "reshard", str(self.src), str(self.serving), "--json"])
            if not run.ok:
                raise SystemExit(f"prewarm reshard failed: {run.failure()}")
            self.setup["reshard_wall_s"] = run.wall_s
            remove(self.src)
            sync()
            self.marker.write_text(json.dumps({"scale": self.args.scale}))
        status = self.status()
        self.names = [f["name"] for f in status["files"]]
        self.sizes = {f["name"]: f["bytes"] for f in status["files"]}
        self.total = status["total_bytes"]
        listed = sorted(p.name for p in self.serving.iterdir() if p.is_file() and not p.name.startswith("."))
        if sorted(self.names) != listed:
            self.note(f"prewarm status lists {self.names}, the directory holds {listed}")
        available = mem_available()
        self.setup.update(files={n: self.sizes[n] for n in self.names}, total_bytes=self.total, mem_available_at_start=available)
        log(f"{len(self.names)} files, {self.total / GB:.2f} GB; MemAvailable {available / GB:.1f} GB")
        if self.total > 0.85 * available:
            self.note(
                f"the directory ({self.total / GB:.1f} GB) hardly fits in available memory "
                f"({available / GB:.1f} GB): warm may be limited by its budget"
            )
        # One untimed read first, so that no timed step is the first reader after the write (on a VM
        # the host may still be flushing it) and the host cache is in the same state for every step.
        self.make_cold()
        settle = measure([*self.prewarm, "warm", str(self.serving), "--json"])
        self.setup["untimed_first_warm_s"] = settle.wall_s
        log(f"untimed first warm: {settle.wall_s:.2f} s")

    # -- the page cache --------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """`prewarm status --json`; its wall time is kept when nothing or everything is resident."""
        run = measure([*self.prewarm, "status", str(self.serving), "--json"])
        doc = parse_json(run)
        if not run.ok or "files" not in doc:
            raise SystemExit(f"prewarm status failed: {run.failure()}")
        if doc["resident_bytes"] in (0, doc["total_bytes"]):
            self.step("status (cold)" if doc["resident_bytes"] == 0 else "status (all resident)", 0).runs.append(run)
        return doc

    def evict(self) -> dict[str, Any]:
        run = measure([*self.prewarm, "evict", str(self.serving), "--json"])
        doc = parse_json(run)
        if not run.ok or "after" not in doc:
            raise SystemExit(f"prewarm evict failed: {run.failure()}")
        if doc["before"]["resident_bytes"] == doc["before"]["total_bytes"]:
            run.extra["evicted_bytes"] = doc["before"]["resident_bytes"] - doc["after"]["resident_bytes"]
            self.step("evict (all resident)", self.total).runs.append(run)
        return doc

    def make_cold(self) -> int:
        """sync, evict, confirm with status, evict again (status caches the manifest); resident bytes."""
        sync()
        self.evict()
        confirmed = self.status()["resident_bytes"]
        again = self.evict()["after"]["resident_bytes"]
        tolerance = PAGE * len(self.names)
        if confirmed > tolerance or again > tolerance:
            self.note(f"evict left {confirmed} bytes resident by `prewarm status` ({again} after the second evict)")
        return int(again)

    def make_resident(self) -> None:
        if self.status()["resident_bytes"] != self.total:
            run = measure([*self.prewarm, "warm", str(self.serving), "--json"])
            if not run.ok:
                self.note(f"untimed warm before the resident steps failed: {run.failure()}")

    # -- timed steps -----------------------------------------------------------------------------

    def timed(self, name: str, cmd: list[str], cold: bool = True) -> Run:
        resident_before = self.make_cold() if cold else self.status()["resident_bytes"]
        sync()
        run = measure(cmd, timeout=STEP_TIMEOUT)
        resident_after = self.status()["resident_bytes"]
        run.extra.update(resident_before=resident_before, resident_after=resident_after)
        doc = parse_json(run)
        if doc:
            if "warm" in doc:  # verify --warm
                run.extra.update(
                    verify_internal_s=doc["seconds"],
                    warm_internal_s=doc["warm"]["seconds"],
                    internal_s=doc["seconds"] + doc["warm"]["seconds"],
                    bytes_read=doc["warm"]["bytes_read"],
                )
            elif "bytes_checked" in doc:
                run.extra.update(internal_s=doc["seconds"], bytes_checked=doc["bytes_checked"])
            else:
                run.extra.update(internal_s=doc.get("seconds"), bytes_read=doc.get("bytes_read"))
        if not run.ok:
            log(f"  {name}: FAILED: {run.failure()}")
        elif resident_after != self.total:
            self.note(f"{name} left {resident_after} of {self.total} bytes resident")
        return run

    def add(self, name: str, run: Run, nbytes: int | None = None) -> Run:
        self.step(name, self.total if nbytes is None else nbytes).runs.append(run)
        internal = run.extra.get("internal_s")
        log(
            f"  {name}: {run.wall_s:.2f} s"
            + (f" (own timer {internal:.2f} s)" if internal is not None else "")
            + f", {run.maxrss_kib / 1024:.1f} MiB"
        )
        return run

    def run_warm_cold(self) -> float:
        return self.add("warm", self.timed("warm", [*self.prewarm, "warm", str(self.serving), "--json"])).wall_s

    def run_cat(self) -> float:
        cmd = ["bash", "-c", 'cat -- "$@" > /dev/null', "bench-cat", *self.files]
        return self.add("cat", self.timed("cat", cmd)).wall_s

    def run_vmtouch(self) -> float:
        assert self.vmtouch
        return self.add("vmtouch -t", self.timed("vmtouch -t", [self.vmtouch, "-t", *self.files])).wall_s

    def run_resident(self) -> float:
        self.make_resident()
        walls = []
        for _ in range(RESIDENT_REPEATS):
            run = self.timed("warm (resident)", [*self.prewarm, "warm", str(self.serving), "--json"], cold=False)
            if run.extra.get("bytes_read"):
                self.note(f"warm with everything resident read {run.extra['bytes_read']} bytes")
            walls.append(self.add("warm (resident)", run, 0).wall_s)
        return statistics.median(walls)

    def run_verify_warm(self) -> float:
        cmd = [*self.prewarm, "verify", "--warm", str(self.serving), "--json"]
        return self.add("verify --warm", self.timed("verify --warm", cmd)).wall_s

    def run_warm_then_verify(self) -> float:
        first = self.timed("warm, then verify", [*self.prewarm, "warm", str(self.serving), "--json"])
        sync()
        second = measure([*self.prewarm, "verify", str(self.serving), "--json"], timeout=STEP_TIMEOUT)
        doc = parse_json(second)
        warm_s: float | None = first.extra.get("internal_s")
        verify_s: float | None = doc.get("seconds")
        run = Run(
            first.cmd + " ; " + second.cmd,
            first.wall_s + second.wall_s,
            max(first.maxrss_kib, second.maxrss_kib),
            first.returncode or second.returncode,
            first.timed_out or second.timed_out,
            second.stdout,
            first.stderr_tail + second.stderr_tail,
            extra={
                "warm_wall_s": first.wall_s,
                "verify_wall_s": second.wall_s,
                "warm_internal_s": warm_s,
                "verify_internal_s": verify_s,
                "internal_s": warm_s + verify_s if warm_s is not None and verify_s is not None else None,
            },
        )
        return self.add("warm, then verify", run).wall_s

    # -- status vs vmtouch -----------------------------------------------------------------------

    def vmtouch_pages(self) -> dict[str, tuple[int, int]]:
        """(resident, total) pages per file, from `vmtouch FILE`."""
        assert self.vmtouch
        found = {}
        for name in self.names:
            out = subprocess.run([self.vmtouch, str(self.serving / name)], capture_output=True, text=True, check=True).stdout
            match = re.search(r"Resident Pages:\s*(\d+)/(\d+)", out)
            if not match:
                raise SystemExit(f"cannot parse vmtouch output: {out!r}")
            found[name] = (int(match.group(1)), int(match.group(2)))
        return found

    def settled_vmtouch_pages(self, timeout: float = 10.0) -> dict[str, tuple[int, int]]:
        """vmtouch_pages once two readings 0.2 s apart agree: asynchronous read-ahead started by
        the reader that made the state may still be adding pages when it has exited."""
        deadline = time.monotonic() + timeout
        last = self.vmtouch_pages()
        while time.monotonic() < deadline:
            time.sleep(0.2)
            now = self.vmtouch_pages()
            if now == last:
                return now
            last = now
        self.note(f"page cache residency still changing after {timeout:.0f} s")
        return last

    def compare(self, state: str) -> None:
        before = self.settled_vmtouch_pages()
        status = {f["name"]: f["resident_bytes"] for f in self.status()["files"]}
        after = self.vmtouch_pages()
        files = []
        for name in self.names:
            vm_bytes = before[name][0] * PAGE
            diff = vm_bytes - status[name]
            pages_ok = before[name][1] == -(-self.sizes[name] // PAGE)
            files.append(
                {
                    "name": name,
                    "bytes": self.sizes[name],
                    "prewarm_resident": status[name],
                    "vmtouch_pages": before[name][0],
                    "vmtouch_total_pages": before[name][1],
                    "vmtouch_pages_after_status": after[name][0],
                    "diff_bytes": diff,
                    "ok": abs(diff) < PAGE and pages_ok,
                }
            )
        changed = [f["name"] for f in files if f["vmtouch_pages_after_status"] != f["vmtouch_pages"]]
        entry = {
            "state": state,
            "files": files,
            "ok": all(f["ok"] for f in files),
            "prewarm_resident": sum(status.values()),
            "vmtouch_resident": sum(before[n][0] for n in self.names) * PAGE,
            "max_abs_diff": max(abs(f["diff_bytes"]) for f in files),
            "changed_by_status": changed,
        }
        self.agreement.append(entry)
        log(
            f"  {state}: prewarm {entry['prewarm_resident'] / MB:.1f} MB, vmtouch {entry['vmtouch_resident'] / MB:.1f} MB "
            f"resident; max |diff| {entry['max_abs_diff']} B per file: {'OK' if entry['ok'] else 'DISAGREE'}"
            + (f"; status itself cached pages of {', '.join(changed)}" if changed else "")
        )

    def run_agreement(self) -> None:
        log("status vs vmtouch")
        self.make_cold()
        self.compare("cold (after evict)")
        self.make_cold()
        budget = int(self.total * PARTIAL_BUDGET_SHARE)
        run = measure([*self.prewarm, "warm", str(self.serving), "--budget", str(budget), "--json"])
        if parse_json(run).get("limited_by_memory") is not True:
            self.note(f"warm --budget {budget} did not report limited_by_memory (exit {run.returncode})")
        self.compare(f"partial: warm --budget {PARTIAL_BUDGET_SHARE:.0%} of the bytes")
        self.make_cold()
        largest = max(self.names, key=lambda n: self.sizes[n])
        half = self.sizes[largest] // 2 + 1234  # not page-aligned
        subprocess.run(
            ["bash", "-c", 'head -c "$1" -- "$2" > /dev/null', "bench-head", str(half), str(self.serving / largest)], check=True
        )
        self.compare("partial: first half of the largest shard read (head -c)")
        self.make_resident()
        for name in self.names:  # drop every other MiB (unaligned ranges) and each file's last page
            fd = os.open(self.serving / name, os.O_RDONLY)
            try:
                for offset in range(2**20 + 1000, self.sizes[name], 2 * 2**20):
                    os.posix_fadvise(fd, offset, 2**20, os.POSIX_FADV_DONTNEED)
                last_page = (self.sizes[name] - 1) // PAGE * PAGE  # DONTNEED rounds a start up to a page
                os.posix_fadvise(fd, last_page, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        self.compare("holes: every other MiB and each last page dropped (fadvise)")
        self.make_resident()
        self.compare("fully resident (after warm)")

    # -- the run ---------------------------------------------------------------------------------

    def run_readback(self) -> None:
        """How fast a loader reads the files back through an mmap (as safetensors and vLLM do),
        after each way of warming them: the point of warming is the load that follows."""
        warmers = {
            "prewarm warm": [*self.prewarm, "-q", "warm", str(self.serving)],
            "cat": ["bash", "-c", 'cat -- "$@" > /dev/null', "bench-cat", *self.files],
        }
        if self.vmtouch:
            warmers["vmtouch -t"] = [self.vmtouch, "-q", "-t", *self.files]
        for _ in range(self.args.repeat):
            for name, cmd in warmers.items():
                self.make_cold()
                warmed = measure(cmd, timeout=STEP_TIMEOUT)
                if not warmed.ok:
                    self.note(f"read-back: warming with {name} failed: {warmed.failure()}")
                    continue
                self.add(f"read-back after {name}", measure([sys.executable, "-c", READBACK_CODE, *self.files]))

    def run(self) -> None:
        self.prepare()
        self.machine = machine_info(self.workdir, tools=("cat", "bash"), dists=("prewarm", "xxhash", "click"))
        if self.vmtouch:
            self.machine["versions"]["vmtouch"] = vmtouch_version(self.vmtouch)
        self.machine["read_ahead"] = block_device_readahead(self.workdir)
        cold: list[tuple[str, Callable[[], float]]] = [("warm", self.run_warm_cold), ("cat", self.run_cat)]
        if self.vmtouch:
            cold.append(("vmtouch -t", self.run_vmtouch))
        else:
            missing = "vmtouch not installed (apt-get install -y vmtouch)"
            self.steps["vmtouch -t"] = Step("vmtouch -t", self.total, skipped=missing)
        pair: list[tuple[str, Callable[[], float]]] = [
            ("verify --warm", self.run_verify_warm),
            ("warm, then verify", self.run_warm_then_verify),
        ]
        for i in range(self.args.repeat):
            order = cold[i % len(cold) :] + cold[: i % len(cold)]
            second = pair[i % 2 :] + pair[: i % 2]
            names = [n for n, _ in order] + ["warm (resident)"] + [n for n, _ in second]
            log(f"round {i + 1} of {self.args.repeat}: " + ", ".join(names))
            walls = {name: fn() for name, fn in order}
            walls["warm (resident)"] = self.run_resident()
            walls |= {name: fn() for name, fn in second}
            self.rounds.append({"order": names, "wall_s": walls})
        self.run_readback()
        if self.vmtouch:
            self.run_agreement()
        else:
            self.note("status agreement not checked: vmtouch not installed")

    def cleanup(self) -> None:
        remove(self.src)
        if not self.args.keep:
            remove(self.serving)
            remove(self.marker)
            with contextlib.suppress(OSError):
                self.workdir.rmdir()  # only if empty

    # -- results ---------------------------------------------------------------------------------

    def wall(self, name: str) -> float | None:
        step = self.steps.get(name)
        return step.wall if step else None

    def internal(self, name: str) -> list[float]:
        step = self.steps.get(name)
        return [r.extra["internal_s"] for r in step.runs if r.extra.get("internal_s") is not None] if step else []

    def targets(self) -> list[dict[str, Any]]:
        warm, cat, vmt = self.wall("warm"), self.wall("cat"), self.wall("vmtouch -t")
        best = min((w for w in (cat, vmt) if w), default=None)
        resident, vw = self.wall("warm (resident)"), self.wall("verify --warm")
        disagree = [
            f"{e['state']}: {f['name']} {f['diff_bytes']:+d} B" for e in self.agreement for f in e["files"] if not f["ok"]
        ]
        gb = self.total / GB
        agreement = {
            "target": "status agrees with vmtouch within one page per file",
            "status": "N/A",
            "value": None,
            "limit": PAGE,
            "detail": "not checked",
        }
        if self.agreement:
            worst = max(e["max_abs_diff"] for e in self.agreement)
            count = sum(len(e["files"]) for e in self.agreement)
            agreement |= {
                "status": "MISS" if disagree else "PASS",
                "value": worst,
                "detail": (
                    f"{len(self.agreement)} states x {len(self.names)} files: largest |diff| {worst} B (< {PAGE} B)"
                    if not disagree
                    else f"{len(disagree)} of {count}: " + "; ".join(disagree)
                ),
            }
        return [
            check_target(
                "warm (cold) <= 1.1x min(cat, vmtouch -t)",
                warm / best if warm and best else None,
                WARM_VS_BEST_MAX,
                False,
                "x",
                "not measured",
            ),
            check_target(
                f"warm (all resident, {gb:.1f} GB) < 0.5 s wall", resident, RESIDENT_WARM_MAX_S, False, " s", "not measured"
            ),
            check_target(
                "verify --warm (cold) <= 1.15x warm (cold)",
                vw / warm if vw and warm else None,
                VERIFY_WARM_VS_WARM_MAX,
                False,
                "x",
                "not measured",
            ),
            agreement,
        ]

    def table(self, targets: list[dict[str, Any]]) -> str:
        status = [t["status"] for t in targets]
        best_name = min((n for n in ("cat", "vmtouch -t") if self.wall(n)), key=lambda n: self.wall(n) or 0.0, default="cat")
        spec = [
            ("a. prewarm warm (cold)", "warm", best_name, "<=1.1x min(b, c)", status[0]),
            ("b. cat FILES > /dev/null (cold)", "cat", best_name, "baseline", ""),
            ("c. vmtouch -t FILES (cold)", "vmtouch -t", best_name, "baseline", ""),
            ("d. prewarm warm (all resident)", "warm (resident)", "", "< 0.5 s wall", status[1]),
            ("e. prewarm verify --warm (cold)", "verify --warm", "warm", "<=1.15x a", status[2]),
            ("f. prewarm warm; prewarm verify (cold)", "warm, then verify", "warm", "(info)", ""),
            ("prewarm evict (all resident)", "evict (all resident)", "", "(info)", ""),
            ("prewarm status (cold)", "status (cold)", "", "(info)", ""),
            ("prewarm status (all resident)", "status (all resident)", "", "(info)", ""),
        ]
        rows = [("step", "wall s", "own timer s", "GB/s", "peak RSS MB", "ratio", "target", "result")]
        for label, key, base, target, result in spec:
            step = self.steps.get(key)
            if step is None:
                continue
            if step.skipped or step.failed:
                why = step.skipped or step.failed.failure()  # type: ignore[union-attr]
                rows.append((label, "-", "-", "-", "-", "-", target, ("FAILED: " if step.failed else "skipped: ") + why))
                continue
            walls = [r.wall_s for r in step.runs]
            base_wall = self.wall(base) if base else None
            ratio = f"{step.wall / base_wall:.2f}x" if step.wall and base_wall else "-"
            internal = self.internal(key)
            rows.append(
                (
                    label,
                    fmt_range(walls),
                    fmt_range(internal),
                    f"{step.gbps:.2f}" if step.gbps else "-",
                    f"{step.rss_mb:.1f}" if step.rss_mb is not None else "-",
                    ratio,
                    target,
                    result or "-",
                )
            )
        return markdown_table(rows, right=(1, 2, 3, 4, 5))

    def agreement_table(self) -> str:
        rows = [("state", "prewarm status MB", "vmtouch MB", "largest per-file diff B", "files within a page")]
        for e in self.agreement:
            within = sum(f["ok"] for f in e["files"])
            rows.append(
                (
                    e["state"],
                    f"{e['prewarm_resident'] / MB:.3f}",
                    f"{e['vmtouch_resident'] / MB:.3f}",
                    str(e["max_abs_diff"]),
                    f"{within}/{len(e['files'])}",
                )
            )
        return markdown_table(rows, right=(1, 2, 3, 4))

    def report(self) -> dict[str, Any]:
        targets = self.targets()
        per_round = []
        for r in self.rounds:
            w = r["wall_s"]
            best = min((w[n] for n in ("cat", "vmtouch -t") if n in w), default=None)
            per_round.append(
                {
                    "order": r["order"],
                    "wall_s": w,
                    "warm_vs_best": w["warm"] / best if best else None,
                    "verify_warm_vs_warm": w["verify --warm"] / w["warm"],
                }
            )
        return {
            "command": shlex.join([sys.executable, *sys.argv]),
            "machine": self.machine,
            "params": {
                "scale": self.args.scale,
                "repeat": self.args.repeat,
                "directory": str(self.serving),
                "files": self.names,
                "total_bytes": self.total,
                "page_size": PAGE,
                "statistic": "median wall time (min-max), max peak RSS over repeats",
            },
            "setup": self.setup,
            "rounds": per_round,
            "steps": {name: step.summary() for name, step in self.steps.items()},
            "agreement": self.agreement,
            "targets": targets,
            "notes": self.notes,
            "table": self.table(targets),
            "agreement_table": self.agreement_table(),
        }


def print_human(report: dict[str, Any], out: Any) -> None:
    m, p = report["machine"], report["params"]
    print(f"\nprewarm warm/status/evict benchmark, {m['date']}", file=out)
    print(
        f"machine: {m['nproc']} CPUs ({m['cpu']}), {m['mem_total_gib']} GiB RAM, kernel {m['kernel']}, "
        f"workdir fs: {m['workdir_fs']}, read-ahead {m.get('read_ahead') or '?'}",
        file=out,
    )
    print("versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()), file=out)
    print(
        f"directory: {p['total_bytes'] / GB:.2f} GB in {len(p['files'])} files (prewarm reshard of the synthetic "
        f"Qwen2.5-7B-like checkpoint, scale {p['scale']:g}); {p['repeat']} round(s): median wall (min-max)",
        file=out,
    )
    print("cold = evicted from this guest's page cache (prewarm evict); the host still caches the virtual disk", file=out)
    print("\n" + report["table"] + "\n", file=out)
    for i, r in enumerate(report["rounds"]):
        w = r["wall_s"]
        ratio = f"{r['warm_vs_best']:.2f}x" if r["warm_vs_best"] else "-"
        print(
            f"round {i + 1} ({', '.join(r['order'])}): warm/min(cat, vmtouch) {ratio}, "
            f"verify --warm/warm {r['verify_warm_vs_warm']:.2f}x; " + ", ".join(f"{k} {v:.2f} s" for k, v in w.items()),
            file=out,
        )
    readback = {k: v for k, v in report["steps"].items() if k.startswith("read-back after ")}
    if readback:
        print("\nreading the warm files back through an mmap (median wall, min-max):", file=out)
        for name, step in readback.items():
            walls = [r["wall_s"] for r in step["runs"] if r["returncode"] == 0]
            print(f"  {name:<28} {fmt_range(walls)} s", file=out)
    print("\nprewarm status vs vmtouch, resident bytes per file (vmtouch pages x page size):\n", file=out)
    print(report["agreement_table"] + "\n", file=out)
    print_targets_and_notes(report, out, width=52)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_options(parser, repeat=3, kept="the serving directory")
    parser.add_argument(
        "--workdir", type=Path, default=REPO / "bench-data", help="where the serving directory goes (default: %(default)s)"
    )
    args = parse_common(parser, argv)

    return run_and_report(WarmBench(args), args.json, "the serving directory" if args.keep else None, print_human)


if __name__ == "__main__":
    sys.exit(main())
