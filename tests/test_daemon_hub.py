"""The daemon on a hub model, the way a GPU host runs Qwen/Qwen2.5-7B-Instruct: fetched from a hub
(a real HTTP server on loopback speaking huggingface_hub's protocol), pinned to the commit, resharded,
verified, warmed and served under the repo id by real vLLM; and a stop during a long download."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hubserver import Hub
from tests.test_daemon import START_TIMEOUT, client, engine_processes, start_daemon, stop, wait_for_state

REPO = "Qwen/Tiny-Qwen2"
COMMIT = "3" * 40


@pytest.fixture
def hub(tiny_model: Path) -> Iterator[Hub]:
    server = Hub().start()
    server.add_commit(REPO, tiny_model, COMMIT, refs=("main",))
    yield server
    server.stop()


def hub_env(hub: Hub, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for name in [k for k in os.environ if k.startswith("HF_")]:
        monkeypatch.delenv(name)  # start_daemon copies os.environ: no HF_HUB_OFFLINE or token of the host
    return {"HF_ENDPOINT": hub.url, "HF_HOME": str(workdir / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"}


def test_a_hub_model_is_fetched_pinned_and_served_under_its_repo_id(
    hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    running = start_daemon(Path(REPO), tmp_path, env_extra=hub_env(hub, tmp_path, monkeypatch))
    try:
        running.read_notify("READY=1", START_TIMEOUT)
        status = running.status()
        assert [p["name"] for p in status["phases"]][:2] == ["fetch", "reshard"], status["phases"]
        assert status["model"]["served_name"] == REPO and status["model"]["source"] == REPO
        assert COMMIT in status["model"]["serving_dir"], "the serving directory is the pinned commit's"
        with client(running.socket) as c:
            assert c.get("/v1/models").json()["data"][0]["id"] == REPO
            answer = c.post("/v1/completions", json={"model": REPO, "prompt": "Hi", "max_tokens": 2})
        assert answer.status_code == 200, answer.text
    finally:
        stop(running)


def test_sigterm_during_a_long_download_stops_at_once_and_keeps_the_partial(
    hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in hub.repos[REPO].commits[COMMIT]:
        if name.endswith(".safetensors"):
            hub.bytes_per_second[name] = 20_000  # ~1 MB each: a minute per shard
    running = start_daemon(Path(REPO), tmp_path, env_extra=hub_env(hub, tmp_path, monkeypatch))
    try:
        status = wait_for_state(running, "fetching", 60)
        deadline = time.monotonic() + 60
        while (status := running.status())["progress"]["done_bytes"] == 0:
            assert time.monotonic() < deadline, status
            time.sleep(0.1)
        assert status["progress"]["total_bytes"] > status["progress"]["done_bytes"] > 0, status["progress"]
        running.read_notify("STATUS=fetching: ", 30)  # systemctl status shows how far it got
        assert any(m.startswith("EXTEND_TIMEOUT_USEC=") for m in running.messages)
        asked = time.monotonic()
        running.proc.send_signal(signal.SIGTERM)
        assert running.proc.wait(30) == 0
        took = time.monotonic() - asked
        assert took < 10, f"the stop waited {took:.1f} s for the download"
        assert engine_processes(running) == [] and not running.socket.exists()
        partial = list((tmp_path / "cache").rglob(".prewarm-partial/*"))
        assert any(p.name.endswith(".safetensors.part") for p in partial), "resumable: the partial downloads stay"
    finally:
        stop(running)
