"""Durable, atomic filesystem steps: temp names beside the target, fsync, no-replace rename."""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prewarm.errors import DestinationExists, FilesystemError, NotEnoughSpace
from prewarm.units import format_size

_RENAME_NOREPLACE = 1  # renameat2(2)
_AT_FDCWD = -100


def require_directory(path: Path) -> None:
    if not path.exists():
        raise FilesystemError("no such directory", str(path))
    if not path.is_dir():
        raise FilesystemError("not a directory", str(path))


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    stat = os.statvfs(directory)
    available = stat.f_bavail * stat.f_frsize
    if available < needed:
        raise NotEnoughSpace(
            f"needs {format_size(needed)} but only {format_size(available)} is free",
            str(directory),
            hint="free some space or choose another filesystem",
            needed=needed,
            available=available,
        )


def _temp_pattern(final: Path) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(final.name)}\.prewarm-(\d+)\.tmp$")


def remove_stale_temps(final: Path) -> list[Path]:
    """Delete temp directories that a killed prewarm left for ``final`` (their pid is gone)."""
    removed = []
    pattern = _temp_pattern(final)
    for entry in final.parent.iterdir():
        match = pattern.match(entry.name)
        if match and not _pid_alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temp directory beside ``final``; on success it becomes ``final`` in one rename.

    On any exception (or KeyboardInterrupt) the temp directory is removed; after a SIGKILL it
    is left, named for our pid, and the next run for the same target removes it.
    """
    if final.exists() or final.is_symlink():
        raise DestinationExists("already exists", str(final), hint="choose a new directory or remove it first")
    parent = final.parent
    if not parent.is_dir():
        raise FilesystemError("parent directory does not exist", str(parent))
    remove_stale_temps(final)
    temp = parent / f".{final.name}.prewarm-{os.getpid()}.tmp"
    try:
        temp.mkdir()
    except OSError as exc:
        raise os_error(exc, temp) from exc
    try:
        yield temp
        fsync_path(temp)
        rename_no_replace(temp, final)
        fsync_path(parent)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def os_error(exc: OSError, path: Path | str) -> FilesystemError:
    """The one-line FilesystemError for an OSError met while working on ``path``."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return NotEnoughSpace("the filesystem is full", str(path), hint="free some space and run again")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return FilesystemError("permission denied", str(path), hint="check the directory's owner and mode")
    if exc.errno == errno.EROFS:
        return FilesystemError("read-only filesystem", str(path))
    return FilesystemError(exc.strerror or str(exc), str(path))


def write_file_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file, fsync and rename (replacing any old file)."""
    temp = path.with_name(f".{path.name}.prewarm-{os.getpid()}.tmp")
    try:
        with open(temp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
        fsync_path(path.parent)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise os_error(exc, path) from exc
