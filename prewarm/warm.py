"""Warm a serving directory into the page cache, measure residency, evict, and lock.

The daemon's page-cache stage: ``warm`` reads only what is not resident yet (large parallel
reads, in model order), then measures the result; ``PageLock`` keeps files resident for as long
as its owner holds it.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from prewarm.checkpoint import MANIFEST_NAME
from prewarm.confine import NotRegular, Root, Skipped, open_regular, resolve_regular, root_of
from prewarm.errors import ExitCode, FilesystemError, PrewarmError
from prewarm.fsutil import os_error
from prewarm.manifest import list_files, parallel_map, read_file_range
from prewarm.pagecache import (
    PAGE_SIZE,
    Mapping,
    evict_fd,
    fd_resident_bytes,
    has_capability,
    lock_mapping,
    map_fd,
    mapped,
    missing_ranges,
    pages,
    residency_vector,
    unlock_mapping,
)
from prewarm.progress import NoProgress, Progress
from prewarm.units import format_size

log = logging.getLogger(__name__)
# Each task reads one segment of up to 1 GiB front to back (read_file_range): as fast to warm as
# 64 MiB pieces, or as faulting pages in with MADV_POPULATE_READ, and the cache it leaves is read
# back through an mmap 2x faster (measured here; see read_file_range).
SEGMENT = 2**30
_CAP_IPC_LOCK = 14  # capabilities(7): lets a process lock memory past RLIMIT_MEMLOCK


@dataclass(frozen=True)
class FileResidency:
    name: str
    bytes: int
    resident_bytes: int | None  # None: the kernel will not say (a file we neither own nor may write)


@dataclass(frozen=True)
class Residency:
    directory: Path
    files: tuple[FileResidency, ...]
    skipped: tuple[Skipped, ...] = ()  # not regular files, or symlinks leading outside: never opened

    @property
    def total_bytes(self) -> int:
        return sum(f.bytes for f in self.files)

    @property
    def resident_bytes(self) -> int:
        """Bytes known to be resident (files of unknown residency count as none)."""
        return sum(f.resident_bytes or 0 for f in self.files)

    @property
    def unknown_bytes(self) -> int:
        return sum(f.bytes for f in self.files if f.resident_bytes is None)

    @property
    def complete(self) -> bool:
        """Every file whose residency can be measured is wholly resident."""
        return self.resident_bytes == self.total_bytes - self.unknown_bytes


@dataclass(frozen=True)
class WarmResult:
    before: Residency
    after: Residency
    bytes_read: int
    seconds: float
    budget: int
    limited_by_memory: bool  # the model did not fit: only what fits was warmed, in model order


@dataclass
class MemoryLockLimit(PrewarmError):
    """RLIMIT_MEMLOCK is below what locking needs."""

    exit_code: ExitCode = ExitCode.LIMIT


@dataclass(frozen=True)
class ServingFiles:
    root: Root
    names: tuple[str, ...]  # weights first in file-name (model) order, then the small files
    skipped: tuple[Skipped, ...]


def serving_files(directory: Path) -> ServingFiles:
    """The files to keep hot, and what is there but will not be opened (FIFOs, outside symlinks)."""
    root = root_of(directory)
    listing = list_files(root)
    names = list(listing.files)
    skipped = list(listing.skipped)
    try:
        resolve_regular(root, MANIFEST_NAME)
        names.append(MANIFEST_NAME)
    except FileNotFoundError:
        pass
    except NotRegular as why:
        skipped.append(Skipped(MANIFEST_NAME, why.reason))
    return ServingFiles(root, tuple(sorted(names, key=lambda n: (not n.endswith(".safetensors"), n))), tuple(skipped))


def residency(directory: Path, files: ServingFiles | None = None) -> Residency:
    """Bytes resident per file (cachestat(2), or mincore(2) where the kernel lacks it)."""
    files = files or serving_files(directory)
    measured = []
    for name in files.names:
        with _opened(files.root, name) as fd:
            measured.append(FileResidency(name, *fd_resident_bytes(fd, files.root.path(name))))
    return Residency(directory, tuple(measured), files.skipped)


@contextmanager
def _opened(root: Root, name: str) -> Iterator[int]:
    """The file open for reading; its failures as one-line errors naming it."""
    path = root.path(name)
    try:
        fd = open_regular(root, name)
    except FileNotFoundError:
        raise FilesystemError("disappeared while prewarm was working on it", str(path), hint=_AGAIN) from None
    except NotRegular as why:
        raise FilesystemError(f"replaced while prewarm was working on it: {why.reason}", str(path), hint=_AGAIN) from None
    except OSError as exc:
        raise os_error(exc, path) from exc
    try:
        yield fd
    except OSError as exc:
        raise os_error(exc, path) from exc
    finally:
        os.close(fd)


_AGAIN = "run again when nothing is changing the directory"


def memory_available() -> int:
    """MemAvailable from /proc/meminfo: what the page cache can grow into without swapping."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def default_budget() -> int:
    """Leave a tenth of available memory (at least 512 MiB) for everything else."""
    available = memory_available()
    return max(0, available - max(available // 10, 512 * 2**20))


def warm(directory: Path, threads: int | None = None, progress: Progress | None = None, budget: int | None = None) -> WarmResult:
    """Read every non-resident page of ``directory``'s files into the page cache, then measure.
    Files whose residency the kernel will not report are read whole."""
    progress = progress or NoProgress()
    started = time.perf_counter()
    files = serving_files(directory)
    before, work = _plan_reads(directory, files)
    origin = "available memory less a tenth" if budget is None else "the budget given"
    budget = default_budget() if budget is None else budget
    needed = sum(piece.length for piece in work)
    limited = needed > budget
    if limited:
        log.warning(
            "%s needs %s more in the page cache but only %s fits (%s): warming what fits, in model order",
            directory,
            format_size(needed),
            format_size(budget),
            origin,
        )
        work = _trim(work, budget)
    progress.start("warming", sum(piece.length for piece in work))
    read = _read_pieces(files.root, work, threads, progress)
    progress.finish()
    after = residency(directory, files)
    if not after.complete and not limited:
        # Under memory pressure the kernel may drop pages read early (they sit on the inactive
        # LRU list) while later ones come in: read what went missing once more, then measure.
        _, missing = _plan_reads(directory, files, measurable_only=True)
        read += _read_pieces(files.root, missing, threads, NoProgress())
        after = residency(directory, files)
    return WarmResult(before, after, read, time.perf_counter() - started, budget, limited)


@dataclass(frozen=True)
class _Piece:
    name: str
    offset: int
    length: int
    exact: bool = False  # cut short by the budget: read no page past it


def _read_pieces(root: Root, work: list[_Piece], threads: int | None, progress: Progress) -> int:
    if not work:
        return 0
    return sum(parallel_map(lambda piece, guarded: _read_piece(root, piece, guarded), work, threads, progress, "prewarm-warm"))


def _plan_reads(directory: Path, files: ServingFiles, measurable_only: bool = False) -> tuple[Residency, list[_Piece]]:
    """Residency now, and the segments to read: only where pages are missing (mincore), or the whole
    file where residency is unknown. The small files come first (they cost nothing and every loader
    needs them), then weights in model order."""
    before = residency(directory, files)
    work = []
    for f in before.files:
        if f.resident_bytes == f.bytes or (f.resident_bytes is None and measurable_only):
            continue
        ranges = [(0, f.bytes)]
        if f.resident_bytes is not None:
            with _opened(files.root, f.name) as fd, mapped(fd, files.root.path(f.name)) as mapping:
                ranges = missing_ranges(residency_vector(mapping), mapping.size)
        for offset, length in ranges:
            work += [_Piece(f.name, o, min(SEGMENT, offset + length - o)) for o in range(offset, offset + length, SEGMENT)]
    small_first = sorted(work, key=lambda piece: piece.name.endswith(".safetensors"))  # stable: weights keep model order
    return before, small_first


def _trim(work: list[_Piece], budget: int) -> list[_Piece]:
    """The longest prefix of ``work`` that fits in ``budget`` bytes (the last segment cut short)."""
    kept, total = [], 0
    for piece in work:
        take = min(piece.length, (budget - total) // PAGE_SIZE * PAGE_SIZE)
        if take <= 0:
            break
        kept.append(_Piece(piece.name, piece.offset, take, exact=take < piece.length))
        total += take
    return kept


def _read_piece(root: Root, piece: _Piece, progress: Progress) -> int:
    with _opened(root, piece.name) as fd:
        got = read_file_range(fd, piece.offset, piece.length, lambda view: progress.advance(len(view)), piece.exact)
    if got != piece.length:
        end = piece.offset + piece.length
        raise FilesystemError(f"changed while being warmed: shorter than {end} bytes", str(root.path(piece.name)), hint=_AGAIN)
    return got


def evict(directory: Path) -> tuple[Residency, Residency]:
    """Drop ``directory``'s pages from the page cache; (before, after) residency."""
    files = serving_files(directory)
    before = residency(directory, files)
    for name in files.names:
        with _opened(files.root, name) as fd:
            evict_fd(fd)
    return before, residency(directory, files)


def can_lock_unlimited() -> bool:
    return has_capability(_CAP_IPC_LOCK)


def check_lock_limit(needed: int) -> None:
    """Refuse up front, with the number needed, when RLIMIT_MEMLOCK cannot hold ``needed`` bytes."""
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY or soft >= needed or can_lock_unlimited():
        return
    kib = -(-needed // 1024)
    raise MemoryLockLimit(
        f"locking needs {format_size(needed)} but the memory lock limit (RLIMIT_MEMLOCK) is {format_size(soft)}",
        hint=f"raise it: `ulimit -l {kib}` (or unlimited) in the shell, LimitMEMLOCK=infinity in the systemd "
        "unit, or memlock in /etc/security/limits.conf",
    )


class PageLock:
    """Files of a directory locked in memory (mlock) until ``release``; the daemon owns one."""

    def __init__(self, directory: Path, progress: Progress | None = None) -> None:
        files = serving_files(directory)
        self.mappings: list[Mapping] = []
        try:
            for name in files.names:
                with _opened(files.root, name) as fd:
                    self.mappings.append(map_fd(fd, files.root.path(name)))
        except BaseException:
            self.release()
            raise
        self.locked_bytes = sum(pages(m.size) * PAGE_SIZE for m in self.mappings)
        check_lock_limit(self.locked_bytes)
        progress = progress or NoProgress()
        progress.start("locking", sum(m.size for m in self.mappings))
        try:
            for mapping in self.mappings:
                try:
                    lock_mapping(mapping)
                except OSError as exc:
                    raise os_error(exc, mapping.path) from exc
                progress.advance(mapping.size)
        except BaseException:
            self.release()
            raise
        finally:
            progress.finish()

    def release(self) -> None:
        for mapping in self.mappings:
            unlock_mapping(mapping)
            mapping.close()
        self.mappings.clear()

    def __enter__(self) -> PageLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
