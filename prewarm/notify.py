"""systemd's notification and socket-activation protocols, spoken without libsystemd.

``Notifier`` is sd_notify(3): one datagram of ``KEY=value`` lines to ``$NOTIFY_SOCKET``.
``listen_sockets`` is sd_listen_fds(3): the listening sockets systemd passed from fd 3 on.
Both take the environment as a mapping (``config.systemd_environment()``), never ``os.environ``.
"""

from __future__ import annotations

import array
import logging
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass

from prewarm.errors import PrewarmError

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3  # sd_listen_fds(3): passed descriptors start right after stdin/out/err


@dataclass
class ActivationError(PrewarmError):
    """systemd's socket-activation variables are malformed or name something that is not a socket."""


class Notifier:
    """Tells systemd where the service stands; every method is a no-op without ``$NOTIFY_SOCKET``."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._address = _notify_address(env.get("NOTIFY_SOCKET", ""))
        self._watchdog_usec = env.get("WATCHDOG_USEC", "")
        self._watchdog_pid = env.get("WATCHDOG_PID", "")
        # How many descriptors systemd's store keeps for us: systemd 254+ sets $FDSTORE from
        # FileDescriptorStoreMax=; for older ones our unit sets it. Unset: no store, so the daemon
        # removes its socket files at exit instead of leaving them to a store that is not there.
        fdstore = env.get("FDSTORE", "")
        self._fdstore = fdstore.isdigit() and int(fdstore) > 0

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, **fields: object) -> bool:
        """One datagram ``KEY=value\n...``; False when there is nowhere to send it or sending failed."""
        if self._address is None or not fields:
            return False
        # sd_notify(3): newline-separated assignments; a newline inside a value would start a new one.
        payload = "".join(f"{key}={str(value).replace(chr(10), ' ')}\n" for key, value in fields.items())
        try:
            self._deliver(payload.encode())
        except OSError as exc:
            log.debug("sd_notify to %r failed: %s", self._address, exc)
            return False
        return True

    def _deliver(self, payload: bytes, fds: tuple[int, ...] = ()) -> None:
        assert self._address is not None
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            # Never block the event loop: a reader that does not keep up (its queue holds
            # net.unix.max_dgram_qlen datagrams) loses a status line, not the daemon.
            sock.setblocking(False)
            sock.sendmsg([payload], rights, 0, self._address)

    def ready(self, status: str | None = None) -> bool:
        return self.send(READY=1, **({"STATUS": status} if status else {}))

    def store_fd(self, name: str, fd: int) -> bool:
        """Hand ``fd`` to systemd's file descriptor store (``FileDescriptorStoreMax=``): systemd
        keeps it open across restarts of the service and passes it back as ``$LISTEN_FDS`` named
        ``name`` (sd_pid_notify_with_fds(3)). A listening socket kept there goes on accepting
        connections into its backlog while the daemon restarts."""
        if self._address is None or not self._fdstore:
            return False
        try:
            self._deliver(f"FDSTORE=1\nFDNAME={name}\n".encode(), (fd,))
        except OSError as exc:
            log.warning("could not hand %s to systemd's descriptor store: %s", name, exc)
            return False
        return True

    def status(self, text: str) -> bool:
        return self.send(STATUS=text)

    def reloading(self, status: str | None = None) -> bool:
        # systemd 253+ (Type=notify-reload) wants the monotonic time of the reload's start with it.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send(RELOADING=1, MONOTONIC_USEC=usec, **({"STATUS": status} if status else {}))

    def stopping(self, status: str | None = None) -> bool:
        return self.send(STOPPING=1, **({"STATUS": status} if status else {}))

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    def extend_timeout(self, seconds: float) -> bool:
        return self.send(EXTEND_TIMEOUT_USEC=max(0, int(seconds * 1_000_000)))

    def watchdog_interval(self) -> float | None:
        """Seconds between pings, half of ``$WATCHDOG_USEC`` as sd_watchdog_enabled(3) advises;
        None when the watchdog is off or meant for another process (``$WATCHDOG_PID``)."""
        if self._watchdog_pid and self._watchdog_pid != str(os.getpid()):
            return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            return None
        return usec / 2 / 1_000_000 if usec > 0 else None


def _notify_address(value: str) -> bytes | None:
    """A path, or ``@name`` for the abstract namespace (unix(7)); anything else (vsock:...) is not ours."""
    if value.startswith("/"):
        return os.fsencode(value)
    if value.startswith("@") and len(value) > 1:
        return b"\0" + os.fsencode(value[1:])
    if value:
        log.debug("NOTIFY_SOCKET=%r is not a Unix socket address; not notifying", value)
    return None


def listen_sockets(env: Mapping[str, str]) -> list[tuple[str, socket.socket]]:
    """The sockets systemd passed to this process, with their ``FileDescriptorName=`` names.

    Empty unless ``$LISTEN_PID`` is this process: the variables may have been inherited from a parent.
    """
    if env.get("LISTEN_PID", "") != str(os.getpid()):
        return []
    count = _fd_count(env.get("LISTEN_FDS", ""))
    names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
    sockets: list[tuple[str, socket.socket]] = []
    for index in range(count):
        fd = SD_LISTEN_FDS_START + index
        name = names[index] if index < len(names) and names[index] else "unknown"
        sockets.append((name, _adopt(fd, name)))
    return sockets


def _fd_count(value: str) -> int:
    if not value.isdigit():
        raise ActivationError(
            f"LISTEN_FDS={value!r} is not a count of descriptors",
            hint="start the daemon from its .socket unit or unset LISTEN_PID",
        )
    return int(value)


def _adopt(fd: int, name: str) -> socket.socket:
    # sd_listen_fds(3): the passed descriptors are inheritable; ours must not leak into the engine.
    try:
        os.set_inheritable(fd, False)
        return socket.socket(fileno=fd)
    except OSError as exc:
        raise ActivationError(
            f"systemd passed descriptor {fd} ({name}) but it is not a usable socket: {exc.strerror}",
            hint="check the Listen*= lines of the .socket unit",
        ) from None
