"""reshard when the source changes under it, when another run shares the destination, and at scale."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from prewarm.errors import FilesystemError
from prewarm.reshard import reshard
from prewarm.verify import verify_directory
from tests.helpers import ROOT, listing, run_prewarm, write_raw_safetensors

SHARDS = ["model-00001-of-00004.safetensors", "model-00002-of-00004.safetensors", "model-00003-of-00004.safetensors"]


class _AfterBytes:
    """A progress sink that runs ``act`` once, when the copy has passed ``after`` bytes."""

    def __init__(self, after: int, act: Callable[[], None]) -> None:
        self.after, self.act, self.done, self.fired = after, act, 0, False

    def start(self, label: str, total: int) -> None:
        pass

    def advance(self, n: int) -> None:
        self.done += n
        if not self.fired and self.done > self.after:
            self.fired = True
            self.act()

    def finish(self) -> None:
        pass


def _replace_by_rename(path: Path) -> None:
    """Same size, other bytes, a new inode: what `mv new old` does."""
    fresh = path.with_name(path.name + ".new")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    fresh.write_bytes(bytes(data))
    os.replace(fresh, path)


def _overwrite_in_place(path: Path) -> None:
    """Same size, same inode, other bytes: what a careless `dd conv=notrunc` does."""
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size - 1)
        last = f.read(1)
        f.seek(path.stat().st_size - 1)
        f.write(bytes([last[0] ^ 0xFF]))


def _longer_tokenizer(src: Path) -> Callable[[], None]:
    def act() -> None:
        fresh = src / "tokenizer.json.new"
        fresh.write_bytes((src / "tokenizer.json").read_bytes() + b" " * 4096)
        os.replace(fresh, src / "tokenizer.json")

    return act


@pytest.mark.parametrize(
    "change",
    ["rename a shard not read yet", "overwrite the shard being read", "overwrite a shard already copied", "longer tokenizer"],
)
def test_a_source_changed_during_reshard_fails_and_leaves_nothing(model_copy: Path, tmp_path: Path, change: str) -> None:
    acts = {
        "rename a shard not read yet": lambda: _replace_by_rename(model_copy / SHARDS[2]),
        "overwrite the shard being read": lambda: _overwrite_in_place(model_copy / SHARDS[0]),
        "overwrite a shard already copied": lambda: _overwrite_in_place(model_copy / SHARDS[0]),
        "longer tokenizer": _longer_tokenizer(model_copy),
    }
    after = 2_000_000 if change == "overwrite a shard already copied" else 1000
    out = tmp_path / "out"
    out.mkdir()
    progress = _AfterBytes(after, acts[change])
    with pytest.raises(FilesystemError, match="changed while being resharded"):
        reshard(model_copy, out / "dst", 1_000_000, progress)
    assert progress.fired
    assert listing(out) == [], "no destination and no temp directory"


def test_reading_the_source_is_not_a_change(model_copy: Path, tmp_path: Path) -> None:
    progress = _AfterBytes(1000, lambda: (model_copy / SHARDS[2]).read_bytes())
    result = reshard(model_copy, tmp_path / "dst", 1_000_000, progress)
    assert progress.fired and verify_directory(result.destination).ok


def test_a_live_run_in_another_pid_namespace_keeps_its_temp_directory(tiny_model: Path, tmp_path: Path) -> None:
    """A container on the same volume: its pid means nothing here, its lock does."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs unshare(1) and root for a new PID namespace")
    dst = tmp_path / "dst"
    holder_code = (
        "import sys; from pathlib import Path; from prewarm.fsutil import atomic_directory\n"
        "with atomic_directory(Path(sys.argv[1])) as temp:\n"
        "    (temp / 'written-by-the-other-run').write_text('x')\n"
        "    print(temp, flush=True)\n"
        "    sys.stdin.read()\n"
    )
    holder = subprocess.Popen(
        ["unshare", "--pid", "--fork", sys.executable, "-c", holder_code, str(dst)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert holder.stdout is not None
        temp = Path(holder.stdout.readline().strip())
        assert temp.parent == tmp_path and (temp / "written-by-the-other-run").exists()
        run_prewarm("-q", "reshard", tiny_model, dst, check=True)
        assert (temp / "written-by-the-other-run").exists(), "a live run's temp directory was taken for stale"
        assert verify_directory(dst).ok
    finally:
        _, stderr = holder.communicate("", timeout=30)
    assert "already exists" in stderr, "the other run finds the destination taken and gives up cleanly"
    assert listing(tmp_path) == ["dst"]


def test_a_dead_runs_temp_directory_is_removed_by_the_next_run(tiny_model: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    code = (
        "import os, sys; from pathlib import Path; from prewarm.fsutil import atomic_directory\n"
        "with atomic_directory(Path(sys.argv[1])) as temp:\n"
        "    print(temp, flush=True); os.kill(os.getpid(), 9)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(dst)], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    temp = Path(proc.stdout.strip())
    assert proc.returncode == -9 and temp.is_dir()
    (tmp_path / ".dst.prewarm-99999999999999999999999.tmp").mkdir()  # an old-style name with a huge pid: left alone
    run_prewarm("-q", "reshard", tiny_model, dst, check=True)
    assert not temp.exists()
    assert sorted(listing(tmp_path)) == [".dst.prewarm-99999999999999999999999.tmp", "dst"]


def test_a_240_byte_destination_name_fits(tiny_model: Path, tmp_path: Path) -> None:
    dst = tmp_path / ("d" * 240)
    proc = run_prewarm("-q", "reshard", tiny_model, dst)
    assert proc.returncode == 0, proc.stderr
    assert verify_directory(dst).ok


def test_thousands_of_source_files_fit_a_small_descriptor_limit(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3000):
        header = {f"layer.{i}.w": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]}}
        write_raw_safetensors(src / f"part-{i:05d}.safetensors", header, bytes([i % 256]) * 8)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        ["prlimit", "--nofile=256", sys.executable, "-m", "prewarm", "-q", "reshard", str(src), str(tmp_path / "dst")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert verify_directory(tmp_path / "dst").ok


def test_a_repo_like_relative_path_is_a_path_not_a_repo_id(tiny_model: Path, tmp_path: Path) -> None:
    (tmp_path / "cache").mkdir()
    shutil.copytree(tiny_model, tmp_path / "cache" / "tiny")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = run_prewarm("-q", "reshard", "./cache/tiny", "out", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    missing = run_prewarm("-q", "reshard", "./cache/none", "out2", cwd=tmp_path, env=env)
    assert missing.returncode == 4 and "cache/none: no such file or directory" in missing.stderr, missing.stderr
