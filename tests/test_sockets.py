"""The serving side's sockets, real ones only: sd_notify and socket activation, peer credentials and
access decisions, safe binding, and the handoff end to end (a real HTTP server on a Unix socket
stands in for the engine, another for the gateway; other users are real, through setpriv)."""

from __future__ import annotations

import asyncio
import fcntl
import http.client
import http.server
import json
import logging
import os
import shutil
import socket
import socketserver
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from prewarm.client import HandoffError, PrewarmTransport, connect, handoff
from prewarm.handoff import HandoffServer
from prewarm.notify import ActivationError, Notifier, listen_sockets
from prewarm.peer import AccessPolicy, Peer, peer_of
from prewarm.unixsock import SocketPathError, bind_unix, dial_unix, private_runtime_dir, remove_unix
from tests.helpers import ROOT

NOBODY = 65534
T = TypeVar("T")


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A private directory with a short path: sun_path holds 107 bytes, pytest's tmp_path can be longer."""
    directory = Path(tempfile.mkdtemp(prefix="pw-", dir="/tmp"))
    yield directory
    shutil.rmtree(directory)


def as_nobody(code: str, *groups: int) -> list[str]:
    """argv running ``code`` in this venv's Python as uid/gid 65534 with exactly ``groups``."""
    group_flag = f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", group_flag, sys.executable, "-c", code]


# sd_notify(3)


def receive(sock: socket.socket) -> str:
    sock.settimeout(5)
    return sock.recv(4096).decode()


def test_notifier_sends_each_message_to_a_path_socket(short_dir: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(short_dir / "notify"))
        notifier = Notifier({"NOTIFY_SOCKET": str(short_dir / "notify")})
        assert notifier.ready("serving tiny")
        assert receive(listener) == "READY=1\nSTATUS=serving tiny\n"
        assert notifier.status("line one\nline two")
        assert receive(listener) == "STATUS=line one line two\n"
        assert notifier.stopping() and receive(listener) == "STOPPING=1\n"
        assert notifier.watchdog() and receive(listener) == "WATCHDOG=1\n"
        assert notifier.extend_timeout(2.5) and receive(listener) == "EXTEND_TIMEOUT_USEC=2500000\n"
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert notifier.reloading()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        lines = dict(line.split("=", 1) for line in receive(listener).splitlines())
        assert lines["RELOADING"] == "1" and before <= int(lines["MONOTONIC_USEC"]) <= after


def test_notifier_reaches_an_abstract_socket() -> None:
    name = f"prewarm-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(b"\0" + name.encode())
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).send(READY=1, STATUS="up")
        assert receive(listener) == "READY=1\nSTATUS=up\n"


def test_notifier_without_a_socket_is_a_quiet_no_op(short_dir: Path) -> None:
    assert not Notifier({}).ready("x") and not Notifier({}).enabled
    assert not Notifier({"NOTIFY_SOCKET": "vsock:2:1234"}).watchdog()
    assert not Notifier({"NOTIFY_SOCKET": str(short_dir / "nobody-listens")}).ready()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval_is_half_the_timeout_and_only_for_us(env: dict[str, str], expected: float | None) -> None:
    assert Notifier(env).watchdog_interval() == expected


# sd_listen_fds(3)

CHILD_ADOPTS = """
import json, os, sys
from prewarm.notify import listen_sockets
os.dup2(int(sys.argv[1]), 3)
os.dup2(int(sys.argv[2]), 4)
os.close(int(sys.argv[1])); os.close(int(sys.argv[2]))
env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "public:handoff"}
sockets = listen_sockets(env)
print(json.dumps([[n, s.fileno(), int(s.family), int(s.type), os.get_inheritable(s.fileno())] for n, s in sockets]), flush=True)
conn, _ = sockets[0][1].accept()
conn.sendall(b"accepted by the child")
"""


