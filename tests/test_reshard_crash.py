"""The atomicity promise under real signals, a full disk and a directory we may not write."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from prewarm.verify import verify_directory
from tests.helpers import ROOT, assert_clean_failure, listing, run_prewarm


def _start_reshard(src: Path, dst: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "prewarm", "-q", "reshard", str(src), str(dst), "--max-shard-size", "60MB"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )


def _wait_for_temp(parent: Path, proc: subprocess.Popen[str], deadline: float = 30) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if any(p.name.endswith(".tmp") for p in parent.iterdir()):
            return
        if proc.poll() is not None:
            raise AssertionError(f"reshard ended before it started writing: {proc.communicate()}")
        time.sleep(0.001)
    raise AssertionError("reshard never created its temp directory")


@pytest.mark.parametrize("delay", [0.0, 0.02, 0.08, 0.2, 0.5])
def test_kill_9_leaves_no_destination_or_a_complete_one(synthetic_7b_small: Path, tmp_path: Path, delay: float) -> None:
    dst = tmp_path / "dst"
    proc = _start_reshard(synthetic_7b_small, dst)
    _wait_for_temp(tmp_path, proc)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    if dst.exists():
        assert verify_directory(dst).ok, "a destination that exists must be complete"
    else:
        run_prewarm("-q", "reshard", synthetic_7b_small, dst, "--max-shard-size", "60MB", check=True)
        assert verify_directory(dst).ok
    assert listing(tmp_path) == ["dst"], "the next run removes what a killed run left"


def test_sigterm_cleans_up_and_exits_130(synthetic_7b_small: Path, tmp_path: Path) -> None:
    proc = _start_reshard(synthetic_7b_small, tmp_path / "dst")
    _wait_for_temp(tmp_path, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    if proc.returncode == 0:  # it finished first: then it must be whole
        assert verify_directory(tmp_path / "dst").ok
        return
    assert proc.returncode == 130, stderr
    assert "Interrupted" in stderr and "Traceback" not in stderr
    assert listing(tmp_path) == []


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[callable]:  # type: ignore[valid-type]
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI and the dev machines run as root)")
    mounts: list[Path] = []

    def mount(options: str) -> Path:
        point = tmp_path / f"mnt{len(mounts)}"
        point.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], check=True)
        mounts.append(point)
        return point

    yield mount
    for point in mounts:
        subprocess.run(["umount", str(point)], check=False)


def test_not_enough_space_is_said_before_writing(tiny_model: Path, small_tmpfs) -> None:  # type: ignore[no-untyped-def]
    point = small_tmpfs("size=1m")
    proc = run_prewarm("reshard", tiny_model, point / "dst")
    assert_clean_failure(proc, 4, "needs 3.4", "is free")
    assert listing(point) == []


def test_disk_full_mid_write_cleans_up(tiny_model: Path, small_tmpfs) -> None:  # type: ignore[no-untyped-def]
    point = small_tmpfs("size=64m,nr_inodes=5")  # room for the bytes, not for every file
    proc = run_prewarm("reshard", tiny_model, point / "dst")
    assert_clean_failure(proc, 4, "the filesystem is full")
    assert listing(point) == []


def _as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "prewarm", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )


def test_unwritable_destination_is_one_line(tiny_model: Path, shared_dir: Path) -> None:
    src = Path(shutil.copytree(tiny_model, shared_dir / "src"))
    for f in src.iterdir():
        f.chmod(0o644)
    proc = _as_nobody("reshard", str(src), str(shared_dir / "dst"))
    assert_clean_failure(proc, 4, str(shared_dir), "permission denied")
    assert listing(shared_dir) == ["src"]


def test_unreadable_source_is_one_line(tiny_model: Path, shared_dir: Path) -> None:
    src = Path(shutil.copytree(tiny_model, shared_dir / "src"))
    out = shared_dir / "out"
    out.mkdir(mode=0o777)
    out.chmod(0o777)
    proc = _as_nobody("reshard", str(src), str(out / "dst"))  # transformers saves shards as 0600
    assert_clean_failure(proc, 4, "model-00001-of-00004.safetensors: permission denied")
    assert listing(out) == []
