"""The fetch destination DIR as descriptors: its lock, its partial downloads, the files put in it.

The destination may be writable by someone else, so nothing here follows a symlink found in it:
names below it are opened from a descriptor of it with O_NOFOLLOW at every step, and the partial
directory and the lock must be our own. Names a repo lists for prewarm's own files (the manifest
``verify`` trusts, ``.prewarm*``) or that would lead outside DIR are never written.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from prewarm.checkpoint import MANIFEST_NAME
from prewarm.confine import unsafe_name_reason
from prewarm.errors import FilesystemError
from prewarm.fsutil import is_regular_owned, os_error

LOCK_NAME = ".prewarm-fetch.lock"
PARTIAL_DIR = ".prewarm-partial"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PLANTED_HINT = "someone else can write this directory: remove that entry, find out who put it there, and run again"
log = logging.getLogger(__name__)


def is_reserved(name: str) -> bool:
    """A name only prewarm writes: the manifest verify trusts, and the fetch record, lock and partials."""
    parts = name.split("/")
    return parts[-1] == MANIFEST_NAME or any(p.startswith(".prewarm") for p in parts)


def name_problem(name: object) -> str | None:
    """Why ``name`` cannot be a file inside DIR: it leads outside, or is not text a path can hold."""
    reason = unsafe_name_reason(name)
    if reason is None and isinstance(name, str):
        try:
            name.encode()  # a lone surrogate (JSON can carry "\ud800") cannot be a file name or printed
        except UnicodeEncodeError:
            return "not valid text"
    return reason


# -- the destination, as descriptors ------------------------------------------------------------


@dataclass(frozen=True)
class Place:
    """DIR, its partial directory and its lock, as descriptors. Names below DIR are resolved from
    ``fd`` one step at a time without following a symlink. A download thread holds its own copies,
    so one left running after an interrupt still holds the lock: flock(2) belongs to the open file
    description and lasts until the last descriptor of it is closed."""

    directory: Path
    fd: int
    partials: int
    lock: int

    def dup(self) -> Place:
        return Place(self.directory, os.dup(self.fd), os.dup(self.partials), os.dup(self.lock))

    def close(self) -> None:
        for fd in (self.fd, self.partials, self.lock):
            os.close(fd)


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[Place]:
    """DIR with its lock held: one fetch at a time per directory (two would append to the same
    partial files). flock(2) waits for a live holder and dies with a killed one."""
    place = _open_place(directory)
    try:
        try:
            fcntl.flock(place.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("another prewarm fetch is writing %s; waiting for it", directory)
            fcntl.flock(place.lock, fcntl.LOCK_EX)
        yield place
    finally:
        place.close()


def _open_place(directory: Path) -> Place:
    """DIR (made if need be), its lock file and its ``.prewarm-partial``, the last two our own."""
    with contextlib.ExitStack() as undo:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            undo.callback(os.close, dfd)
            lock = _open_own(dfd, directory, LOCK_NAME, os.O_RDWR | os.O_CREAT, "lock file")
            undo.callback(os.close, lock)
            with contextlib.suppress(FileExistsError):
                os.mkdir(PARTIAL_DIR, 0o700, dir_fd=dfd)
            partials = _open_own(dfd, directory, PARTIAL_DIR, os.O_RDONLY | os.O_DIRECTORY, "directory")
            undo.callback(os.close, partials)
            os.fchmod(partials, 0o700)  # no one else may add or swap entries (older versions made it 0755)
        except OSError as exc:
            raise os_error(exc, directory) from exc
        undo.pop_all()
    return Place(directory, dfd, partials, lock)


def _open_own(dfd: int, directory: Path, name: str, flags: int, kind: str) -> int:
    """DIR/name opened without following a symlink (O_NOFOLLOW), and checked to be our own ``kind``."""
    try:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR, errno.EISDIR):
            raise
        fd = -1
    st = os.fstat(fd) if fd >= 0 else os.stat(name, dir_fd=dfd, follow_symlinks=False)
    is_kind = stat.S_ISDIR if flags & os.O_DIRECTORY else stat.S_ISREG
    if is_kind(st.st_mode) and st.st_uid == os.geteuid():
        return fd
    if fd >= 0:
        os.close(fd)
    what = (
        "a symlink" if stat.S_ISLNK(st.st_mode) else f"not a {kind}" if not is_kind(st.st_mode) else f"owned by uid {st.st_uid}"
    )
    raise FilesystemError(f"{what}, where fetch keeps its own {kind}", str(directory / name), hint=_PLANTED_HINT)


def _walk(dfd: int, parts: Sequence[str], create: bool) -> int:
    """A descriptor on the directory DIR/parts..., each step opened with O_NOFOLLOW|O_DIRECTORY:
    a symlink or a file on the way fails with ENOTDIR instead of leading elsewhere."""
    fd = os.dup(dfd)
    try:
        for part in parts:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, dir_fd=fd)
            step = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = step
    except BaseException:
        os.close(fd)
        raise
    return fd


def trusted(st: os.stat_result) -> bool:
    """A regular file written by us or by root: one another user owns could change after it was checked."""
    return stat.S_ISREG(st.st_mode) and st.st_uid in (os.geteuid(), 0)


def open_existing(dfd: int, name: str) -> int | None:
    """A read descriptor on DIR/name if it is a regular file we trust, reached without following a
    symlink (O_NONBLOCK: a FIFO planted there cannot block the open); None otherwise."""
    *parents, base = name.split("/")
    try:
        parent = _walk(dfd, parents, create=False)
    except OSError:
        return None
    try:
        fd = os.open(base, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=parent)
    except OSError:
        return None
    finally:
        os.close(parent)
    if trusted(os.fstat(fd)):
        return fd
    os.close(fd)
    return None


def install(place: Place, partial: str, name: str) -> None:
    """Rename the checked partial file to DIR/name, its parent directories made and entered
    without following a symlink: one planted as ``a`` for ``a/b.json`` cannot send it outside DIR."""
    *parents, base = name.split("/")
    target = place.directory / name
    try:
        parent = _walk(place.fd, parents, create=True)
    except NotADirectoryError:
        raise FilesystemError("a parent directory of this file is a symlink or a file", str(target), hint=_PLANTED_HINT) from None
    except OSError as exc:
        raise os_error(exc, target) from exc
    try:
        os.replace(partial, base, src_dir_fd=place.partials, dst_dir_fd=parent)
        os.fsync(parent)
    except OSError as exc:
        raise os_error(exc, target) from exc
    finally:
        os.close(parent)


# -- partial downloads, under PARTIAL_DIR ----------------------------------------------------------


def partial_name(name: str) -> str:
    return name.replace("%", "%25").replace("/", "%2F") + ".part"  # one flat, unambiguous name per file


def partial_size(place: Place, name: str) -> int:
    try:
        st = os.stat(partial_name(name), dir_fd=place.partials, follow_symlinks=False)
    except OSError:
        return 0
    return st.st_size if stat.S_ISREG(st.st_mode) else 0


def open_partial(place: Place, name: str) -> int:
    """The partial download ``name``, to continue: it must be a regular file of ours with one link.
    Anything else at the name (a symlink, which O_NOFOLLOW refuses to follow; a hard link to a file
    elsewhere; another user's file) was planted: it is deleted and the download starts afresh."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, 0o600, dir_fd=place.partials)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
    else:
        st = os.fstat(fd)
        if is_regular_owned(st) and st.st_nlink == 1:
            return fd
        os.close(fd)
    log.warning("%s was not a partial download of ours: deleted, starting afresh", place.directory / PARTIAL_DIR / name)
    os.unlink(name, dir_fd=place.partials)
    return os.open(name, flags | os.O_EXCL, 0o600, dir_fd=place.partials)
