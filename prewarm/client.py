"""A Python client for local programs: a socket straight to the engine by handoff, and an httpx
transport that uses it, so ``httpx`` and the ``openai`` package talk to prewarm directly::

    client = openai.OpenAI(
        base_url="http://prewarm/v1",
        api_key="unused",
        http_client=httpx.Client(transport=PrewarmTransport("/run/prewarm/qwen.sock"), trust_env=False),
    )

``trust_env=False`` keeps ``$HTTP_PROXY`` from routing the requests away from the transport.
"""

from __future__ import annotations

import array
import json
import logging
import os
import select
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpcore
import httpx

from prewarm.errors import PrewarmError
from prewarm.unixsock import dial_unix

log = logging.getLogger(__name__)

_LINE_MAX = 64 * 1024
_FDS_MAX = 4  # room for more than the one expected, so extras are seen (and closed), not truncated
_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=5.0)


@dataclass
class HandoffError(PrewarmError):
    """The handoff socket refused (``reason`` is its ``error``: forbidden, not ready...) or spoke nonsense."""

    reason: str = "protocol"
    reply: dict[str, Any] = field(default_factory=dict)


def handoff_path_for(socket_path: str | os.PathLike[str]) -> Path:
    return Path(os.fspath(socket_path) + ".handoff")


def handoff(handoff_path: str | os.PathLike[str], timeout: float | None = 5.0) -> tuple[socket.socket, dict[str, Any]]:
    """A blocking socket connected to the hot engine, and the daemon's JSON line about it."""
    path = Path(handoff_path)
    with dial_unix(path, timeout) as conn:
        conn.settimeout(timeout)
        line, fds = _receive(conn)
    try:
        reply = _parse(line, path)
        if len(fds) != 1:
            raise HandoffError(
                f"expected one descriptor with the reply, got {len(fds)}",
                str(path),
                hint="the handoff socket is not prewarm's, or the daemon is newer than this client: use the public socket",
            )
        engine = socket.socket(fileno=fds[0])  # the family and type are read from the descriptor
        engine.setblocking(True)  # O_NONBLOCK came with the descriptor if the sender had set it (fcntl(2))
        return engine, reply
    except BaseException:
        _close_all(fds)
        raise


def _receive(conn: socket.socket) -> tuple[bytes, list[int]]:
    # recvmsg(2) MSG_CMSG_CLOEXEC: the descriptor is close-on-exec from the moment it arrives
    # (socket.recv_fds leaves it inheritable, open to a concurrent fork+exec).
    space = socket.CMSG_SPACE(_FDS_MAX * array.array("i").itemsize)
    data, ancdata, flags, _ = conn.recvmsg(_LINE_MAX, space, socket.MSG_CMSG_CLOEXEC)
    fds = _descriptors(ancdata)
    try:
        if flags & socket.MSG_CTRUNC:
            raise HandoffError("the handoff socket sent more descriptors than expected", hint="is this a prewarm handoff socket?")
        while data and not data.endswith(b"\n") and len(data) < _LINE_MAX:
            more = conn.recv(_LINE_MAX - len(data))
            if not more:
                break
            data += more
    except BaseException:
        _close_all(fds)
        raise
    return data, fds


def _descriptors(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            ints = array.array("i")
            ints.frombytes(payload[: len(payload) - len(payload) % ints.itemsize])
            fds.extend(ints)
    return fds


def _parse(line: bytes, path: Path) -> dict[str, Any]:
    if not line:
        raise HandoffError("the handoff socket closed without answering", str(path), hint="see the daemon's log")
    try:
        reply = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        reply = None
    if not isinstance(reply, dict):
        raise HandoffError("the handoff socket's reply is not a JSON object", str(path), hint="is this a prewarm handoff socket?")
    if reply.get("ok") is not True:
        reason = str(reply.get("error", "no reason given"))
        hint = reply.get("hint")
        raise HandoffError(f"handoff refused: {reason}", str(path), hint=str(hint) if hint else None, reason=reason, reply=reply)
    return reply


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


class SocketStream(httpcore.NetworkStream):
    """httpcore's view of a connected socket (the handed-off one), with its exceptions."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            self._sock.settimeout(timeout)
            return self._sock.recv(max_bytes)
        except TimeoutError as exc:
            raise httpcore.ReadTimeout(exc) from exc
        except OSError as exc:
            raise httpcore.ReadError(exc) from exc

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        try:
            self._sock.settimeout(timeout)
            self._sock.sendall(buffer)
        except TimeoutError as exc:
            raise httpcore.WriteTimeout(exc) from exc
        except OSError as exc:
            raise httpcore.WriteError(exc) from exc

    def close(self) -> None:
        self._sock.close()

    def get_extra_info(self, info: str) -> Any:
        if info == "socket":
            return self._sock
        if info == "is_readable":
            # An idle keep-alive connection that polls readable has been closed by the server.
            poller = select.poll()
            poller.register(self._sock, select.POLLIN)
            return bool(poller.poll(0))
        return None


class HandoffBackend(httpcore.NetworkBackend):
    """Each new connection by handoff; the public socket when the handoff socket is missing or refuses."""

    def __init__(self, socket_path: Path, handoff_path: Path) -> None:
        self._socket_path = socket_path
        self._handoff_path = handoff_path

    def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options: Any = None) -> httpcore.NetworkStream:
        return SocketStream(self._connect(timeout))

    def connect_tcp(
        self, host: str, port: int, timeout: float | None = None, local_address: str | None = None, socket_options: Any = None
    ) -> httpcore.NetworkStream:
        return SocketStream(self._connect(timeout))

    def _connect(self, timeout: float | None) -> socket.socket:
        try:
            sock, _ = handoff(self._handoff_path, timeout)
            return sock
        except (OSError, PrewarmError) as exc:
            log.debug("no handoff from %s (%s); using %s", self._handoff_path, exc, self._socket_path)
        try:
            return dial_unix(self._socket_path, timeout)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(exc) from exc
        except OSError as exc:
            raise httpcore.ConnectError(f"{self._socket_path}: {exc.strerror or exc}") from exc


class PrewarmTransport(httpx.HTTPTransport):
    """HTTP over prewarm: by handoff straight to the engine (default), or over the public socket only."""

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        *,
        handoff: bool = True,
        handoff_path: str | os.PathLike[str] | None = None,
        limits: httpx.Limits = _LIMITS,
    ) -> None:
        path = os.fspath(socket_path)
        super().__init__(uds=path, limits=limits)
        if handoff:
            backend = HandoffBackend(Path(path), Path(handoff_path) if handoff_path else handoff_path_for(path))
            # httpx.HTTPTransport takes no network backend; the connection pool it wraps is where one goes.
            self._pool = httpcore.ConnectionPool(
                uds=path,
                network_backend=backend,
                max_connections=limits.max_connections,
                max_keepalive_connections=limits.max_keepalive_connections,
                keepalive_expiry=limits.keepalive_expiry,
            )


def connect(socket_path: str | os.PathLike[str], *, handoff: bool = True, timeout: float | None = 600.0) -> httpx.Client:
    """An ``httpx.Client`` for ``http://prewarm/...`` over prewarm's socket (generations can be long:
    the default read timeout is ten minutes; connecting gets ten seconds)."""
    return httpx.Client(
        base_url="http://prewarm",
        transport=PrewarmTransport(socket_path, handoff=handoff),
        trust_env=False,
        timeout=httpx.Timeout(timeout, connect=10.0),
    )
