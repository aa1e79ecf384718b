"""Reading a directory that others may write: names stay inside it, only regular files are opened.

A name read from a file (a manifest, an index, a fetch record, a hub listing) must be a plain
relative path. A file is opened only when it resolves to a regular file inside the directory (or,
for a hub cache snapshot ``.../snapshots/COMMIT``, inside the repo's folder, where its symlinks
into ``blobs/`` lead), and never in a way that blocks: a FIFO, socket or device planted in the
directory is skipped with a reason, not opened.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from prewarm.errors import FilesystemError, InvalidCheckpoint

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.syscall.restype = ctypes.c_long
_SYS_OPENAT2 = 437  # openat2(2), Linux 5.6+; the same number on every architecture
_AT_FDCWD = -100
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_openat2_works = True


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class NotRegular(Exception):
    """A name that is not safe to open: ``reason`` says why, in a few words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def unsafe_name_reason(name: object) -> str | None:
    """Why ``name`` is not a plain relative path (``a/b.json``), or None if it is one."""
    if not isinstance(name, str):
        return f"a name must be a string, not {type(name).__name__}"
    if not name:
        return "an empty name"
    if "\0" in name:
        return "a name with a NUL byte"
    if name.startswith("/"):
        return "an absolute path"
    if any(part in ("", ".", "..") for part in name.split("/")):
        return "a path with '', '.' or '..' parts"
    try:
        os.fsencode(name)
    except UnicodeEncodeError:
        return "a name with a lone surrogate, which no file name can have"
    return None


def check_name(name: object, what: str, source: Path | str) -> str:
    """``name`` if it is a plain relative path; else one clear InvalidCheckpoint naming it."""
    reason = unsafe_name_reason(name)
    if reason is not None:
        raise InvalidCheckpoint(
            f"{what} names {name!r}: {reason}, not a file inside the directory",
            str(source),
            hint="the file is damaged or was written to reach files elsewhere: do not use it; rebuild it",
        )
    assert isinstance(name, str)
    return name


@dataclass(frozen=True)
class Root:
    """A directory whose files are read; ``allowed`` are the real paths its symlinks may lead into."""

    directory: Path
    allowed: tuple[str, ...]

    def path(self, name: str) -> Path:
        return self.directory / name


def root_of(directory: Path) -> Root:
    """The confinement for ``directory``: itself, plus the repo folder for a hub cache snapshot."""
    if str(directory) == "":
        raise FilesystemError("an empty path was given", hint="name a directory (is a shell variable unset?)")
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        raise FilesystemError("no such directory", str(directory), hint="check the path") from None
    except OSError as exc:
        raise FilesystemError(exc.strerror or str(exc), str(directory), hint="check the path and its permissions") from None
    if not stat.S_ISDIR(st.st_mode):
        raise FilesystemError("not a directory", str(directory), hint="give the directory that holds the files")
    real = os.path.realpath(directory)
    allowed = [real]
    parent = os.path.dirname(real)
    if os.path.basename(parent) == "snapshots" and os.path.isdir(os.path.join(os.path.dirname(parent), "blobs")):
        allowed.append(os.path.dirname(parent))  # huggingface_hub's cache: snapshots/COMMIT/x -> ../../blobs/HASH
    return Root(directory, tuple(allowed))


def _inside(real: str, allowed: tuple[str, ...]) -> bool:
    return any(real == a or real.startswith(a.rstrip("/") + "/") for a in allowed)


def _kind(mode: int) -> str:
    for test, word in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISLNK, "a symlink"),
    ):
        if test(mode):
            return word
    return "not a regular file"


def resolve_regular(root: Root, name: str) -> tuple[str, os.stat_result]:
    """The real path and lstat of ``name`` if it is a regular file inside the root.

    Raises FileNotFoundError when it (or a symlink's target) does not exist, NotRegular when it
    is something else or leads outside. Nothing is opened.
    """
    path = root.path(name)
    real = os.path.realpath(path)
    if not _inside(real, root.allowed):
        os.lstat(path)  # a missing name is "missing", not "outside"
        raise NotRegular("a symlink to a file outside the directory")
    st = os.lstat(real)
    if not stat.S_ISREG(st.st_mode):
        raise NotRegular(f"{_kind(st.st_mode)}, not a regular file")
    return real, st


