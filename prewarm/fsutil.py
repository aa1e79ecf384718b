"""Durable, atomic filesystem steps that a user who can write the directory cannot steer.

Temp files and directories get unpredictable names, are created with O_EXCL|O_NOFOLLOW (so a
symlink planted at the name is never followed) and become their final name in one rename. A
temp directory is flock(2)ed by the run that owns it, so another run (in any PID namespace) can
tell a dead run's leftovers from a live one's.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import xxhash

from prewarm.errors import DestinationExists, FilesystemError, NotEnoughSpace
from prewarm.units import format_size

_RENAME_NOREPLACE = 1  # renameat2(2)
_AT_FDCWD = -100
_TEMP_SUFFIX = ".tmp"


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def rename_no_replace(src: Path, dst: Path) -> None:
    """rename(2) that fails if ``dst`` exists: a plain rename would replace an empty directory."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise DestinationExists("already exists", str(dst), hint="choose a new directory or remove it first")
        if err not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(err, os.strerror(err), str(dst))
    if dst.exists() or dst.is_symlink():
        raise DestinationExists("already exists", str(dst), hint="choose a new directory or remove it first")
    os.rename(src, dst)


def check_free_space(directory: Path, needed: int) -> None:
    stat_ = os.statvfs(directory)
    available = stat_.f_bavail * stat_.f_frsize
    if available < needed:
        raise NotEnoughSpace(
            f"needs {format_size(needed)} but only {format_size(available)} is free",
            str(directory),
            hint="free some space or choose another filesystem",
            needed=needed,
            available=available,
        )


def _temp_prefix(final: Path) -> str:
    """Names stay short (a 255-byte DST name still fits) and tell whose temp directory this is."""
    return f".prewarm-{xxhash.xxh3_64_hexdigest(os.fsencode(final.name))}-"


def remove_stale_temps(final: Path) -> list[Path]:
    """Delete temp directories for ``final`` that no live run holds locked (and that we own)."""
    removed = []
    prefix = _temp_prefix(final)
    for entry in final.parent.iterdir():
        if entry.name.startswith(prefix) and entry.name.endswith(_TEMP_SUFFIX) and _remove_if_stale(entry):
            removed.append(entry)
    return removed


def _remove_if_stale(entry: Path) -> bool:
    """Remove ``entry`` if no live run holds its lock (in this PID namespace or another); the lock is
    held while removing, so a run that has just created it and waits for its lock sees it gone."""
    try:
        fd = os.open(entry, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if os.fstat(fd).st_uid != os.geteuid():
            return False
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        shutil.rmtree(entry, ignore_errors=True)  # fd-based on Linux: never follows a symlink inside
        return True
    except OSError:
        return False  # locked: a live run is writing it
    finally:
        os.close(fd)


@contextmanager
def atomic_directory(final: Path, mode: int = 0o777) -> Iterator[Path]:
    """Yield a private temp directory beside ``final``; on success it becomes ``final`` in one rename.

    The temp directory is created 0700 and locked at once; on an exception (or KeyboardInterrupt)
    it is removed; after a SIGKILL the lock dies with us and the next run for the same target
    removes it. ``mode`` (less the umask) is what ``final`` gets.
    """
    if str(final) in ("", "."):
        raise FilesystemError("an empty path was given", hint="name the directory to create (is a shell variable unset?)")
    if final.exists() or final.is_symlink():
        raise DestinationExists("already exists", str(final), hint="choose a new directory or remove it first")
    parent = final.parent
    if not parent.is_dir():
        raise FilesystemError("parent directory does not exist", str(parent), hint="create it first")
    with contextlib.suppress(OSError):
        remove_stale_temps(final)
    temp, lock = _locked_temp_directory(final)
    try:
        yield temp
        os.fchmod(lock, mode & ~current_umask())
        os.fsync(lock)
        rename_no_replace(temp, final)
        fsync_path(parent)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    finally:
        os.close(lock)


def _locked_temp_directory(final: Path) -> tuple[Path, int]:
    """A new 0700 directory beside ``final``, and a descriptor holding its flock. A cleaner that
    locked it first (between our mkdir and flock) has removed it: then make another."""
    while True:
        try:
            temp = Path(tempfile.mkdtemp(prefix=_temp_prefix(final), suffix=_TEMP_SUFFIX, dir=final.parent))
            lock = os.open(temp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise os_error(exc, final) from exc
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            still_there = os.path.samestat(os.fstat(lock), os.lstat(temp))
        except FileNotFoundError:
            still_there = False
        if still_there:
            return temp, lock
        os.close(lock)


def os_error(exc: OSError, path: Path | str) -> FilesystemError:
    """The one-line FilesystemError for an OSError met while working on ``path``."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return NotEnoughSpace("the filesystem is full", str(path), hint="free some space and run again")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return FilesystemError("permission denied", str(path), hint="check the directory's owner and mode")
    if exc.errno == errno.EROFS:
        return FilesystemError("read-only filesystem", str(path), hint="write somewhere else, or remount it read-write")
    if exc.errno == errno.ENAMETOOLONG:
        return FilesystemError("file name too long", str(path), hint="choose a shorter name")
    if exc.errno == errno.ENOENT:
        return FilesystemError("no such file or directory", str(path), hint="check the path")
    return FilesystemError(exc.strerror or str(exc), str(path), hint="check the path, its permissions and the disk")


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """write(2) until every byte is out (a write may take fewer than asked)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def create_exclusive(directory: Path, name: str, mode: int) -> int:
    """A new file ``name`` in ``directory``, opened for writing; never follows or reuses what is there."""
    return os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)


def write_file_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` through a fresh temp file (O_EXCL|O_NOFOLLOW, random name),
    fsync and rename over ``path``. A symlink planted at ``path`` is replaced, never followed."""
    try:
        fd, temp = tempfile.mkstemp(prefix=".prewarm-", suffix=_TEMP_SUFFIX, dir=path.parent)
    except OSError as exc:
        raise os_error(exc, path) from exc
    try:
        os.fchmod(fd, mode & ~current_umask())
        write_all(fd, data)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        if os.path.isdir(path) and not os.path.islink(path):
            raise FilesystemError("is a directory, not a file", str(path), hint="remove or rename it")
        os.replace(temp, path)
        fsync_path(path.parent)
    except OSError as exc:
        raise os_error(exc, path) from exc
    finally:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            if os.path.lexists(temp):
                os.unlink(temp)


def is_regular_owned(st: os.stat_result) -> bool:
    """What a partial download or record we wrote must be: a regular file of ours."""
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()
