"""Unix stream sockets on the filesystem: bind safely, remove only our own, dial.

The socket file is created by bind(2) itself, which never follows a symlink at the final component
and fails on any existing name (unix(7)); its permissions come from the umask at that moment, so
the mode is set through the umask rather than by a chmod afterwards that would leave a window.
The umask is process-wide: bind before starting threads that create files.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

from prewarm.errors import FilesystemError

SUN_PATH_MAX = 107  # unix(7): sun_path is 108 bytes including the terminating NUL
_BACKLOG = 512
_STALE_PROBE_S = 1.0

# The (st_dev, st_ino) of each socket file we bound, for remove_unix; dies with the socket object.
_bound: weakref.WeakKeyDictionary[socket.socket, tuple[int, int]] = weakref.WeakKeyDictionary()


@dataclass
class SocketPathError(FilesystemError):
    """A socket path that cannot be used: too long, taken by something else, or not ours."""


def bind_unix(path: Path, mode: int = 0o660, gid: int | None = None) -> socket.socket:
    """A listening socket at ``path`` with ``mode`` (and group ``gid``) from its first moment.

    An existing name is removed only when it is our own stale socket (nobody answers on it);
    anything else there is refused and left alone.
    """
    check_path_length(path)
    _clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        _bind_with_mode(sock, path, mode)
        st = os.lstat(path)
        _bound[sock] = (st.st_dev, st.st_ino)
        if gid is not None:
            _set_group(path, gid)
        sock.listen(_BACKLOG)
    except BaseException:
        remove_unix(path, sock)
        sock.close()
        raise
    return sock


def remove_unix(path: Path, sock: socket.socket) -> bool:
    """Unlink ``path`` if it is still the socket file ``bind_unix`` made for ``sock``."""
    identity = _bound.get(sock)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if identity is None or (st.st_dev, st.st_ino) != identity:
        return False
    os.unlink(path)
    return True


def dial_unix(path: Path, timeout: float | None = 5.0) -> socket.socket:
    """A connected, blocking client socket; OSError (FileNotFoundError, ConnectionRefusedError...) as is."""
    check_path_length(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(os.fsencode(path))
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    return sock


def private_runtime_dir(root: Path) -> Path:
    """A new 0700 directory ``prewarm-XXXXXXXX`` under ``root`` for sockets only we may reach."""
    directory = Path(tempfile.mkdtemp(prefix="prewarm-", dir=root))  # mkdtemp makes it 0700
    check_path_length(directory / "engine-0000.sock")
    return directory


def check_path_length(path: Path) -> None:
    size = len(os.fsencode(path))
    if size > SUN_PATH_MAX:
        raise SocketPathError(
            f"Unix socket path is {size} bytes; the limit is {SUN_PATH_MAX}",
            str(path),
            hint="use a shorter path, e.g. under /run or /tmp",
        )


def _bind_with_mode(sock: socket.socket, path: Path, mode: int) -> None:
    # The umask is process-wide: set only around bind(2), restored at once.
    previous = os.umask(0o777 & ~mode)
    try:
        sock.bind(os.fsencode(path))
    except FileNotFoundError:
        raise SocketPathError("the socket's directory does not exist", str(path), hint="create the directory first") from None
    except PermissionError:
        raise SocketPathError("no permission to create it", str(path), hint="use a directory this user may write") from None
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        raise _taken(path, "something was created at this path while prewarm was binding") from None
    finally:
        os.umask(previous)


def _set_group(path: Path, gid: int) -> None:
    try:
        os.chown(path, -1, gid, follow_symlinks=False)
    except OSError as exc:
        raise SocketPathError(
            f"cannot give the socket to group {gid}: {exc.strerror}",
            str(path),
            hint="run the daemon as root or as a member of that group, or drop socket_group",
        ) from None


def _clear_stale(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise _taken(path, f"the path is taken by a {_kind(st.st_mode)}, not a socket")
    if st.st_uid != os.geteuid():
        raise _taken(path, f"the path is a socket owned by uid {st.st_uid}, not by prewarm's user")
    if _answers(path):
        raise _taken(path, "another process is listening on this socket")
    again = os.lstat(path)
    if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino):
        raise _taken(path, "the path changed while prewarm was checking it")
    os.unlink(path)


def _answers(path: Path) -> bool:
    """Whether a listener is behind ``path``; connect(2) says ECONNREFUSED for a socket nobody holds."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(_STALE_PROBE_S)
    try:
        probe.connect(os.fsencode(path))
    except ConnectionRefusedError:
        return False
    except OSError:
        return True  # a full backlog (EAGAIN) or a timeout: someone is there
    finally:
        probe.close()
    return True


def _kind(mode: int) -> str:
    kinds = {stat.S_ISLNK: "symlink", stat.S_ISREG: "regular file", stat.S_ISDIR: "directory", stat.S_ISFIFO: "FIFO"}
    return next((name for test, name in kinds.items() if test(mode)), "special file")


def _taken(path: Path, why: str) -> SocketPathError:
    return SocketPathError(
        why,
        str(path),
        hint="stop whatever owns it, or choose another socket path; prewarm removes only its own stale socket",
    )
