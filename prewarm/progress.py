"""How long-running stages report progress: a small protocol, and the renderers for people.

Stages call ``start``/``advance``/``finish``; they never print. The renderers here write to
stderr: a tqdm bar on a terminal, or a plain line every 10% (readable in journald and CI logs).
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, Protocol

import click

from prewarm.units import format_size


class Progress(Protocol):
    """Byte-counting progress; ``advance`` may be called from several threads at once."""

    def start(self, label: str, total: int) -> None: ...

    def advance(self, n: int) -> None: ...

    def finish(self) -> None: ...


class NoProgress:
    def start(self, label: str, total: int) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def finish(self) -> None:
        pass


class PlainProgress:
    """One line on stderr every 10% of work that lasts over a second: readable in journald and CI logs."""

    def __init__(self, quiet_seconds: float = 1.0) -> None:
        self.quiet_seconds = quiet_seconds
        self.lock = threading.Lock()
        self.label, self.total, self.done, self.next_mark, self.started = "", 0, 0, 0.1, 0.0

    def start(self, label: str, total: int) -> None:
        self.label, self.total, self.done, self.next_mark = label, total, 0, 0.1
        self.started = time.perf_counter()

    def advance(self, n: int) -> None:
        with self.lock:
            self.done += n
            elapsed = time.perf_counter() - self.started
            if self.total and self.done / self.total >= self.next_mark and elapsed >= self.quiet_seconds:
                pct = int(self.done * 100 / self.total)
                self.next_mark = (pct // 10 + 1) / 10
                rate = self.done / elapsed
                click.echo(
                    f"{self.label}: {pct}% ({format_size(self.done)} of {format_size(self.total)}, {format_size(rate)}/s)",
                    err=True,
                )

    def finish(self) -> None:
        pass


class BarProgress:
    """A tqdm bar on a terminal (tqdm comes with huggingface_hub)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bar: Any = None

    def start(self, label: str, total: int) -> None:
        from tqdm import tqdm

        self.finish()
        self.bar = tqdm(
            total=total,
            desc=label,
            unit="B",
            unit_scale=True,
            unit_divisor=1000,
            file=sys.stderr,
            dynamic_ncols=True,
            leave=False,
        )

    def advance(self, n: int) -> None:
        with self.lock:
            if self.bar is not None:
                self.bar.update(n)

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class TrackedProgress:
    """Progress that can be read from elsewhere (the daemon's status, its start-timeout extension),
    passing each call on to ``inner`` (the daemon's log lines)."""

    def __init__(self, inner: Progress | None = None) -> None:
        self.inner = inner or NoProgress()
        self.lock = threading.Lock()
        self.label, self.total, self.done = "", 0, 0

    def start(self, label: str, total: int) -> None:
        with self.lock:
            self.label, self.total, self.done = label, total, 0
        self.inner.start(label, total)

    def advance(self, n: int) -> None:
        with self.lock:
            self.done += n
        self.inner.advance(n)

    def finish(self) -> None:
        self.inner.finish()

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {"label": self.label, "done_bytes": self.done, "total_bytes": self.total}


class Cancelled(BaseException):
    """Raised in a worker thread once the work was called off: it stops at its next buffer."""


class CancellableProgress:
    """Forwards progress, and raises Cancelled in the worker that reports after ``cancel`` is set:
    how Ctrl-C stops a stage's readers, and how a stopping daemon stops a stage in its executor."""

    def __init__(self, progress: Progress, cancel: threading.Event) -> None:
        self.progress, self.cancel = progress, cancel

    def start(self, label: str, total: int) -> None:
        self.progress.start(label, total)

    def advance(self, n: int) -> None:
        if self.cancel.is_set():
            raise Cancelled()
        self.progress.advance(n)

    def finish(self) -> None:
        self.progress.finish()
