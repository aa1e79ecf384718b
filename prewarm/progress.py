"""How long-running stages report progress: a small protocol the CLI and the daemon implement."""

from __future__ import annotations

from typing import Protocol


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
