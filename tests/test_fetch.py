"""fetch against a real HTTP server on loopback that speaks the hub's protocol (tests/hubserver.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from prewarm.manifest import read_manifest
from tests.helpers import ROOT, assert_clean_failure, run_prewarm
from tests.hubserver import Hub

REPO = "Qwen/Tiny-Qwen2"
OLD, NEW = "1" * 40, "2" * 40
SHARD = "model-00002-of-00004.safetensors"


@pytest.fixture(scope="module")
def snapshots(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two commits of the repo: the new one changes config.json; both carry a pickle."""
    old = Path(shutil.copytree(tiny_model, tmp_path_factory.mktemp("old") / "repo"))
    (old / "pytorch_model.bin").write_bytes(b"a pickle that could run code")
    (old / "README.md").write_text("# Tiny\n")
    new = Path(shutil.copytree(old, tmp_path_factory.mktemp("new") / "repo"))
    config = json.loads((new / "config.json").read_text())
    (new / "config.json").write_text(json.dumps({**config, "prewarm_test": "new"}))
    return {OLD: old, NEW: new}


@pytest.fixture
def hub(snapshots: dict[str, Path]) -> Iterator[Hub]:
    server = Hub().start()
    server.add_commit(REPO, snapshots[OLD], OLD, refs=("v1",))
    server.add_commit(REPO, snapshots[NEW], NEW, refs=("main",))
    yield server
    server.stop()


@pytest.fixture
def env(hub: Hub, tmp_path: Path) -> dict[str, str]:
    values = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return {
        **values,
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "hf"),
        "PREWARM_CACHE": str(tmp_path / "cache"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }


