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
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from prewarm.checkpoint import MANIFEST_NAME
from prewarm.errors import ExitCode, FilesystemError, PrewarmError
from prewarm.fsutil import os_error, require_directory
from prewarm.manifest import default_threads, list_files, read_file_range
from prewarm.pagecache import (
    PAGE_SIZE,
    Mapping,
    evict_file,
    file_resident_bytes,
    lock_mapping,
    map_file,
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
    resident_bytes: int


@dataclass(frozen=True)
class Residency:
    directory: Path
    files: tuple[FileResidency, ...]

    @property
    def total_bytes(self) -> int:
        return sum(f.bytes for f in self.files)

    @property
    def resident_bytes(self) -> int:
        return sum(f.resident_bytes for f in self.files)

    @property
    def complete(self) -> bool:
        return self.resident_bytes == self.total_bytes


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


def serving_files(directory: Path) -> list[str]:
    """The files to keep hot, weights first in file-name (model) order, then the small files."""
    require_directory(directory)
    names = list_files(directory) + ([MANIFEST_NAME] if (directory / MANIFEST_NAME).is_file() else [])
    return sorted(names, key=lambda n: (not n.endswith(".safetensors"), n))


def residency(directory: Path, names: list[str] | None = None) -> Residency:
    """Bytes resident per file (cachestat(2), or mincore(2) where the kernel lacks it)."""
    files = []
    for name in names if names is not None else serving_files(directory):
        with _as_prewarm_error(directory / name):
            files.append(FileResidency(name, *file_resident_bytes(directory / name)))
    return Residency(directory, tuple(files))


@contextmanager
def _as_prewarm_error(path: Path) -> Iterator[None]:
    try:
        yield
    except FileNotFoundError:
        raise FilesystemError("disappeared while being warmed", str(path)) from None
    except OSError as exc:
        raise os_error(exc, path) from exc


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
    """Read every non-resident page of ``directory``'s files into the page cache, then measure."""
    progress = progress or NoProgress()
    started = time.perf_counter()
    names = serving_files(directory)
    before, work = _plan_reads(directory, names)
    origin = "available memory less a tenth" if budget is None else "the budget given"
    budget = default_budget() if budget is None else budget
    needed = sum(length for _, _, length in work)
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
    progress.start("warming", sum(length for _, _, length in work))
    read = _read_pieces(directory, work, threads, progress)
    progress.finish()
    after = residency(directory, names)
    if not after.complete and not limited:
        # Under memory pressure the kernel may drop pages read early (they sit on the inactive
        # LRU list) while later ones come in: read what went missing once more, then measure.
        _, missing = _plan_reads(directory, names)
        read += _read_pieces(directory, missing, threads, NoProgress())
        after = residency(directory, names)
    return WarmResult(before, after, read, time.perf_counter() - started, budget, limited)


def _read_pieces(directory: Path, work: list[tuple[str, int, int]], threads: int | None, progress: Progress) -> int:
    if not work:
        return 0
    with ThreadPoolExecutor(threads or default_threads(), thread_name_prefix="prewarm-warm") as pool:
        return sum(pool.map(lambda item: _read_piece(directory, item, progress), work))


def _plan_reads(directory: Path, names: list[str]) -> tuple[Residency, list[tuple[str, int, int]]]:
    """Residency now, and the segments to read: only where pages are missing (mincore). The small
    files come first (they cost nothing and every loader needs them), then weights in model order."""
    before = residency(directory, names)
    work = []
    for f in before.files:
        if f.resident_bytes == f.bytes:
            continue
        with _as_prewarm_error(directory / f.name), mapped(directory / f.name) as mapping:
            vector = residency_vector(mapping)
        for offset, length in missing_ranges(vector, mapping.size):
            work += [(f.name, o, min(SEGMENT, offset + length - o)) for o in range(offset, offset + length, SEGMENT)]
    small_first = sorted(work, key=lambda item: item[0].endswith(".safetensors"))  # stable: weights keep model order
    return before, small_first


def _trim(work: list[tuple[str, int, int]], budget: int) -> list[tuple[str, int, int]]:
    """The longest prefix of ``work`` that fits in ``budget`` bytes (the last segment cut short)."""
    kept, total = [], 0
    for name, offset, length in work:
        take = min(length, (budget - total) // PAGE_SIZE * PAGE_SIZE)
        if take <= 0:
            break
        kept.append((name, offset, take))
        total += take
    return kept


def _read_piece(directory: Path, item: tuple[str, int, int], progress: Progress) -> int:
    name, offset, length = item
    path = directory / name
    with _as_prewarm_error(path):
        got = read_file_range(path, offset, length, lambda view: progress.advance(len(view)))
    if got != length:
        raise FilesystemError(f"changed while being warmed: shorter than {offset + length} bytes", str(path))
    return got


def evict(directory: Path) -> tuple[Residency, Residency]:
    """Drop ``directory``'s pages from the page cache; (before, after) residency."""
    names = serving_files(directory)
    before = residency(directory, names)
    for name in names:
        try:
            evict_file(directory / name)
        except OSError as exc:
            raise os_error(exc, directory / name) from exc
    return before, residency(directory, names)


def can_lock_unlimited() -> bool:
    with open("/proc/self/status") as f:
        caps = next(line for line in f if line.startswith("CapEff:"))
    return bool(int(caps.split()[1], 16) >> _CAP_IPC_LOCK & 1)


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
        names = serving_files(directory)
        sizes = {name: (directory / name).stat().st_size for name in names}
        self.locked_bytes = sum(pages(size) * PAGE_SIZE for size in sizes.values())
        check_lock_limit(self.locked_bytes)
        self.mappings: list[Mapping] = []
        progress = progress or NoProgress()
        progress.start("locking", sum(sizes.values()))
        try:
            for name in names:
                try:
                    mapping = map_file(directory / name)
                    self.mappings.append(mapping)
                    lock_mapping(mapping)
                except OSError as exc:
                    raise os_error(exc, directory / name) from exc
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
