"""The handoff socket: give an allowed local client a connection straight to the hot engine.

Each client gets one message: a JSON line and, with it, a descriptor connected to the engine
(SCM_RIGHTS, unix(7)); after that the daemon is out of the path. A refusal is a JSON line with
``"error"`` and no descriptor.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prewarm.peer import AccessPolicy, Peer, peer_of

Target = Callable[[], tuple[Path, dict[str, object]] | None]


@dataclass
class HandoffCounts:
    served: int = 0
    refused: int = 0
    not_ready: int = 0
    failed: int = 0  # the engine did not answer, or the client left before its descriptor was sent

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class HandoffServer:
    """Serves ``listener`` on the running event loop until ``close()``; the listener stays the caller's."""

    def __init__(
        self,
        listener: socket.socket,
        policy: AccessPolicy,
        target: Target,
        log: logging.Logger,
        *,
        state: Callable[[], str] | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        self.counts = HandoffCounts()
        self._listener = listener
        self._policy = policy
        self._target = target
        self._log = log
        self._state = state
        self._timeout_s = timeout_s
        self._accepting: asyncio.Task[None] | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._listener.setblocking(False)
        self._accepting = asyncio.create_task(self._accept_loop())

    async def close(self) -> None:
        tasks = [t for t in (self._accepting, *self._clients) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._accepting = None

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self._listener)
            except OSError as exc:
                if exc.errno in (errno.EBADF, errno.EINVAL, errno.ENOTSOCK):  # the listener was closed under us
                    self._log.error("the handoff socket stopped accepting: %s", exc)
                    return
                self._log.warning("handoff accept failed: %s", exc)  # EMFILE and friends pass: wait a little
                await asyncio.sleep(0.1)
                continue
            task = asyncio.create_task(self._serve(conn))
            self._clients.add(task)
            task.add_done_callback(self._clients.discard)

    async def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.setblocking(False)
            try:
                async with asyncio.timeout(self._timeout_s):
                    await self._answer(conn)
            except (OSError, TimeoutError) as exc:
                self.counts.failed += 1
                self._log.info("handoff failed: %s", exc or "timed out")
            except Exception:
                self.counts.failed += 1
                self._log.exception("handoff failed")

    async def _answer(self, conn: socket.socket) -> None:
        peer = peer_of(conn)
        if not self._policy.allows(peer):
            self.counts.refused += 1
            self._log.warning("handoff refused: uid %d gid %d (pid %d) is not allowed", peer.uid, peer.gid, peer.pid)
            await _send(conn, _forbidden(peer))
            return
        target = self._target()
        if target is None:
            self.counts.not_ready += 1
            await _send(conn, self._not_ready())
            return
        path, info = target
        try:
            engine = await _dial(path)
        except OSError as exc:
            self.counts.failed += 1
            self._log.warning("handoff: the engine at %s did not answer: %s", path, exc)
            await _send(conn, _UNREACHABLE)
            return
        with engine:
            # O_NONBLOCK lives in the open file description the client will share (fcntl(2)): clear it.
            engine.setblocking(True)
            await _send(conn, {**info, "ok": True}, engine.fileno())
        self.counts.served += 1
        self._log.debug("handed the engine at %s to uid %d (pid %d)", path, peer.uid, peer.pid)

    def _not_ready(self) -> dict[str, object]:
        state = self._state() if self._state else "starting"
        return {
            "error": "not ready",
            "state": state,
            "hint": "no engine is hot yet; use the public socket, which queues requests until it is",
        }


def _forbidden(peer: Peer) -> dict[str, object]:
    return {
        "error": "forbidden",
        "uid": peer.uid,
        "hint": "ask the administrator to add this user to allowed_users, or to a group in allowed_groups",
    }


_UNREACHABLE: dict[str, object] = {
    "error": "engine unreachable",
    "hint": "the engine may be restarting; retry, or use the public socket",
}


async def _dial(path: Path) -> socket.socket:
    # unix(7): a non-blocking connect(2) to a listener whose backlog is full fails with EAGAIN and
    # starts nothing (no EINPROGRESS as with TCP; loop.sock_connect would take the socket's
    # writability for success), so it is retried until the engine accepts or the timeout ends.
    engine = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    engine.setblocking(False)
    delay = 0.005
    try:
        while True:
            try:
                engine.connect(os.fsencode(path))
                return engine
            except BlockingIOError:
                await asyncio.sleep(delay)
                delay = min(2 * delay, 0.1)
    except BaseException:
        engine.close()
        raise


async def _send(conn: socket.socket, message: dict[str, object], fd: int | None = None) -> None:
    """The JSON line in one sendmsg(2), with ``fd`` as SCM_RIGHTS riding on its first byte."""
    data = (json.dumps(message, default=str) + "\n").encode()
    loop = asyncio.get_running_loop()
    while True:
        try:
            sent = socket.send_fds(conn, [data], [fd]) if fd is not None else conn.send(data)
            break
        except BlockingIOError:
            await _writable(loop, conn)
    if sent < len(data):
        await loop.sock_sendall(conn, data[sent:])


async def _writable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(sock.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_writer(sock.fileno())
