"""Helpers shared by the benchmarks: running a child and measuring it, the page cache, the machine.

Wall time is ``time.perf_counter()`` around each child, from ``Popen`` to its reaping. Peak RSS
is GNU time's ``%M`` (``ru_maxrss`` from wait4) around the child; see ``measure``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's bin when run as .venv/bin/python (not resolved)
MB = 10**6
HAVE_GNU_TIME = os.access("/usr/bin/time", os.X_OK)
GB = 10**9


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Running and measuring children


@dataclass
class Run:
    cmd: str
    wall_s: float
    maxrss_kib: int
    returncode: int
    timed_out: bool = False
    stdout: str = ""
    stderr_tail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def failure(self) -> str:
        if self.timed_out:
            return f"timed out after {self.wall_s:.0f} s (killed)"
        if self.returncode < 0:
            name = signal.Signals(-self.returncode).name
            hint = " - likely the OOM killer" if self.returncode == -signal.SIGKILL else ""
            return f"killed by {name}{hint} after {self.wall_s:.0f} s"
        return f"exit code {self.returncode}: {self.stderr_tail.strip()[-300:]}"


GNU_TIME = "/usr/bin/time"


def measure(cmd: Sequence[str], timeout: float | None = None, env: dict[str, str] | None = None) -> Run:
    """Run ``cmd``; wall time around it and its peak RSS (see the module docstring).

    The child runs under GNU time, which forks it from a ~2 MB process and reports its
    ru_maxrss from wait4. wait4 on our own child is kept only as a cross-check (``wait4_kib``):
    Linux folds the hiwater RSS of the address space a child replaces at exec into its
    ru_maxrss, and with vfork (which CPython uses) that is *this* process's peak, so a direct
    wait4 reads at least as high as the benchmark's own peak RSS.
    """
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        tempfile.NamedTemporaryFile(prefix="bench-rss-") as rss_file,
    ):
        wrapped = [GNU_TIME, "-f", "%M", "-o", rss_file.name, *cmd] if HAVE_GNU_TIME else list(cmd)
        started = time.perf_counter()
        proc = subprocess.Popen(wrapped, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True, env=env)
        expired = threading.Event()

        def kill() -> None:
            expired.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # our child's own process group

        timer = threading.Timer(timeout, kill) if timeout else None
        if timer:
            timer.daemon = True
            timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            kill()
            os.wait4(proc.pid, 0)
            proc.returncode = -signal.SIGKILL
            raise
        finally:
            if timer:
                timer.cancel()
        wall = time.perf_counter() - started
        proc.returncode = returncode = os.waitstatus_to_exitcode(status)
        maxrss = usage.ru_maxrss
        if HAVE_GNU_TIME:
            lines = Path(rss_file.name).read_text().strip().splitlines()
            maxrss = 0  # unknown: GNU time itself was killed (timeout) before it could report
            with contextlib.suppress(ValueError, IndexError):
                maxrss = int(lines[-1])
            for line in lines:  # "Command terminated by signal 9" / "... non-zero status 3"
                if line.startswith("Command terminated by signal"):
                    returncode = -int(line.split()[-1])
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    run = Run(shlex.join(cmd), wall, maxrss, returncode, expired.is_set(), stdout, stderr[-2000:])
    run.extra["wait4_kib"] = usage.ru_maxrss
    return run


def prewarm_command() -> list[str]:
    """The CLI of the venv this runs in (``.venv/bin/prewarm``), else ``python -m prewarm``."""
    return [str(BIN / "prewarm")] if (BIN / "prewarm").exists() else [sys.executable, "-m", "prewarm"]


def write_synthetic(directory: Path, scale: float) -> None:
    """The synthetic Qwen2.5-7B-like checkpoint, written by a child so this process stays small
    (its peak RSS would leak into its children's, see ``measure``), then synced."""
    code = (
        "import sys; from pathlib import Path; from prewarm.synthetic import write_qwen25_7b_like; "
        "write_qwen25_7b_like(Path(sys.argv[1]), float(sys.argv[2]))"
    )
    run_quiet([sys.executable, "-c", code, str(directory), repr(scale)])
    sync()


def run_quiet(cmd: Sequence[str]) -> None:
    subprocess.run(list(cmd), check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)


def sync() -> None:
    run_quiet(["sync"])


# ---------------------------------------------------------------------------------------------
# Files and the page cache


def dir_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file())


def dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in dir_files(directory))


def read_through(files: Sequence[Path]) -> None:
    buffer = bytearray(16 * 2**20)
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass


