"""The page-cache stage against the kernel: fincore as the independent reader of mincore."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from prewarm.errors import PrewarmError
from prewarm.pagecache import PAGE_SIZE, evict_fd
from prewarm.reshard import reshard
from prewarm.warm import PageLock, evict, residency, serving_files, warm
from tests.helpers import ROOT, assert_clean_failure, run_prewarm


@pytest.fixture(scope="module")
def served_master(synthetic_7b_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return reshard(synthetic_7b_small, tmp_path_factory.mktemp("w") / "served", 70_000_000).destination


@pytest.fixture
def served(served_master: Path, tmp_path: Path) -> Path:
    """A private copy, evicted to start cold."""
    copy = Path(shutil.copytree(served_master, tmp_path / "served"))
    evict(copy)
    return copy


def fincore(path: Path) -> int:
    """Resident bytes as util-linux fincore(1) reports them (whole pages)."""
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)], capture_output=True, text=True, check=True
    ).stdout
    return int(out.split()[0])


def evict_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        evict_fd(fd)
    finally:
        os.close(fd)


def assert_matches_fincore(directory: Path) -> None:
    for f in residency(directory).files:
        assert abs(fincore(directory / f.name) - f.resident_bytes) < PAGE_SIZE, f


def test_residency_after_evict_and_after_warm_matches_fincore(served: Path) -> None:
    res = residency(served)
    assert res.resident_bytes == 0 and res.total_bytes > 150_000_000
    assert_matches_fincore(served)
    result = warm(served, threads=2)
    assert result.after.complete and result.bytes_read == res.total_bytes
    assert_matches_fincore(served)
    before, after = evict(served)
    assert before.complete and after.resident_bytes == 0
    assert_matches_fincore(served)


def test_warm_reads_only_what_is_missing(served: Path) -> None:
    warm(served)
    shard = served / serving_files(served).names[1]
    fd = os.open(shard, os.O_RDONLY)
    os.posix_fadvise(fd, 4 * 2**20, 3 * 2**20, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    assert residency(served).total_bytes - residency(served).resident_bytes == 3 * 2**20
    again = warm(served)
    assert again.bytes_read == 3 * 2**20
    assert again.after.complete
    assert warm(served).bytes_read == 0


def test_a_small_memory_budget_warms_what_fits_in_model_order(served: Path) -> None:
    names = serving_files(served).names
    first = (served / names[0]).stat().st_size
    proc = run_prewarm("warm", served, "--budget", str(first + 5_000_000), "--json")
    assert proc.returncode == 1
    warning = proc.stderr.splitlines()[0]  # said before warming starts, not after
    assert warning.startswith("WARNING: ") and "more in the page cache but only" in warning
    assert "(the budget given): warming what fits, in model order" in warning
    report = json.loads(proc.stdout)
    assert report["limited_by_memory"] is True and report["complete"] is False
    files = {f["name"]: f for f in report["files"]}
    assert files[names[0]]["resident_bytes"] == first, "the first shard is warmed first"
    assert files[names[-4]]["resident_bytes"] < files[names[-4]]["bytes"], "later shards are not"
    assert files["config.json"]["resident_bytes"] == files["config.json"]["bytes"], "small files still fit"
    assert_matches_fincore(served)


def test_a_file_truncated_while_warming_is_a_clear_error(served: Path) -> None:
    names = serving_files(served).names
    victim = served / names[2]

    class Saboteur:
        def start(self, label: str, total: int) -> None:
            pass

        def advance(self, n: int) -> None:
            if victim.stat().st_size > 1000:
                os.truncate(victim, 1000)

        def finish(self) -> None:
            pass

    with pytest.raises(PrewarmError) as info:
        warm(served, threads=1, progress=Saboteur())
    assert "changed while being warmed" in str(info.value) and names[2] in str(info.value)


def test_a_file_removed_before_warming_is_a_clear_error(served: Path) -> None:
    (served / "config.json").unlink()
    (served / "config.json").symlink_to(served / "gone")
    proc = run_prewarm("warm", served)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "WARNING: not warmed: config.json: a symlink to nothing (dangling)" in proc.stderr


def test_status_reports_residency_and_verification(served: Path) -> None:
    status = json.loads(run_prewarm("status", served, "--json", check=True).stdout)
    assert status["resident_bytes"] == 0 and status["manifest"] is True and status["last_verification"] is None
    assert {f["name"] for f in status["files"]} == set(serving_files(served).names)
    run_prewarm("verify", served, check=True)
    status = json.loads(run_prewarm("status", served, "--json", check=True).stdout)
    assert status["resident_bytes"] == status["total_bytes"], "verify reads every byte, so it warms too"
    assert status["last_verification"]["ok"] is True and status["last_verification"]["manifest_changed"] is False
    human = run_prewarm("status", served, check=True).stdout
    assert "last verified" in human and ": OK" in human and "(100%)" in human
    evict(served)
    for _ in range(2):
        assert json.loads(run_prewarm("status", served, "--json", check=True).stdout)["resident_bytes"] == 0, (
            "looking does not warm: status reads no file's contents"
        )
    (served / "prewarm.manifest.json").write_bytes((served / "prewarm.manifest.json").read_bytes() + b" ")
    assert "the manifest has changed since" in run_prewarm("status", served, check=True).stdout


def test_verify_warm_is_one_read(served: Path) -> None:
    report = json.loads(run_prewarm("verify", served, "--warm", "--json", check=True).stdout)
    assert report["ok"] and report["warm"]["complete"]
    assert report["warm"]["bytes_read"] == 0, "verify's own read left everything resident"


def test_evict_works_without_root(served_master: Path, shared_dir: Path) -> None:
    served = Path(shutil.copytree(served_master, shared_dir / "served"))
    warm(served)
    proc = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "prewarm", "evict", str(served)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert residency(served).resident_bytes == 0
    assert_matches_fincore(served)


@pytest.fixture
def locked(served: Path) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "prewarm", "warm", str(served), "--lock", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        start_new_session=True,
    )
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=30)


def _vm_locked(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmLck:"))


def test_lock_holds_pages_until_sigterm(served: Path, locked: subprocess.Popen[str]) -> None:
    assert locked.stdout is not None
    summary = json.loads(_read_json_object(locked.stdout))
    assert summary["complete"] and summary["locked_bytes"] >= summary["total_bytes"]
    deadline = time.monotonic() + 30
    while _vm_locked(locked.pid) < summary["total_bytes"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _vm_locked(locked.pid) >= summary["total_bytes"]
    evict(served)
    assert residency(served).complete, "locked pages survive eviction"
    locked.send_signal(signal.SIGTERM)
    _, stderr = locked.communicate(timeout=30)
    assert locked.returncode == 0 and "Released." in stderr
    evict(served)
    assert residency(served).resident_bytes == 0


def _read_json_object(stream) -> str:  # type: ignore[no-untyped-def]
    lines = []
    for line in stream:
        lines.append(line)
        if line.rstrip() == "}":
            return "".join(lines)
    raise AssertionError(f"no JSON summary: {''.join(lines)}")


def test_lock_and_release_in_process(served: Path) -> None:
    with PageLock(served) as held:
        assert held.locked_bytes >= residency(served).total_bytes
        assert _vm_locked(os.getpid()) >= residency(served).total_bytes
        assert residency(served).complete
    assert _vm_locked(os.getpid()) == 0


def test_a_small_lock_limit_is_said_up_front(served: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to drop CAP_IPC_LOCK")
    proc = subprocess.run(
        [
            "setpriv",
            "--inh-caps=-ipc_lock",
            "--bounding-set=-ipc_lock",
            "prlimit",
            "--memlock=65536",
            sys.executable,
            "-m",
            "prewarm",
            "warm",
            str(served),
            "--lock",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
        check=False,
    )
    assert_clean_failure(proc, 5, "locking needs", "memory lock limit (RLIMIT_MEMLOCK) is 65.54 kB")
    assert "ulimit -l" in proc.stderr and "LimitMEMLOCK=infinity" in proc.stderr


def test_pages_dropped_while_warming_are_read_again(served: Path) -> None:
    names = serving_files(served).names
    first = served / names[0]
    total = residency(served).total_bytes

    class Pressure:
        """Plays the kernel under memory pressure: drops the first shard once the last piece is in."""

        done = 0

        def start(self, label: str, total: int) -> None:
            self.total = total

        def advance(self, n: int) -> None:
            self.done += n
            if self.done == self.total:
                evict_path(first)

        def finish(self) -> None:
            pass

    result = warm(served, threads=1, progress=Pressure())
    assert result.after.complete
    assert result.bytes_read >= total + first.stat().st_size - PAGE_SIZE