def test_listen_sockets_adopts_what_systemd_passes(short_dir: Path) -> None:
    unix = bind_unix(short_dir / "public.sock", 0o600)
    tcp = socket.create_server(("127.0.0.1", 0))
    # Far above 3 and 4, so the child's dup2 onto 3 and 4 cannot overwrite one of them.
    high = [fcntl.fcntl(s.fileno(), fcntl.F_DUPFD_CLOEXEC, 20) for s in (unix, tcp)]
    try:
        with subprocess.Popen(
            [sys.executable, "-c", CHILD_ADOPTS, *map(str, high)], pass_fds=high, stdout=subprocess.PIPE, text=True, cwd=ROOT
        ) as child:
            assert child.stdout is not None
            adopted = json.loads(child.stdout.readline())
            with dial_unix(short_dir / "public.sock") as conn:
                assert conn.recv(100) == b"accepted by the child"
            assert child.wait(timeout=10) == 0
    finally:
        for fd in high:
            os.close(fd)
        unix.close()
        tcp.close()
    assert adopted == [
        ["public", 3, socket.AF_UNIX, socket.SOCK_STREAM, False],
        ["handoff", 4, socket.AF_INET, socket.SOCK_STREAM, False],
    ]


def test_listen_sockets_ignores_variables_meant_for_another_process() -> None:
    assert listen_sockets({}) == []
    assert listen_sockets({"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "2"}) == []
    assert listen_sockets({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}) == []
    with pytest.raises(ActivationError) as info:
        listen_sockets({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "two"})
    assert "LISTEN_FDS" in str(info.value) and info.value.hint


# SO_PEERCRED, SO_PEERGROUPS and the access policy


def test_peer_of_a_socketpair_is_this_process() -> None:
    a, b = socket.socketpair()
    with a, b:
        peer = peer_of(a)
    assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.geteuid(), os.getegid())
    assert set(peer.groups) == set(os.getgroups())
    assert AccessPolicy().allows(peer) and AccessPolicy().may_control(peer)


CHILD_CONNECTS = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.recv(1)
"""


@pytest.mark.parametrize("groups", [(), (4242, 4343)])
def test_peer_of_another_user_and_what_the_policy_lets_them_do(shared_dir: Path, groups: tuple[int, ...]) -> None:
    listener = bind_unix(shared_dir / "s", 0o666)
    with listener, subprocess.Popen([*as_nobody(CHILD_CONNECTS, *groups), str(shared_dir / "s")]) as child:
        listener.settimeout(10)
        conn, _ = listener.accept()
        with conn:
            peer = peer_of(conn)
            conn.sendall(b"x")
        assert child.wait(timeout=10) == 0
    assert peer == Peer(pid=child.pid, uid=NOBODY, gid=NOBODY, groups=groups)
    assert not AccessPolicy().allows(peer)
    assert AccessPolicy(uids=frozenset({NOBODY})).allows(peer)
    assert AccessPolicy(gids=frozenset({NOBODY})).allows(peer)  # the primary group
    assert AccessPolicy(gids=frozenset({4343})).allows(peer) == (4343 in groups)  # a supplementary one
    assert not AccessPolicy(uids=frozenset({NOBODY})).may_control(peer)


def test_access_policy_trusts_root_and_the_owner_never_the_pid() -> None:
    policy = AccessPolicy(uids=frozenset({1001}), gids=frozenset({2002}), owner=999)
    assert policy.allows(Peer(1, 0, 0)) and policy.may_control(Peer(1, 0, 0))
    assert policy.allows(Peer(1, 999, 5)) and policy.may_control(Peer(1, 999, 5))
    assert policy.allows(Peer(1, 1001, 5)) and not policy.may_control(Peer(1, 1001, 5))
    assert policy.allows(Peer(1, 7, 5, (3, 2002))) and not policy.may_control(Peer(1, 7, 2002))
    assert not policy.allows(Peer(os.getpid(), 7, 5, (3, 4)))


# bind_unix, remove_unix, dial_unix, private_runtime_dir


def test_bind_unix_has_mode_and_group_from_the_start(short_dir: Path) -> None:
    umask = os.umask(0o022)
    os.umask(umask)
    path = short_dir / "s"
    with bind_unix(path, 0o660, gid=NOBODY):
        st = os.lstat(path)  # the first look at it: no chmod or chown may come later
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
        assert (st.st_uid, st.st_gid) == (os.geteuid(), NOBODY)
        assert os.umask(umask) == umask  # restored
        with dial_unix(path, timeout=5):
            pass
    os.unlink(path)
    with bind_unix(path, 0o600) as sock:
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        assert remove_unix(path, sock) and not path.exists()


def plant_symlink(path: Path) -> None:
    (path.parent / "target").write_text("precious")
    path.symlink_to(path.parent / "target")


def plant_socket(path: Path, owner: int | None = None, listening: bool = False) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    if listening:
        sock.listen()
    if owner is not None:
        os.chown(path, owner, owner, follow_symlinks=False)
    return sock


PLANTED: dict[str, Callable[[Path], object]] = {
    "symlink": plant_symlink,
    "dangling symlink": lambda p: p.symlink_to(p.parent / "nowhere"),
    "regular file": lambda p: p.write_text("keep me"),
    "directory": lambda p: p.mkdir(),
    "live socket": lambda p: plant_socket(p, listening=True),
    "another user's stale socket": lambda p: plant_socket(p, owner=NOBODY),
}


@pytest.mark.parametrize("kind", PLANTED)
def test_bind_unix_refuses_and_keeps_what_it_did_not_make(short_dir: Path, kind: str) -> None:
    path = short_dir / "s"
    planted = PLANTED[kind](path)
    before = os.lstat(path)
    try:
        with pytest.raises(SocketPathError) as info:
            bind_unix(path, 0o660)
        assert info.value.path == str(path) and info.value.hint
        after = os.lstat(path)
        assert (after.st_ino, after.st_mode, after.st_uid) == (before.st_ino, before.st_mode, before.st_uid)
        if kind == "symlink":
            assert (short_dir / "target").read_text() == "precious"
    finally:
        if isinstance(planted, socket.socket):
            planted.close()


def test_bind_unix_replaces_its_own_stale_socket(short_dir: Path) -> None:
    path = short_dir / "s"
    bind_unix(path, 0o660).close()  # a daemon that died without cleaning up
    with pytest.raises(ConnectionRefusedError):
        dial_unix(path)
    with bind_unix(path, 0o660), dial_unix(path):
        pass


def test_remove_unix_leaves_a_path_that_is_no_longer_ours(short_dir: Path) -> None:
    path = short_dir / "s"
    with bind_unix(path, 0o660) as sock:
        os.unlink(path)
        path.write_text("someone else's now")
        assert not remove_unix(path, sock)
        assert path.read_text() == "someone else's now"
    with plant_socket(short_dir / "t") as other:
        assert not remove_unix(short_dir / "t", other)  # not made by bind_unix: systemd's, say
        assert (short_dir / "t").exists()


def test_socket_paths_longer_than_sun_path_are_refused_clearly(short_dir: Path) -> None:
    path = short_dir / ("x" * 110)
    for attempt in (lambda: bind_unix(path, 0o660), lambda: dial_unix(path)):
        with pytest.raises(SocketPathError) as info:
            attempt()
        assert "107" in info.value.message and info.value.hint


def test_private_runtime_dir_is_new_private_and_short(short_dir: Path) -> None:
    first, second = private_runtime_dir(short_dir), private_runtime_dir(short_dir)
    assert first != second and first.parent == short_dir and first.name.startswith("prewarm-")
    assert stat.S_IMODE(first.stat().st_mode) == 0o700


# the handoff, end to end


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 5

    def do_GET(self) -> None:
        self._answer(b"")

    def do_POST(self) -> None:
        self._answer(self.rfile.read(int(self.headers.get("Content-Length", "0"))))

    def _answer(self, body: bytes) -> None:
        data = json.dumps({"via": self.server.name, "path": self.path, "body": body.decode()}).encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the default names client_address[0], which a Unix socket's peer does not have


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: Path, name: str) -> None:
        self.name = name
        super().__init__(str(path), _Handler)


@contextmanager
def http_upstream(path: Path, name: str) -> Iterator[None]:
    """A real HTTP/1.1 server on a Unix socket answering ``{"via": name, ...}``."""
    server = _UnixHTTPServer(path, name)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.levelno, record.getMessage()))


@dataclass
class Stack:
    """The engine and gateway stand-ins, and a HandoffServer on an event loop in a thread."""

    directory: Path
    loop: asyncio.AbstractEventLoop
    server: HandoffServer
    records: _Records
    target: list[tuple[Path, dict[str, object]] | None] = field(default_factory=list)

    @property
    def public(self) -> Path:
        return self.directory / "public.sock"

    @property
    def handoff_path(self) -> Path:
        return self.directory / "public.sock.handoff"

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)

    def counts(self) -> dict[str, int]:
        """Read on the loop: a client may hold its descriptor before the server's task has counted it."""

        async def read() -> dict[str, int]:
            return self.server.counts.as_dict()

        return self.run(read())


@contextmanager
def running_stack(directory: Path, mode: int = 0o660) -> Iterator[Stack]:
    engine = directory / "engine.sock"
    records = _Records()
    log = logging.getLogger(f"tests.handoff.{uuid.uuid4().hex}")
    log.addHandler(records)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    with http_upstream(engine, "engine"), http_upstream(directory / "public.sock", "gateway"):
        listener = bind_unix(directory / "public.sock.handoff", mode)
        target: list[tuple[Path, dict[str, object]] | None] = [(engine, {"model": "tiny", "engine": {"socket": engine}})]
        server = HandoffServer(listener, AccessPolicy(), lambda: target[0], log, state=lambda: "starting")
        stack = Stack(directory, loop, server, records, target)
        stack.run(server.start())
        try:
            yield stack
        finally:
            stack.run(server.close())
            remove_unix(stack.handoff_path, listener)
            listener.close()
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=5)
            loop.close()


