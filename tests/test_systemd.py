"""The daemon started the way systemd starts it: the service unit's own ExecStart line, the
listening sockets passed by the real `systemd-socket-activate` (LISTEN_FDS), sd_notify on a
socket the test binds, SIGHUP as ExecReload sends it, SIGTERM as systemctl stop does; and the
descriptor store (FDSTORE=1) that keeps the sockets listening across a restart without a
.socket unit."""

from __future__ import annotations

import array
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from tests.helpers import ROOT
from tests.test_daemon import START_TIMEOUT, Running, client, damaged_serving_dir, engine_processes, stop

UNIT = ROOT / "systemd" / "qwen-prewarm.service"
PREWARM = Path(sys.executable).parent / "prewarm"


def exec_start(config: Path) -> list[str]:
    """The unit's ExecStart command with this venv's prewarm and a test config in place of /etc's."""
    lines = [line for line in UNIT.read_text().splitlines() if line.startswith("ExecStart=")]
    assert len(lines) == 1, lines
    argv = shlex.split(lines[0].removeprefix("ExecStart="))
    assert Path(argv[0]).name == "prewarm" and argv[1] == "daemon", argv
    assert argv[2:] == ["--config", "/etc/prewarm/qwen-prewarm.toml"], argv
    return [str(PREWARM), "daemon", "--config", str(config)]


def short_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="pw-", dir="/tmp"))  # sun_path holds 107 bytes
    path.chmod(0o755)
    return path