def fetch(env: dict[str, str], *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = run_prewarm("fetch", REPO, "--json", *args, env=env)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def summary(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    return json.loads(proc.stdout)


def assert_same_files(directory: Path, source: Path, names: list[str]) -> None:
    for name in names:
        assert (directory / name).read_bytes() == (source / name).read_bytes(), name


def test_fresh_fetch_pins_the_commit_and_leaves_pickles_out(env: dict[str, str], hub: Hub, snapshots: dict[str, Path]) -> None:
    result = summary(fetch(env))
    assert result["commit"] == NEW and result["revision"] == "main"
    assert "pytorch_model.bin" not in result["files"] and result["skipped_pickles"] == ["pytorch_model.bin"]
    assert {
        "config.json",
        "tokenizer.json",
        "chat_template.jinja",
        "generation_config.json",
        SHARD,
        "model.safetensors.index.json",
    } <= set(result["files"])
    directory = Path(result["directory"])
    assert directory == Path(env["PREWARM_CACHE"]) / "hub" / "Qwen--Tiny-Qwen2" / NEW
    assert_same_files(directory, snapshots[NEW], result["files"])
    assert not (directory / "pytorch_model.bin").exists()
    assert not (directory / ".prewarm-partial").exists()


def test_revision_pinning_by_tag_and_by_commit(env: dict[str, str], hub: Hub, snapshots: dict[str, Path]) -> None:
    by_tag = summary(fetch(env, "--revision", "v1"))
    assert by_tag["commit"] == OLD
    assert json.loads(Path(by_tag["directory"], "config.json").read_text()).get("prewarm_test") is None
    before = len(hub.requests)
    by_commit = summary(fetch(env, "--revision", OLD))
    assert by_commit["directory"] == by_tag["directory"] and by_commit["downloaded"] == []
    assert len(hub.requests) == before, "a pinned commit already fetched needs no network at all"


def test_second_run_transfers_nothing_and_is_fast(env: dict[str, str], hub: Hub) -> None:
    fetch(env)
    before = len(hub.requests)
    again = summary(fetch(env))
    assert again["downloaded"] == [] and again["bytes_downloaded"] == 0
    assert not [r for r in hub.requests[before:] if "/resolve/" in r.path], "no file transfer"
    assert again["seconds"] < 1.0


def test_a_damaged_local_file_is_downloaded_again(env: dict[str, str], hub: Hub, snapshots: dict[str, Path]) -> None:
    directory = Path(summary(fetch(env))["directory"])
    with open(directory / SHARD, "r+b") as f:
        f.write(b"\x00\x00")
    again = summary(fetch(env))
    assert again["downloaded"] == [SHARD]
    assert_same_files(directory, snapshots[NEW], [SHARD])


@pytest.fixture
def big_repo(hub: Hub, tmp_path: Path) -> Path:
    """A repo with one 24 MiB file: huggingface_hub's http_get writes in 10 MiB blocks, so what a
    cut or a kill leaves behind is a multiple of 10 MiB."""
    big = tmp_path / "big"
    big.mkdir()
    (big / "model.safetensors").write_bytes(os.urandom(24 * 2**20))
    hub.add_commit("Qwen/Big", big, "3" * 40)
    return big / "model.safetensors"


def test_connection_cut_mid_file_resumes_with_a_range_request(env: dict[str, str], hub: Hub, big_repo: Path) -> None:
    hub.cut_after["model.safetensors"] = 15 * 2**20
    proc = run_prewarm("fetch", "Qwen/Big", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    ranges = [r.headers.get("range") for r in hub.file_requests("model.safetensors")]
    assert ranges == [None, f"bytes={10 * 2**20}-"]
    assert (Path(summary(proc)["directory"]) / "model.safetensors").read_bytes() == big_repo.read_bytes()


def test_killed_fetch_resumes_where_it_stopped(env: dict[str, str], hub: Hub, big_repo: Path, tmp_path: Path) -> None:
    hub.bytes_per_second["model.safetensors"] = 8 * 2**20
    partial = tmp_path / "cache" / "hub" / "Qwen--Big" / ("3" * 40) / ".prewarm-partial" / "model.safetensors.part"
    proc = subprocess.Popen(
        [sys.executable, "-m", "prewarm", "fetch", "Qwen/Big"],
        env={**env, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while not (partial.exists() and partial.stat().st_size > 0):
        assert time.monotonic() < deadline and proc.poll() is None, "fetch never wrote part of the file"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    kept = partial.stat().st_size
    assert 0 < kept < big_repo.stat().st_size
    del hub.bytes_per_second["model.safetensors"]
    proc = run_prewarm("fetch", "Qwen/Big", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert [r.headers.get("range") for r in hub.file_requests("model.safetensors")][-1] == f"bytes={kept}-"
    assert (Path(summary(proc)["directory"]) / "model.safetensors").read_bytes() == big_repo.read_bytes()


def test_bytes_that_do_not_match_the_hub_hash_are_deleted(env: dict[str, str], hub: Hub, snapshots: dict[str, Path]) -> None:
    hub.corrupt.add(SHARD)
    proc = fetch(env, ok=False)
    assert_clean_failure(proc, 3, SHARD, "does not match the hub's", "the bad download was deleted")
    directory = Path(env["PREWARM_CACHE"]) / "hub" / "Qwen--Tiny-Qwen2" / NEW
    assert not (directory / SHARD).exists()
    assert not list((directory / ".prewarm-partial").glob("*"))
    hub.corrupt.clear()
    assert_same_files(Path(summary(fetch(env))["directory"]), snapshots[NEW], [SHARD])


def test_offline_uses_what_is_there_and_names_what_is_missing(env: dict[str, str], hub: Hub) -> None:
    directory = Path(summary(fetch(env))["directory"])
    before = len(hub.requests)
    offline = summary(fetch({**env, "HF_HUB_OFFLINE": "1"}))
    assert offline["offline_reason"] == "HF_HUB_OFFLINE is set" and offline["commit"] == NEW
    assert len(hub.requests) == before
    (directory / "tokenizer.json").unlink()
    proc = fetch({**env, "HF_HUB_OFFLINE": "1"}, ok=False)
    assert_clean_failure(proc, 3, "HF_HUB_OFFLINE is set", "missing or changed", "tokenizer.json")


def test_unreachable_hub_falls_back_to_what_is_there(env: dict[str, str], hub: Hub) -> None:
    fetch(env)
    hub.stop()
    down = {**env, "HF_ENDPOINT": "http://127.0.0.1:9"}  # discard port: connection refused
    result = summary(fetch(down))
    assert result["offline_reason"].startswith("cannot reach http://127.0.0.1:9")
    fresh = {**down, "PREWARM_CACHE": env["PREWARM_CACHE"] + "-empty"}
    assert_clean_failure(fetch(fresh, ok=False), 3, "cannot reach", "has not been fetched here before")
    hub.server = type(hub.server)(("127.0.0.1", 0), hub.server.RequestHandlerClass)  # let teardown stop cleanly
    hub.thread = type(hub.thread)(target=hub.server.serve_forever, daemon=True)
    hub.thread.start()


def test_missing_repo_bad_revision_and_bad_id(env: dict[str, str]) -> None:
    proc = run_prewarm("fetch", "Qwen/Nope", env=env)
    assert_clean_failure(proc, 3, "repository Qwen/Nope not found")
    assert_clean_failure(fetch(env, "--revision", "nope", ok=False), 3, "revision 'nope' not found")
    assert_clean_failure(run_prewarm("fetch", "not a repo", env=env), 2, "is not a hub repository id")


def test_gated_repo_needs_a_token_and_never_prints_it(env: dict[str, str], hub: Hub) -> None:
    hub.repos[REPO].gated_token = "hf_sekrit_token_123"
    proc = fetch(env, ok=False)
    assert_clean_failure(proc, 3, f"{REPO} is gated")
    assert "HF_TOKEN" in proc.stderr
    ok = fetch({**env, "HF_TOKEN": "hf_sekrit_token_123"})
    assert summary(ok)["commit"] == NEW
    bad = fetch({**env, "HF_TOKEN": "hf_wrong_token_456"}, ok=False)
    for output in (proc, ok, bad):
        assert "hf_sekrit" not in output.stdout + output.stderr and "hf_wrong" not in output.stdout + output.stderr
    assert any(r.headers.get("authorization") == "Bearer hf_sekrit_token_123" for r in hub.requests)


def test_include_fetches_pickles_only_when_asked(env: dict[str, str]) -> None:
    result = summary(fetch(env, "--include", "*.bin", "--include", "config.json"))
    assert result["files"] == ["config.json", "pytorch_model.bin"] and result["skipped_pickles"] == []
    nothing = fetch(env, "--include", "*.gguf", ok=False)
    assert_clean_failure(nothing, 3, "none of the 12 files of Qwen/Tiny-Qwen2 at 'main' matches *.gguf")


def test_reshard_a_repo_id_goes_from_hub_to_serving_directory(env: dict[str, str], tmp_path: Path) -> None:
    proc = run_prewarm("reshard", REPO, tmp_path / "served", "--max-shard-size", "2MB", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    manifest = read_manifest(tmp_path / "served")
    assert manifest.source["kind"] == "hub" and manifest.source["commit"] == NEW
    assert manifest.source["files"][SHARD]["sha256"]
    assert run_prewarm("verify", tmp_path / "served").returncode == 0


def test_not_enough_space_is_said_before_downloading(env: dict[str, str], tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    point = tmp_path / "small"
    point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(point)], check=True)
    try:
        proc = fetch(env, "--dest", str(point / "model"), ok=False)
        assert_clean_failure(proc, 4, "needs 3.4", "is free")
    finally:
        subprocess.run(["umount", str(point)], check=False)


def test_a_file_name_escaping_the_destination_is_refused(env: dict[str, str], hub: Hub, tmp_path: Path) -> None:
    hub.repos[REPO].commits[NEW]["../../escaped.json"] = b"{}"
    assert_clean_failure(fetch(env, ok=False), 3, "would land outside the destination", "../../escaped.json")
    assert not list(tmp_path.rglob("escaped.json"))


def test_two_fetches_into_one_directory_take_turns(env: dict[str, str], hub: Hub, big_repo: Path) -> None:
    hub.bytes_per_second["model.safetensors"] = 16 * 2**20
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "prewarm", "fetch", "Qwen/Big", "--json"],
            text=True,
            env={**env, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=120) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    assert sum("waiting for it" in err for _, err in outputs) == 1
    assert sorted(len(json.loads(out)["downloaded"]) for out, _ in outputs) == [0, 1], "the second found it done"
    directory = Path(json.loads(outputs[0][0])["directory"])
    assert (directory / "model.safetensors").read_bytes() == big_repo.read_bytes()


def _plant_partial(tmp_path: Path, data: bytes) -> Path:
    partial = tmp_path / "cache" / "hub" / "Qwen--Big" / ("3" * 40) / ".prewarm-partial" / "model.safetensors.part"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(data)
    return partial


def test_a_server_that_ignores_range_gets_a_clean_restart(env: dict[str, str], hub: Hub, big_repo: Path, tmp_path: Path) -> None:
    _plant_partial(tmp_path, big_repo.read_bytes()[: 10 * 2**20])
    hub.ignore_range = True
    proc = run_prewarm("fetch", "Qwen/Big", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert [r.headers.get("range") for r in hub.file_requests("model.safetensors")] == [f"bytes={10 * 2**20}-"]
    assert (Path(summary(proc)["directory"]) / "model.safetensors").read_bytes() == big_repo.read_bytes()


def test_a_damaged_partial_is_caught_by_the_hash_and_deleted(
    env: dict[str, str], hub: Hub, big_repo: Path, tmp_path: Path
) -> None:
    partial = _plant_partial(tmp_path, b"\0" * 2**20)  # not the file's first MiB
    proc = run_prewarm("fetch", "Qwen/Big", "--json", env=env)
    assert_clean_failure(proc, 3, "model.safetensors: sha256", "the bad download was deleted")
    assert not partial.exists()
    proc = run_prewarm("fetch", "Qwen/Big", "--json", env=env)
    assert (Path(summary(proc)["directory"]) / "model.safetensors").read_bytes() == big_repo.read_bytes()


def test_without_prewarm_cache_files_go_under_hf_home(env: dict[str, str], tmp_path: Path) -> None:
    result = summary(fetch({k: v for k, v in env.items() if k != "PREWARM_CACHE"}))
    assert Path(result["directory"]) == tmp_path / "hf" / "prewarm" / "hub" / "Qwen--Tiny-Qwen2" / NEW
