"""Every failure a user can cause or meet, as one exception family.

Library code raises these with structured fields; only ``cli.py`` turns them into a
one-line message and an exit code.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    CHECK_FAILED = 1  # verify found problems: the command worked, the data did not
    USAGE = 2  # bad arguments or options (click uses 2 as well)
    BAD_INPUT = 3  # the checkpoint or directory given is not what it should be
    IO = 4  # the filesystem said no: disk full, permission, missing path
    LIMIT = 5  # a system limit is too small (RLIMIT_MEMLOCK for --lock)
    ENGINE = 6  # the vLLM engine could not start or died
    INTERRUPTED = 130  # Ctrl-C or SIGTERM
    INTERNAL = 70  # a bug in prewarm (EX_SOFTWARE): the message says how to report it
    BROKEN_PIPE = 141  # whoever read our output stopped reading (128 + SIGPIPE), as Unix tools exit


@dataclass
class PrewarmError(Exception):
    """Base class: ``message`` says what is wrong, ``hint`` what to do next."""

    message: str
    path: str | None = None
    hint: str | None = None
    exit_code: ExitCode = ExitCode.BAD_INPUT

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"{where}{self.message}"


@dataclass
class InvalidCheckpoint(PrewarmError):
    """A safetensors file, index or model directory that breaks the format."""


@dataclass
class UsageError(PrewarmError):
    exit_code: ExitCode = ExitCode.USAGE


@dataclass
class FilesystemError(PrewarmError):
    exit_code: ExitCode = ExitCode.IO


@dataclass
class DestinationExists(FilesystemError):
    pass


@dataclass
class NotEnoughSpace(FilesystemError):
    needed: int = 0
    available: int = 0


@dataclass
class ManifestError(PrewarmError):
    """A manifest that is missing, unreadable or of an unknown format."""