def drop_from_cache(files: Sequence[Path]) -> None:
    """Evict clean cached pages of ``files`` (no root needed; the files are untouched)."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cached_fraction(files: Sequence[Path]) -> float | None:
    """Share of the bytes of ``files`` resident in the page cache (fincore), or None."""
    fincore = shutil.which("fincore")
    if not fincore or not files:
        return None
    proc = subprocess.run(
        [fincore, "--bytes", "--noheadings", "--raw", "--output", "RES,SIZE", *map(str, files)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        return None
    resident = total = 0
    for line in proc.stdout.split("\n"):
        if line.strip():
            res, size = (int(x) for x in line.split()[:2])
            resident += min(res, size)
            total += size
    return resident / total if total else 1.0


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


# ---------------------------------------------------------------------------------------------
# Machine description


def _cmd_output(cmd: Sequence[str]) -> str:
    try:
        return subprocess.run(list(cmd), capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info(workdir: Path, tools: Sequence[str] = (), dists: Sequence[str] = ("prewarm",)) -> dict[str, Any]:
    """Date, CPUs, memory, kernel, the workdir's filesystem, and the versions of ``tools`` (their
    ``--version``'s first line) and of the Python distributions ``dists`` (metadata only, no import)."""
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_total = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) * 1024
    fs = _cmd_output(["df", "--output=fstype,source,size,avail", "-h", str(workdir)]).splitlines()
    versions: dict[str, str] = {}
    for tool in tools:
        if shutil.which(tool):
            versions[tool] = (_cmd_output([tool, "--version"]).splitlines() or ["?"])[0]
    for dist in dists:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[dist] = importlib.metadata.version(dist)  # no import: this process stays small
    versions["python"] = platform.python_version()
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "mem_total_gib": round(mem_total / 2**30, 1),
        "kernel": platform.release(),
        "workdir_fs": fs[1] if len(fs) > 1 else "",
        "versions": versions,
    }


# ---------------------------------------------------------------------------------------------
# The benchmark


@dataclass
class Step:
    name: str
    bytes: int
    runs: list[Run] = field(default_factory=list)
    skipped: str = ""  # why, when the step did not run

    @property
    def ok_runs(self) -> list[Run]:
        return [r for r in self.runs if r.ok]

    @property
    def failed(self) -> Run | None:
        return next((r for r in self.runs if not r.ok), None)

    @property
    def wall(self) -> float | None:
        runs = self.ok_runs
        return statistics.median(r.wall_s for r in runs) if runs and not self.failed else None

    @property
    def rss_mb(self) -> float | None:
        known = [r.maxrss_kib for r in self.runs if r.maxrss_kib]
        return max(known) * 1024 / MB if known else None

    @property
    def gbps(self) -> float | None:
        return self.bytes / self.wall / GB if self.wall else None

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "bytes": self.bytes,
            "wall_s_median": self.wall,
            "gb_per_s": self.gbps,
            "peak_rss_mb_max": self.rss_mb,
            "skipped": self.skipped or None,
            "failure": self.failed.failure() if self.failed else None,
            "runs": [asdict(r) | {"stdout": r.stdout[-4000:]} for r in self.runs],
        }


# ---------------------------------------------------------------------------------------------
# Results


def check_target(name: str, value: float | None, limit: float, higher_is_better: bool, unit: str, missing: str) -> dict[str, Any]:
    """PASS/MISS of ``value`` against ``limit``, with the margin in percent of the limit (N/A if None)."""
    if value is None:
        return {"target": name, "status": "N/A", "value": None, "limit": limit, "detail": missing}
    passed = value >= limit if higher_is_better else value <= limit
    margin = (value / limit - 1) if higher_is_better else (1 - value / limit)
    word = "headroom" if passed else "short"
    return {
        "target": name,
        "status": "PASS" if passed else "MISS",
        "value": value,
        "limit": limit,
        "detail": f"{value:.2f}{unit} vs {limit:g}{unit}: {abs(margin) * 100:.0f}% {word}",
    }


def markdown_table(rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> str:
    """``rows[0]`` is the header; columns whose index is in ``right`` are right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("| " + " | ".join(cells) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def run_and_report(bench: Any, as_json: bool, kept: str | None, print_human: Any) -> int:
    """Run a benchmark object (``run``, ``cleanup``, ``report``), always clean up, print the report:
    JSON on stdout and the table on stderr with ``--json``, else the table on stdout."""
    try:
        bench.run()
    finally:
        log("cleaning up" + (f" (keeping {kept})" if kept else ""))
        bench.cleanup()
    report = bench.report()
    if as_json:
        print(json.dumps(report, indent=2))
        print_human(report, sys.stderr)
    else:
        print_human(report, sys.stdout)
    return 0


def add_common_options(parser: argparse.ArgumentParser, repeat: int, kept: str) -> None:
    """--scale, --repeat, --json and --keep, as every benchmark script takes them."""
    parser.add_argument("--scale", type=float, default=1.0, help="shrink the checkpoint (1.0 = ~15.2 GB)")
    parser.add_argument("--repeat", type=int, default=repeat, help="rounds of the timed steps (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="machine-readable results on stdout (log on stderr)")
    parser.add_argument("--keep", action="store_true", help=f"keep {kept} (reused by the next run)")


def parse_common(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.scale <= 0 or args.repeat < 1:
        parser.error("--scale must be > 0 and --repeat >= 1")
    return args


def print_targets_and_notes(report: dict[str, Any], out: Any, width: int) -> None:
    print("targets:", file=out)
    for target in report["targets"]:
        print(f"  {target['status']:<4}  {target['target']:<{width}} {target['detail']}", file=out)
    for note in report["notes"]:
        print(f"note: {note}", file=out)