def write_config(path: Path, model: Path, sock: Path, cache: Path, **extra: str) -> Path:
    lines = [f'model = "{model}"', f'socket = "{sock}"', f'cache_dir = "{cache}"', *(f"{k} = {v}" for k, v in extra.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def notify_socket(directory: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(directory / "notify"))
    return sock


def socket_activated(model: Path, workdir: Path, **config: str) -> Running:
    """`systemd-socket-activate` listening on the public and handoff sockets, as qwen-prewarm.socket
    does; like systemd, it starts the daemon on the first connection."""
    short = short_dir()
    sock = short / "api.sock"
    cfg = write_config(workdir / "prewarm.toml", model, sock, workdir / "cache", **config)
    env = {"PYTHONPATH": str(ROOT), "NOTIFY_SOCKET": str(short / "notify"), "RUNTIME_DIRECTORY": str(short)}
    notify = notify_socket(short)
    log = workdir / "daemon.log"
    names = "--fdname=qwen-prewarm.socket:qwen-prewarm.socket"  # a .socket unit's default names
    cmd = ["systemd-socket-activate", "-l", str(sock), "-l", f"{sock}.handoff", names]
    cmd += [f"-E{k}={v}" for k, v in env.items()]
    with open(log, "w") as out:
        cmd += ["--", *exec_start(cfg)]
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 30
    while not Path(f"{sock}.handoff").exists():
        assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
        time.sleep(0.05)
    running = Running(proc, sock, notify, log)
    threading.Thread(target=running.collect_notifications, daemon=True).start()
    return running


def completion(sock: Path, answers: list[httpx.Response]) -> threading.Thread:
    def ask() -> None:
        with client(sock, timeout=START_TIMEOUT) as c:
            answers.append(c.post("/v1/completions", json={"model": "model", "prompt": "Hi", "max_tokens": 3}))

    thread = threading.Thread(target=ask)
    thread.start()
    return thread


def count(running: Running, needle: str) -> int:
    return sum(needle in m for m in running.messages)


def test_socket_activated_service_notifies_reloads_and_stops(tiny_model: Path, tmp_path: Path) -> None:
    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    running = socket_activated(model, tmp_path, reload='"restart"')
    try:
        inode = os.stat(running.socket).st_ino
        assert running.messages == [], "nothing runs before the first client, as with a .socket unit"
        answers: list[httpx.Response] = []
        first = completion(running.socket, answers)  # connects before the daemon even runs
        running.read_notify("READY=1", START_TIMEOUT)
        first.join(60)
        assert [a.status_code for a in answers] == [200], [a.text for a in answers]
        statuses = [m for m in running.messages if m.startswith("STATUS=")]
        assert any("STATUS=verifying" in m for m in statuses) and any("STATUS=starting" in m for m in statuses), statuses
        assert any(m.startswith("EXTEND_TIMEOUT_USEC=") for m in running.messages), running.messages
        assert not any(m.startswith("FDSTORE=") for m in running.messages), "passed sockets stay with the .socket unit"
        assert os.stat(running.socket).st_ino == inode, "the daemon serves on systemd's socket, never its own"
        status = running.status()
        assert status["state"] == "ready" and status["socket"] == str(running.socket)

        before = status["engine"]["id"]
        running.proc.send_signal(signal.SIGHUP)  # ExecReload=/bin/kill -HUP $MAINPID
        running.read_notify("RELOADING=1", 30)
        reloading = next(m for m in running.messages if "RELOADING=1" in m)
        assert "MONOTONIC_USEC=" in reloading, reloading  # systemd 253+ Type=notify-reload wants it
        during = completion(running.socket, answers)  # reload = "restart": it waits in the queue
        deadline = time.monotonic() + START_TIMEOUT
        while count(running, "READY=1") < 2:
            assert time.monotonic() < deadline and running.proc.poll() is None, running.log.read_text()[-3000:]
            time.sleep(0.2)
        during.join(60)
        assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
        assert running.status()["engine"]["id"] != before

        running.proc.send_signal(signal.SIGTERM)
        assert running.proc.wait(120) == 0
        running.read_notify("STOPPING=1", 5)
        assert running.socket.exists(), "the socket belongs to the .socket unit: it stays for the next start"
        assert engine_processes(running) == []
    finally:
        stop(running)


def receive_stored(notify: socket.socket, wanted: int, timeout: float) -> dict[str, int]:
    """FDSTORE=1 messages read off the notify socket as systemd would: name -> descriptor."""
    stored: dict[str, int] = {}
    notify.settimeout(timeout)
    while len(stored) < wanted:
        data, ancdata, _, _ = notify.recvmsg(4096, socket.CMSG_SPACE(4 * 4))
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        fds = array.array("i")
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        if fields.get("FDSTORE") == "1":
            assert len(fds) == 1, (fields, list(fds))
            stored[fields["FDNAME"]] = fds[0]
        else:
            for fd in fds:
                os.close(fd)
    return stored


def test_without_a_socket_unit_the_fd_store_keeps_clients_waiting_across_restarts(tiny_model: Path, tmp_path: Path) -> None:
    short = short_dir()
    sock = short / "api.sock"
    cfg = write_config(tmp_path / "prewarm.toml", damaged_serving_dir(tiny_model, tmp_path), sock, tmp_path / "cache")
    notify = notify_socket(short)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NOTIFY_SOCKET": str(short / "notify"), "RUNTIME_DIRECTORY": str(short)}
    env["FDSTORE"] = "4"  # FileDescriptorStoreMax=4 (set by systemd 254+, by our unit for older ones)
    log = tmp_path / "daemon.log"
    stored: dict[str, int] = {}
    procs: list[subprocess.Popen[str]] = []
    try:
        with open(log, "w") as out:
            procs.append(subprocess.Popen(exec_start(cfg), stdout=out, stderr=subprocess.STDOUT, text=True, env=env))
        stored = receive_stored(notify, 2, 30)
        assert set(stored) == {"public", "handoff"}
        with socket.socket(fileno=os.dup(stored["public"])) as public:
            assert public.getsockname() == str(sock)
        with client(sock) as c:
            assert c.get("/health").status_code == 503  # served, failed: no engine to wait for
        procs[0].send_signal(signal.SIGTERM)
        assert procs[0].wait(60) == 0
        assert sock.exists(), "the store keeps the socket listening: its file stays"

        answers: list[int] = []

        def ask_while_down() -> None:
            with client(sock, timeout=60) as c:
                answers.append(c.get("/prewarm/status").status_code)

        asker = threading.Thread(target=ask_while_down)
        asker.start()  # connects to the stored socket while no daemon runs: queued, not refused
        time.sleep(1)
        assert answers == [] and asker.is_alive()
        # systemd starts the service again with the stored descriptors from fd 3 on
        fds = [stored["public"], stored["handoff"]]
        shim = "import os,sys; [os.dup2(int(fd), 3 + i) for i, fd in enumerate(sys.argv[1:3])]; "
        shim += "os.environ['LISTEN_PID'] = str(os.getpid()); os.execv(sys.argv[3], sys.argv[3:])"
        restart_env = {**env, "LISTEN_FDS": "2", "LISTEN_FDNAMES": "public:handoff"}
        argv = [sys.executable, "-c", shim, *map(str, fds), *exec_start(cfg)]
        with open(log, "a") as out:
            procs.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, text=True, env=restart_env, pass_fds=fds))
        asker.join(60)
        assert answers == [200], log.read_text()[-3000:]
        deadline = time.monotonic() + 60  # the status answers while it still verifies: the verdict may come later
        while "failed verification" not in log.read_text():
            assert time.monotonic() < deadline and procs[1].poll() is None, log.read_text()[-3000:]
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGTERM)
        assert procs[1].wait(60) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for fd in stored.values():
            os.close(fd)
        notify.close()
        shutil.rmtree(short, ignore_errors=True)


def test_a_passed_socket_the_config_does_not_name_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    short = short_dir()
    cfg = write_config(tmp_path / "prewarm.toml", tiny_model, short / "api.sock", tmp_path / "cache")
    other = short / "other.sock"
    cmd = ["systemd-socket-activate", "-l", str(other), f"-EPYTHONPATH={ROOT}", "--", *exec_start(cfg)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not other.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with socket.socket(socket.AF_UNIX) as knock:  # the first connection starts the daemon
            knock.connect(str(other))
            out, _ = proc.communicate(timeout=60)
        assert proc.returncode not in (0, None) and "Traceback" not in out, out
        errors = [line for line in out.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and str(other) in errors[0] and "neither" in errors[0], out
        assert not (short / "api.sock").exists(), "nothing bound in its place"
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(short, ignore_errors=True)
