"""Ctrl-C and SIGTERM stop the reading stages within moments, even mid-file: every worker thread
stops at its next 16 MiB buffer instead of finishing the files it had started.

The reads are slowed down by a progress sink that sleeps (a slow disk, deterministically); the
signals are real, sent to this process while its worker threads read."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from prewarm.cli import _sigterm, _Terminated
from prewarm.confine import root_of
from prewarm.manifest import build_manifest, digest_files, write_manifest
from prewarm.verify import verify_directory
from prewarm.warm import evict, warm

STEP = 0.2  # seconds a 16 MiB buffer takes on our "slow disk"


class SlowDisk:
    def __init__(self) -> None:
        self.buffers = 0

    def start(self, label: str, total: int) -> None:
        pass

    def advance(self, n: int) -> None:
        self.buffers += 1
        time.sleep(STEP)

    def finish(self) -> None:
        pass


@pytest.fixture(scope="module")
def slow_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("slow")
    for i in range(2):
        with open(directory / f"model-0000{i + 1}-of-00002.safetensors", "wb") as f:
            f.truncate(256 * 2**20)  # 16 buffers each: 3.2 s a file on the slow disk
    write_manifest(directory, build_manifest(directory).manifest)
    return directory


@pytest.fixture(params=[signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def signum(request: pytest.FixtureRequest) -> Iterator[int]:
    previous = signal.signal(signal.SIGTERM, _sigterm)  # what the CLI installs
    yield request.param
    signal.signal(signal.SIGTERM, previous)


STAGES: dict[str, Callable[[Path, SlowDisk], object]] = {
    "verify": lambda d, p: verify_directory(d, threads=2, progress=p),
    "warm": lambda d, p: warm(d, threads=2, progress=p),
    "manifest": lambda d, p: digest_files(root_of(d), [f.name for f in d.glob("*.safetensors")], threads=2, progress=p),
}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_signal_stops_every_reader_at_its_next_buffer(slow_dir: Path, stage: str, signum: int) -> None:
    evict(slow_dir)  # so warm has everything to read
    disk = SlowDisk()
    sent = []
    timer = threading.Timer(1.0, lambda: (sent.append(time.monotonic()), os.kill(os.getpid(), signum)))
    timer.start()
    try:
        with pytest.raises((KeyboardInterrupt, _Terminated)):
            STAGES[stage](slow_dir, disk)
    finally:
        timer.cancel()
        evict(slow_dir)
    stopped = time.monotonic() - sent[0]
    assert stopped < 2 * STEP + 0.3, f"took {stopped:.2f} s after the signal to stop"
    assert disk.buffers < 32 / 2, "the readers did not carry on to the end of their files"
    assert not [t for t in threading.enumerate() if t.name.startswith("prewarm-")], "reader threads left running"
