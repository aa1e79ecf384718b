"""Who is on the other end of a Unix socket, and whether they may use or control the daemon.

Decisions use the uid and gids the kernel recorded at connect(2) (unix(7), SO_PEERCRED), never
the pid: a pid can be reused or belong to a process that passed its socket on.
"""

from __future__ import annotations

import array
import errno
import os
import socket
import struct
from dataclasses import dataclass, field

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13+; Python 3.11 does not name it
_UCRED = struct.Struct("iII")  # struct ucred: pid_t pid; uid_t uid; gid_t gid
_GROUPS_BUFLEN = 1024  # CPython's getsockopt limit: 256 gids; more and the kernel says ERANGE


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()  # supplementary groups; may include gid


@dataclass(frozen=True)
class AccessPolicy:
    """Root and the daemon's own user always; then listed users, and members of listed groups."""

    uids: frozenset[int] = frozenset()
    gids: frozenset[int] = frozenset()
    owner: int = field(default_factory=os.geteuid)

    def may_control(self, peer: Peer) -> bool:
        """Reload, stop and other changes: root or the daemon's own user only."""
        return peer.uid in (0, self.owner)

    def allows(self, peer: Peer) -> bool:
        if self.may_control(peer) or peer.uid in self.uids:
            return True
        return peer.gid in self.gids or not self.gids.isdisjoint(peer.groups)


def peer_of(sock: socket.socket) -> Peer:
    """The credentials of the process that connected ``sock`` (either end of a socketpair too)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return Peer(pid=pid, uid=uid, gid=gid, groups=_peer_groups(sock, gid))


def _peer_groups(sock: socket.socket, gid: int) -> tuple[int, ...]:
    # socket(7) SO_PEERGROUPS: an array of gid_t. Older kernels (ENOPROTOOPT) and peers with more
    # groups than fit (ERANGE) leave only the primary gid: access is then narrower, never wider.
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, _GROUPS_BUFLEN)
    except OSError as exc:
        if exc.errno in (errno.ENOPROTOOPT, errno.ERANGE, errno.EINVAL):
            return (gid,)
        raise
    groups = array.array("I")
    groups.frombytes(raw[: len(raw) - len(raw) % groups.itemsize])
    return tuple(groups)
