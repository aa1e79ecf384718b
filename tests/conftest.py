from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from prewarm.synthetic import build_tiny_qwen2, write_qwen25_7b_like


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real Qwen2 checkpoint (random weights, 4 shards, tokenizer, chat template). Do not modify."""
    return build_tiny_qwen2(tmp_path_factory.mktemp("tiny") / "model", max_shard_size="1MB")


@pytest.fixture(scope="session")
def synthetic_7b_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen2.5-7B names and dtypes at scale 0.05 (~186 MB, 4 shards). Do not modify."""
    directory = tmp_path_factory.mktemp("syn") / "model"
    write_qwen25_7b_like(directory, scale=0.05)
    return directory


@pytest.fixture
def model_copy(tiny_model: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny model that a test may break."""
    return Path(shutil.copytree(tiny_model, tmp_path / "src"))


@pytest.fixture(autouse=True)
def no_leaked_threads() -> object:
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive() and not t.daemon]
    for t in leaked:
        t.join(timeout=5)
    assert not [t for t in leaked if t.is_alive()], f"leaked threads: {leaked}"


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A root-owned 0755 directory outside pytest's private tmp, so another user can reach it."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to another user (CI and the dev machines run as root)")
    shared = Path("/tmp") / f"prewarm-shared-{os.getpid()}"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    yield shared
    shutil.rmtree(shared)
