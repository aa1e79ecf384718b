"""The page cache: residency (mincore), warming, eviction (fadvise) and locking (mlock).

Residency is mincore(2) on a shared read-only mapping of the file, as vmtouch and fincore
measure it. The kernel reports every page resident for a file the caller can neither own nor
write (a guard against cache side channels, see mincore(2)), so residency is exact only for
files we own or can write.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_PROT_READ = 0x1
_MAP_SHARED = 0x01
_MAP_FAILED = ctypes.c_void_p(-1).value

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.munlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.syscall.restype = ctypes.c_long


def _check(result: int, what: str, path: Path) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", str(path))


def pages(size: int) -> int:
    return -(-size // PAGE_SIZE)


@dataclass
class Mapping:
    """A read-only shared mapping of a whole file (``address`` is None for an empty file)."""

    path: Path
    size: int
    address: int | None

    def close(self) -> None:
        if self.address is not None:
            _libc.munmap(self.address, self.size)
            self.address = None


@contextmanager
def mapped(fd: int, path: Path) -> Iterator[Mapping]:
    mapping = map_fd(fd, path)
    try:
        yield mapping
    finally:
        mapping.close()


def map_fd(fd: int, path: Path) -> Mapping:
    """Map the whole file open at ``fd`` (the caller may close ``fd``: the mapping keeps the file)."""
    size = os.fstat(fd).st_size
    if size == 0:
        return Mapping(path, 0, None)
    address = _libc.mmap(None, size, _PROT_READ, _MAP_SHARED, fd, 0)
    if address in (None, _MAP_FAILED):
        _check(-1, "mmap", path)
    return Mapping(path, size, address)


def residency_vector(mapping: Mapping) -> bytes:
    """One byte per page; bit 0 set where the page is in the page cache."""
    if mapping.address is None:
        return b""
    vector = (ctypes.c_ubyte * pages(mapping.size))()
    _check(_libc.mincore(mapping.address, mapping.size, vector), "mincore", mapping.path)
    return bytes(vector)


_LOW_BIT = bytes(i & 1 for i in range(256))  # mincore's other bits are reserved


def resident_bytes(vector: bytes, size: int) -> int:
    """Bytes of a ``size``-byte file that the resident pages hold (the last page may be partial)."""
    count = vector.translate(_LOW_BIT).count(1)
    if vector and vector[-1] & 1 and size % PAGE_SIZE:
        return count * PAGE_SIZE - (PAGE_SIZE - size % PAGE_SIZE)
    return count * PAGE_SIZE


def missing_ranges(vector: bytes, size: int, merge_gap: int = 256) -> list[tuple[int, int]]:
    """(offset, length) byte ranges of non-resident pages; runs fewer than ``merge_gap`` pages
    apart become one range, since one large read beats many small ones."""
    runs: list[list[int]] = []
    for match in re.finditer(rb"\x00+", vector.translate(_LOW_BIT)):
        if runs and match.start() - runs[-1][1] < merge_gap:
            runs[-1][1] = match.end()
        else:
            runs.append([match.start(), match.end()])
    return [(start * PAGE_SIZE, min(end * PAGE_SIZE, size) - start * PAGE_SIZE) for start, end in runs]


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


_SYS_CACHESTAT = 451  # cachestat(2), Linux 6.5+; the same number on every architecture
_cachestat_works = True


def cached_pages(fd: int, offset: int = 0, length: int = 0) -> int | None:
    """Pages of the range in the page cache, counted by the kernel (cachestat(2): microseconds for
    gigabytes, where mincore must fill a byte per page); None where unsupported or refused."""
    global _cachestat_works
    if not _cachestat_works:
        return None
    stat = _Cachestat()
    if _libc.syscall(_SYS_CACHESTAT, fd, ctypes.byref(_CachestatRange(offset, length)), ctypes.byref(stat), 0) == 0:
        return int(stat.nr_cache)
    if ctypes.get_errno() == errno.ENOSYS:
        _cachestat_works = False
    return None


def measurable(fd: int) -> bool:
    """Whether the kernel tells us the truth about this file's pages: mincore(2) and cachestat(2)
    do only for a file the caller owns or may write (else mincore says every page is resident and
    cachestat refuses), see mm/mincore.c can_do_mincore."""
    st = os.fstat(fd)
    if st.st_uid == os.geteuid() or has_capability(_CAP_FOWNER):
        return True
    return os.access(f"/proc/self/fd/{fd}", os.W_OK, effective_ids=True)


_CAP_FOWNER = 3  # capabilities(7)


def has_capability(bit: int) -> bool:
    with open("/proc/self/status") as f:
        caps = next(line for line in f if line.startswith("CapEff:"))
    return bool(int(caps.split()[1], 16) >> bit & 1)


def fd_resident_bytes(fd: int, path: Path) -> tuple[int, int | None]:
    """(size, resident bytes) of the file open at ``fd``: cachestat where it can, else mincore;
    None where the kernel would not tell the truth (see ``measurable``)."""
    size = os.fstat(fd).st_size
    if not measurable(fd):
        return size, None
    whole = cached_pages(fd)
    if whole is not None:
        resident = whole * PAGE_SIZE
        if size % PAGE_SIZE and cached_pages(fd, size - size % PAGE_SIZE, PAGE_SIZE):
            resident -= PAGE_SIZE - size % PAGE_SIZE
        return size, max(0, min(resident, size))  # a folio left past a shrunken EOF is not the file's
    with mapped(fd, path) as mapping:
        return mapping.size, resident_bytes(residency_vector(mapping), mapping.size)


def evict_fd(fd: int) -> None:
    """Drop a file's clean pages from the cache: fdatasync (dirty pages cannot be dropped), then
    posix_fadvise(DONTNEED), which needs no privilege. Pages mapped or locked elsewhere stay."""
    with contextlib.suppress(OSError):  # EBADF/EINVAL on a read-only descriptor of some filesystems
        os.fdatasync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def lock_mapping(mapping: Mapping) -> None:
    """mlock(2) the whole mapping: faults every page in and keeps it resident until unlocked."""
    if mapping.address is not None:
        _check(_libc.mlock(mapping.address, mapping.size), "mlock", mapping.path)


def unlock_mapping(mapping: Mapping) -> None:
    if mapping.address is not None:
        _libc.munlock(mapping.address, mapping.size)