def open_regular(root: Root, name: str) -> int:
    """A read-only descriptor on ``name``, which must be a regular file inside the root.

    The real path is opened with every symlink refused (openat2 RESOLVE_NO_SYMLINKS), so a symlink
    swapped in between the check and the open fails instead of leading elsewhere; O_NONBLOCK means
    even a FIFO swapped in at the last moment cannot block, and fstat then refuses it.
    """
    real, st = resolve_regular(root, name)
    fd = _open_no_symlinks(real)
    try:
        now = os.fstat(fd)
        if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            raise NotRegular("replaced while being opened")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_no_symlinks(real: str) -> int:
    global _openat2_works
    if _openat2_works:
        how = _OpenHow(_OPEN_FLAGS, 0, _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS)
        fd = _libc.syscall(_SYS_OPENAT2, _AT_FDCWD, os.fsencode(real), ctypes.byref(how), ctypes.sizeof(how))
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        if err == errno.ELOOP:
            raise NotRegular("replaced by a symlink while being opened")
        if err not in (errno.ENOSYS, errno.EPERM):  # EPERM: a seccomp filter that does not know openat2
            raise OSError(err, os.strerror(err), real)
        _openat2_works = False
    fd = os.open(real, _OPEN_FLAGS | os.O_NOFOLLOW)
    if not _inside(os.readlink(f"/proc/self/fd/{fd}"), (real,)):
        os.close(fd)
        raise NotRegular("replaced while being opened")
    return fd


@dataclass(frozen=True)
class Skipped:
    name: str
    reason: str


@dataclass(frozen=True)
class Listing:
    files: tuple[str, ...]  # regular files inside the root, sorted
    skipped: tuple[Skipped, ...]  # what is there but is not read, and why


def list_regular_files(root: Root, exclude: frozenset[str] = frozenset()) -> Listing:
    """Every regular file under the root (hidden names and ``exclude`` left out), and what was
    skipped: FIFOs, sockets, devices, symlinks leading outside or nowhere, symlinked directories."""
    files: list[str] = []
    skipped: list[Skipped] = []
    for top, dirs, names in os.walk(root.directory):
        rel = Path(top).relative_to(root.directory)
        for d in list(dirs):
            if os.path.islink(os.path.join(top, d)) and not d.startswith("."):
                skipped.append(Skipped((rel / d).as_posix(), "a symlink to a directory, not followed"))
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not os.path.islink(os.path.join(top, d)))
        for name in names:
            relname = (rel / name).as_posix()
            if name.startswith(".") or relname in exclude:
                continue
            try:
                resolve_regular(root, relname)
            except FileNotFoundError:
                skipped.append(Skipped(relname, "a symlink to nothing (dangling)"))
            except NotRegular as why:
                skipped.append(Skipped(relname, why.reason))
            except OSError as exc:
                skipped.append(Skipped(relname, exc.strerror or str(exc)))
            else:
                files.append(relname)
    return Listing(tuple(sorted(files)), tuple(sorted(skipped, key=lambda s: s.name)))


def read_small_file(root: Root, name: str, limit: int = 64 * 2**20) -> bytes:
    """The bytes of a small regular file inside the root (a manifest, an index, a record)."""
    fd = open_regular(root, name)
    try:
        chunks, total = [], 0
        while (chunk := os.read(fd, 2**20)) and total <= limit:  # stops even if the file keeps growing
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise NotRegular(f"more than the {limit} bytes this file may have")
        return b"".join(chunks)
    finally:
        os.close(fd)


def parse_json(raw: bytes, file_names: bool = False) -> object:
    """JSON from bytes someone else wrote: any failure (bad UTF-8, bad syntax, nesting deep enough
    to exhaust the recursion limit, lone surrogates that are not text) is a ValueError.

    With ``file_names``, escapes of U+DC80..U+DCFF pass: that is how a file name that is not valid
    UTF-8 is written (Python's surrogateescape, as ``os.fsdecode`` gives it), and the real bytes
    come back with ``os.fsencode``."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"not valid UTF-8 text ({exc.reason})") from None
    try:
        json.dumps(doc, ensure_ascii=False).encode("utf-8", "surrogateescape" if file_names else "strict")
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except UnicodeEncodeError:
        raise ValueError("a string with a lone surrogate (\\ud800...), which is not text") from None
    return doc