@pytest.fixture
def stack(short_dir: Path) -> Iterator[Stack]:
    with running_stack(short_dir) as running:
        yield running


def http_get(sock: socket.socket, path: str) -> dict[str, Any]:
    conn = http.client.HTTPConnection("prewarm")
    conn.sock = sock
    conn.request("GET", path)
    response = conn.getresponse()
    assert response.status == 200
    return dict(json.loads(response.read()))


def test_handoff_gives_a_connection_straight_to_the_engine(stack: Stack) -> None:
    sock, info = handoff(stack.handoff_path)
    with sock:
        assert info == {"model": "tiny", "engine": {"socket": str(stack.directory / "engine.sock")}, "ok": True}
        assert not os.get_inheritable(sock.fileno()) and sock.getblocking()
        assert http_get(sock, "/v1/models") == {"via": "engine", "path": "/v1/models", "body": ""}
    assert stack.counts() == {"served": 1, "refused": 0, "not_ready": 0, "failed": 0}


def test_handoff_wire_format_is_one_line_with_one_blocking_descriptor(stack: Stack) -> None:
    """What a client in any language sees: one recvmsg(2) holds the whole line and the descriptor."""
    with dial_unix(stack.handoff_path) as conn:
        conn.settimeout(5)
        line, fds, _, _ = socket.recv_fds(conn, 65536, 4)
    assert line.endswith(b"\n") and line.count(b"\n") == 1 and json.loads(line)["ok"] is True
    assert len(fds) == 1
    with socket.socket(fileno=fds[0]) as engine:
        assert fcntl.fcntl(engine.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK == 0
        assert http_get(engine, "/")["via"] == "engine"


def test_handoff_serves_many_clients_at_once(stack: Stack) -> None:
    results: list[str] = []

    def one() -> None:
        sock, _ = handoff(stack.handoff_path)
        with sock:
            results.append(http_get(sock, "/")["via"])

    threads = [threading.Thread(target=one) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert results == ["engine"] * 20 and stack.counts()["served"] == 20


CHILD_ASKS = """
import json, sys
from prewarm.client import HandoffError, handoff
try:
    handoff(sys.argv[1])
except HandoffError as exc:
    print(json.dumps({"reason": exc.reason, "reply": exc.reply, "hint": exc.hint}))
"""


def test_handoff_refuses_a_user_not_allowed(shared_dir: Path) -> None:
    with running_stack(shared_dir, mode=0o666) as stack:
        child = subprocess.run(
            [*as_nobody(CHILD_ASKS), str(stack.handoff_path)], capture_output=True, text=True, timeout=30, cwd="/"
        )
        assert child.returncode == 0, child.stderr
        answer = json.loads(child.stdout)
        assert answer["reason"] == "forbidden" and answer["reply"]["uid"] == NOBODY and "allowed_users" in answer["hint"]
        assert stack.counts()["refused"] == 1 and stack.counts()["served"] == 0
        warnings = [text for level, text in stack.records.lines if level >= logging.WARNING]
        assert len(warnings) == 1 and f"uid {NOBODY}" in warnings[0] and "pid" in warnings[0]


def test_handoff_says_not_ready_while_no_engine_is_hot(stack: Stack) -> None:
    stack.target[0] = None
    with pytest.raises(HandoffError) as info:
        handoff(stack.handoff_path)
    assert info.value.reason == "not ready" and info.value.reply["state"] == "starting" and info.value.hint
    assert stack.counts()["not_ready"] == 1


def test_handoff_says_so_when_the_engine_does_not_answer(stack: Stack) -> None:
    stack.target[0] = (stack.directory / "gone.sock", {})
    with pytest.raises(HandoffError) as info:
        handoff(stack.handoff_path)
    assert info.value.reason == "engine unreachable"
    assert stack.counts()["failed"] == 1


def test_handoff_waits_for_a_busy_engine_and_never_hands_out_an_unconnected_socket(stack: Stack) -> None:
    busy = stack.directory / "busy.sock"
    with socket.socket(socket.AF_UNIX) as engine, socket.socket(socket.AF_UNIX) as first:
        engine.bind(str(busy))
        engine.listen(0)
        first.connect(str(busy))  # the backlog is full: the next connect(2) says EAGAIN
        stack.target[0] = (busy, {})
        got: list[socket.socket] = []
        asking = threading.Thread(target=lambda: got.append(handoff(stack.handoff_path)[0]))
        asking.start()
        time.sleep(0.3)
        assert not got  # still waiting for the engine
        engine.accept()[0].close()  # room in the backlog again
        asking.join(timeout=10)
        engine.settimeout(5)
        served, _ = engine.accept()
        with got[0] as handed, served:
            handed.sendall(b"ping")
            assert served.recv(4) == b"ping"
    assert stack.counts()["served"] == 1


def test_handoff_survives_a_failing_target(stack: Stack) -> None:
    def broken() -> None:
        raise RuntimeError("bug in the daemon")

    stack.server._target = broken
    with pytest.raises(HandoffError) as info:
        handoff(stack.handoff_path)
    assert "without answering" in info.value.message and stack.counts()["failed"] == 1
    assert any(level == logging.ERROR and "handoff failed" in text for level, text in stack.records.lines)
    stack.server._target = lambda: stack.target[0]
    sock, _ = handoff(stack.handoff_path)  # and it still serves the next client
    sock.close()


def test_httpx_transport_goes_by_handoff_and_reuses_the_connection(stack: Stack) -> None:
    with connect(stack.public) as client:
        first = client.get("/v1/models").json()
        second = client.post("/v1/completions", json={"prompt": "hi"}).json()
    assert first["via"] == second["via"] == "engine"
    assert json.loads(second["body"]) == {"prompt": "hi"}
    assert stack.counts()["served"] == 1  # one handoff, one kept-alive connection


def test_httpx_transport_falls_back_to_the_public_socket(stack: Stack) -> None:
    def via(transport: PrewarmTransport) -> str:
        with httpx.Client(transport=transport, base_url="http://prewarm", trust_env=False) as client:
            return str(client.get("/health").json()["via"])

    assert via(PrewarmTransport(stack.public, handoff_path=stack.directory / "missing")) == "gateway"
    assert via(PrewarmTransport(stack.public, handoff=False)) == "gateway"
    assert stack.counts() == {"served": 0, "refused": 0, "not_ready": 0, "failed": 0}
    stack.target[0] = None
    assert via(PrewarmTransport(stack.public)) == "gateway"
    assert stack.counts()["not_ready"] == 1


def test_httpx_transport_says_connect_error_when_nothing_listens(short_dir: Path) -> None:
    with connect(short_dir / "none.sock") as client, pytest.raises(httpx.ConnectError):
        client.get("/health")
