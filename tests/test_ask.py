"""`prewarm ask`, `chat` and `status` (the daemon's) where no engine is ready: no daemon, a socket
nobody listens on, a socket this user may not open, bad options, a daemon whose weights fail
verification, and one still starting (real daemons, real vLLM that cannot load the model).
The answers of a ready engine are tested with the one daemon of tests/test_daemon.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from prewarm.config import SERVICE_SOCKET, default_socket
from tests.helpers import ROOT, assert_clean_failure, run_prewarm
from tests.test_daemon import START_TIMEOUT, as_nobody, damaged_serving_dir, start_daemon, stop, wait_for_state

CLIENT_COMMANDS = (("ask", "Hello"), ("chat",), ("status",))


@pytest.mark.parametrize("command", CLIENT_COMMANDS, ids=lambda c: c[0])
def test_no_daemon_is_one_line_naming_the_socket_and_how_to_start_it(command: tuple[str, ...], tmp_path: Path) -> None:
    missing = tmp_path / "api.sock"
    proc = run_prewarm(*command, "--socket", missing, input="Hello\n")
    assert_clean_failure(proc, 4, str(missing), "the daemon is not running")
    assert "systemctl start qwen-prewarm" in proc.stderr and f"--socket {missing}" in proc.stderr


def test_a_socket_nobody_listens_on_is_a_daemon_that_is_not_running(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as left:
        left.bind(str(path))  # the file stays; with no listen(2), connect(2) says ECONNREFUSED
    for command in CLIENT_COMMANDS:
        proc = run_prewarm(*command, "--socket", path, input="Hello\n")
        assert_clean_failure(proc, 4, str(path), "nothing listens on this socket")
        assert "systemctl start qwen-prewarm" in proc.stderr


def test_the_default_socket_is_the_services_unless_prewarm_socket_says_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PREWARM_SOCKET", raising=False)
    assert default_socket() == SERVICE_SOCKET == Path("/run/qwen-prewarm/api.sock")
    monkeypatch.setenv("PREWARM_SOCKET", str(tmp_path / "elsewhere.sock"))
    assert default_socket() == tmp_path / "elsewhere.sock"
    proc = run_prewarm("status")  # no DIRECTORY: the daemon's status, at $PREWARM_SOCKET
    assert_clean_failure(proc, 4, str(tmp_path / "elsewhere.sock"), "the daemon is not running")


def test_a_socket_this_user_may_not_open_names_the_setting_that_grants_it(shared_dir: Path) -> None:
    path = shared_dir / "api.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen()
        os.chmod(path, 0o660)  # unix(7): connecting needs write permission on the socket file
        proc = as_nobody(sys.executable, "-m", "prewarm", "ask", "--socket", str(path), "Hello")
    assert_clean_failure(proc, 4, str(path), "is not allowed to connect")
    assert "socket_group" in proc.stderr and "usermod -aG root nobody" in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("ask", "--temperature", "-1", "Hi"), "'--temperature': -1.0 is not in the range x>=0.0"),
        (("ask", "--temperature", "nan", "Hi"), "'--temperature': nan is not a finite number"),
        (("ask", "--top-p", "0", "Hi"), "'--top-p': 0.0 is not in the range 0.0<x<=1.0"),
        (("ask", "--top-p", "1.5", "Hi"), "'--top-p': 1.5 is not in the range"),
        (("ask", "--max-tokens", "0", "Hi"), "'--max-tokens': 0 is not in the range x>=1"),
        (("ask", "--seed", "-1", "Hi"), "'--seed': -1 is not in the range"),
        (("ask", "   "), "an empty PROMPT was given"),
        (("chat", "--temperature", "inf"), "'--temperature': inf is not a finite number"),
        (("status", "/tmp", "--socket", "/tmp/x.sock"), "give a DIRECTORY or --socket, not both"),
    ],
)
def test_bad_option_values_are_refused_before_any_connection(args: tuple[str, ...], needle: str, tmp_path: Path) -> None:
    proc = run_prewarm(*args, env={**os.environ, "PREWARM_SOCKET": str(tmp_path / "none.sock")}, input="Hi\n")
    assert_clean_failure(proc, 2, needle)  # 2, not 4: refused before looking for the socket


def test_a_daemon_whose_weights_fail_verification(tiny_model: Path, tmp_path: Path) -> None:
    running = start_daemon(damaged_serving_dir(tiny_model, tmp_path), tmp_path)
    try:
        wait_for_state(running, "failed", 60)
        for command in (("ask", "Hello"), ("chat",)):
            proc = run_prewarm(*command, "--socket", running.socket, input="Hello\n")
            assert_clean_failure(proc, 6, str(running.socket), "the daemon failed: ", "failed verification")
            assert "systemctl reload qwen-prewarm" in proc.stderr
        shown = run_prewarm("status", "--socket", running.socket)
        assert shown.returncode == 1 and "Traceback" not in shown.stderr, shown.stderr
        assert "state:     failed" in shown.stdout and "failed verification" in shown.stdout, shown.stdout
        assert "engine:    none" in shown.stdout
        as_json = run_prewarm("status", "--socket", running.socket, "--json")
        status = json.loads(as_json.stdout)
        assert as_json.returncode == 1 and status["state"] == "failed" and status["engine"] is None
    finally:
        stop(running)


def test_ask_shows_what_a_starting_daemon_waits_for_then_its_failure(tiny_model: Path, tmp_path: Path) -> None:
    """vLLM takes seconds to import before it finds it cannot load the model: state starting, then
    failed. Meanwhile a first `ask` is interrupted (Ctrl-C while waiting), a second waits it out."""
    model = Path(shutil.copytree(tiny_model, tmp_path / "odd"))
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchModelForCausalLM"]}))
    running = start_daemon(model, tmp_path)
    try:
        interrupted, first_line = ask_then_interrupt(running.socket)
        assert first_line.startswith("waiting for the daemon"), first_line
        assert interrupted.returncode == 130 and "Traceback" not in interrupted.stderr, interrupted.stderr
        assert "Interrupted" in interrupted.stderr

        proc = run_prewarm("ask", "--socket", running.socket, "Hello", timeout=START_TIMEOUT)
        assert_clean_failure(proc, 6, str(running.socket), "the daemon failed: ", "NoSuchModelForCausalLM")
        waiting = [line for line in proc.stderr.splitlines() if line.startswith("waiting for the daemon")]
        assert waiting and "state starting, the vLLM engine is starting" in waiting[-1], proc.stderr
        assert "done: reshard " in waiting[-1] and "verify " in waiting[-1] and "warm " in waiting[-1], waiting
        assert len(waiting) == len({line.split(": ", 1)[1] for line in waiting}), "a line per change, not per look"
        assert proc.stderr.index("waiting for the daemon") < proc.stderr.index("Error:")
        assert proc.stdout == ""
    finally:
        stop(running)


def ask_then_interrupt(sock: Path) -> tuple[subprocess.CompletedProcess[str], str]:
    """`prewarm ask`, sent SIGINT (Ctrl-C) once it has said it is waiting; its result and that first line."""
    cmd = [sys.executable, "-m", "prewarm", "ask", "--socket", str(sock), "Hello"]
    previous = signal.signal(signal.SIGINT, signal.SIG_DFL)  # an ignored SIGINT would be inherited (bash's `cmd &`)
    try:
        asker = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    with asker:
        assert asker.stderr is not None
        first = asker.stderr.readline()
        asker.send_signal(signal.SIGINT)
        out, err = asker.communicate(timeout=60)
    return subprocess.CompletedProcess(cmd, asker.returncode, out, first + err), first


def test_the_waiting_line_names_the_stage_and_says_its_progress_a_tenth_at_a_time(capsys: pytest.CaptureFixture[str]) -> None:
    """While the daemon prepares (a first download can take many minutes), its stage's bytes come
    with the status; off a terminal, a line each tenth, as the stages' own progress does."""
    from prewarm.ask import Waiting
    from prewarm.cli import _WaitDisplay

    display = _WaitDisplay(quiet=False)
    for megabytes in range(0, 101, 5):
        display.show(Waiting("fetching", (), 2.0, "fetching Qwen/X", megabytes * 10**6, 100 * 10**6))
    display.show(Waiting("verifying", (("fetch", 61.5),), 63.0, "verifying", 0, 100 * 10**6))
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 12, lines
    assert lines[5] == (
        "waiting for the daemon (2 s): state fetching, downloading the weights from the hub (fetching Qwen/X: 50% of 100.00 MB)"
    ), lines[5]
    assert lines[-1].endswith("state verifying, verifying the weights (verifying: 0% of 100.00 MB); done: fetch 61.50 s")
