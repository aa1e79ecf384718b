"""fetch against a real HTTP server on loopback that speaks the hub's protocol (tests/hubserver.py)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


# -- a destination someone else can write: planted symlinks are never followed -------------------

BIG = "3" * 40


def _big_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache" / "hub" / "Qwen--Big" / BIG


def _as_nobody(script: str) -> None:
    subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-euc", script], check=True)


@pytest.mark.parametrize("link", ["symlink", "hard link"])
def test_a_link_planted_at_a_partial_name_is_never_written_through(
    env: dict[str, str], hub: Hub, big_repo: Path, tmp_path: Path, link: str
) -> None:
    outside = tmp_path / "outside.bin"
    outside.write_bytes(before := os.urandom(2**20))
    partial = _plant_partial(tmp_path, b"")
    partial.unlink()
    (partial.symlink_to if link == "symlink" else partial.hardlink_to)(outside)
    proc = run_prewarm("fetch", "Qwen/Big", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "was not a partial download of ours" in proc.stderr
    assert outside.read_bytes() == before, "the file the link led to was written"
    assert (_big_dir(tmp_path) / "model.safetensors").read_bytes() == big_repo.read_bytes()


@pytest.mark.parametrize("planted", ["symlink", "another user's directory"])
def test_a_partial_directory_that_is_not_ours_is_refused(
    env: dict[str, str], hub: Hub, big_repo: Path, shared_dir: Path, planted: str
) -> None:
    outside = shared_dir / "outside.bin"
    outside.write_bytes(before := os.urandom(2**20))
    dest = shared_dir / "dest"
    dest.mkdir()
    dest.chmod(0o777)  # writable by anyone, as a shared cache might be
    if planted == "symlink":
        (shared_dir / "elsewhere").mkdir()
        (shared_dir / "elsewhere" / "model.safetensors.part").symlink_to(outside)
        _as_nobody(f"ln -s {shared_dir}/elsewhere {dest}/.prewarm-partial")
        why = "a symlink"
    else:
        _as_nobody(f"mkdir {dest}/.prewarm-partial && ln -s {outside} {dest}/.prewarm-partial/model.safetensors.part")
        why = "owned by uid 65534"
    proc = run_prewarm("fetch", "Qwen/Big", "--dest", dest, env=env)
    assert_clean_failure(proc, 4, f"{dest}/.prewarm-partial", why, "where fetch keeps its own directory")
    assert "someone else can write this directory" in proc.stderr
    assert outside.read_bytes() == before


def test_a_symlink_at_the_lock_name_is_refused(env: dict[str, str], hub: Hub, big_repo: Path, tmp_path: Path) -> None:
    directory = _big_dir(tmp_path)
    directory.mkdir(parents=True)
    (directory / ".prewarm-fetch.lock").symlink_to(tmp_path / "created-by-fetch")
    proc = run_prewarm("fetch", "Qwen/Big", env=env)
    assert_clean_failure(proc, 4, str(directory / ".prewarm-fetch.lock"), "a symlink, where fetch keeps its own lock file")
    assert not (tmp_path / "created-by-fetch").exists(), "fetch created a file outside its directory"


@pytest.mark.parametrize("planted", ["symlink", "FIFO"])
def test_the_record_is_never_read_or_written_through_a_planted_entry(
    env: dict[str, str], hub: Hub, tmp_path: Path, planted: str
) -> None:
    dest, outside = tmp_path / "dest", tmp_path / "outside.json"
    dest.mkdir()
    outside.write_bytes(b'{"repo_id": "not a record"}\n')
    if planted == "symlink":
        (dest / ".prewarm-fetch.json").symlink_to(outside)
    else:
        os.mkfifo(dest / ".prewarm-fetch.json")  # reading it would block for ever
    proc = run_prewarm("fetch", REPO, "--dest", dest, "--json", env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"{dest}/.prewarm-fetch.json: ignoring a damaged fetch record" in proc.stderr
    assert outside.read_bytes() == b'{"repo_id": "not a record"}\n'
    record = dest / ".prewarm-fetch.json"
    assert record.is_file() and not record.is_symlink() and json.loads(record.read_bytes())["commit"] == NEW


def test_a_symlinked_subdirectory_cannot_send_a_file_outside(env: dict[str, str], hub: Hub, tmp_path: Path) -> None:
    hub.repos[REPO].commits[NEW]["sub/extra.json"] = b'{"nested": true}'
    dest, elsewhere = tmp_path / "dest", tmp_path / "elsewhere"
    dest.mkdir()
    elsewhere.mkdir()
    (dest / "sub").symlink_to(elsewhere)
    proc = fetch(env, "--dest", str(dest), ok=False)
    assert_clean_failure(proc, 4, str(dest / "sub" / "extra.json"), "a parent directory of this file is a symlink")
    assert list(elsewhere.iterdir()) == []
    (dest / "sub").unlink()
    result = summary(fetch(env, "--dest", str(dest)))
    assert "sub/extra.json" in result["files"] and (dest / "sub" / "extra.json").read_bytes() == b'{"nested": true}'


# -- names stay inside DIR, and prewarm's own files never come from a repo -----------------------


def test_prewarm_own_names_are_never_taken_from_a_repo(env: dict[str, str], hub: Hub) -> None:
    planted = ["prewarm.manifest.json", ".prewarm-fetch.json", "sub/prewarm.manifest.json", ".prewarm-partial/x.json"]
    for name in planted:
        hub.repos[REPO].commits[NEW][name] = b'{"format": "prewarm-manifest", "files": {}}'
    proc = fetch(env)
    assert "lists files under names only prewarm writes; not fetched" in proc.stderr
    result = summary(proc)
    assert not set(planted) & set(result["files"]) and SHARD in result["files"]
    assert sorted(result["skipped_reserved"]) == sorted(planted)
    directory = Path(result["directory"])
    assert not (directory / "prewarm.manifest.json").exists() and not (directory / "sub").exists()
    assert json.loads((directory / ".prewarm-fetch.json").read_bytes())["repo_id"] == REPO


def test_a_record_naming_a_file_outside_is_not_trusted(env: dict[str, str], hub: Hub, tmp_path: Path) -> None:
    directory = Path(summary(fetch(env))["directory"])
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    escape = os.path.relpath(outside, directory)
    st = outside.stat()
    record = json.loads((directory / ".prewarm-fetch.json").read_bytes())
    record["files"][escape] = {"size": 2, "sha256": None, "blob_id": None, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
    (directory / ".prewarm-fetch.json").write_text(json.dumps(record))
    offline = fetch({**env, "HF_HUB_OFFLINE": "1"}, "--revision", NEW, ok=False)
    assert_clean_failure(offline, 3, "has not been fetched here before")
    assert "ignoring a damaged fetch record" in offline.stderr and escape in offline.stderr
    online = summary(fetch(env, "--revision", NEW))
    assert escape not in online["files"] and online["downloaded"] == []


# -- a damaged record never breaks a later run ----------------------------------------------------

_GOOD_ENTRY = {"size": 1, "sha256": None, "blob_id": "ab", "mtime_ns": 1, "inode": 1}
_GOOD_RECORD = {"repo_id": REPO, "revision": "main", "commit": NEW, "fetched_at": 1.0, "files": {"config.json": _GOOD_ENTRY}}
DAMAGED_RECORDS = {
    "not JSON": b"\x00\xff{not json",
    "a list": b"[]",
    "nested too deeply": b"[" * 100_000,
    "files a list": json.dumps({**_GOOD_RECORD, "files": []}).encode(),
    "entry missing a key": json.dumps({**_GOOD_RECORD, "files": {"config.json": {"size": 1}}}).encode(),
    "size a boolean": json.dumps({**_GOOD_RECORD, "files": {"config.json": {**_GOOD_ENTRY, "size": True}}}).encode(),
    "name leaving DIR": json.dumps({**_GOOD_RECORD, "files": {"../../x.json": _GOOD_ENTRY}}).encode(),
    "name of the manifest": json.dumps({**_GOOD_RECORD, "files": {"prewarm.manifest.json": _GOOD_ENTRY}}).encode(),
    "name a lone surrogate": json.dumps({**_GOOD_RECORD, "files": {"\ud800": _GOOD_ENTRY}}).encode(),
    "repo_id a number": json.dumps({**_GOOD_RECORD, "repo_id": 42}).encode(),
    "fetched_at too large for a float": json.dumps(_GOOD_RECORD).replace("1.0", "1" + "0" * 400).encode(),
}
ANY_EXIT = {0, 1, 2, 3, 4, 5, 130}


@pytest.mark.parametrize("raw", DAMAGED_RECORDS.values(), ids=DAMAGED_RECORDS.keys())
def test_a_damaged_record_is_ignored_with_a_warning(env: dict[str, str], hub: Hub, tmp_path: Path, raw: bytes) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / ".prewarm-fetch.json").write_bytes(raw)
    offline = fetch({**env, "HF_HUB_OFFLINE": "1"}, "--dest", str(dest), "--revision", NEW, ok=False)
    assert_clean_failure(offline, 3, "has not been fetched here before")
    assert "ignoring a damaged fetch record" in offline.stderr
    online = fetch(env, "--dest", str(dest))
    assert "ignoring a damaged fetch record" in online.stderr
    assert summary(online)["commit"] == NEW


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)
record_names = st.sampled_from(["config.json", "../x.json", "/etc/passwd", "", "a//b", ".prewarm-fetch.json", "\ud800"])
record_entries = st.fixed_dictionaries(
    {}, optional={k: json_values | st.integers(-2, 2**70) for k in ("size", "mtime_ns", "inode", "sha256", "blob_id")}
)
record_like = st.fixed_dictionaries(
    {},
    optional={
        "repo_id": st.just(REPO) | json_values,
        "revision": st.sampled_from(["main", NEW]) | json_values,
        "commit": st.just(NEW) | json_values,
        "fetched_at": json_values,
        "files": st.dictionaries(record_names | st.text(max_size=12), record_entries | json_values, max_size=3) | json_values,
    },
)
record_bytes = (
    st.binary(max_size=64)
    | record_like.map(lambda r: json.dumps(r).encode())
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.integers(1, 50_000).map(lambda n: b"{" * n)
)


@pytest.mark.slow
@settings(max_examples=20, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=record_bytes)
def test_any_record_bytes_never_break_a_run(env: dict[str, str], hub: Hub, tmp_path: Path, raw: bytes) -> None:
    dest = Path(tempfile.mkdtemp(dir=tmp_path))
    (dest / ".prewarm-fetch.json").write_bytes(raw)
    for revision in (NEW, "main"):
        offline = fetch({**env, "HF_HUB_OFFLINE": "1"}, "--dest", str(dest), "--revision", revision, ok=False)
        assert offline.returncode in ANY_EXIT and "Traceback" not in offline.stderr, offline.stderr
    online = fetch(env, "--dest", str(dest), "--revision", NEW)
    assert "Traceback" not in online.stderr and summary(online)["commit"] == NEW


# -- Ctrl-C and SIGTERM stop at once, and what was downloaded is kept ------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_fetch_stops_at_once_and_resumes(
    env: dict[str, str], hub: Hub, big_repo: Path, tmp_path: Path, signum: int
) -> None:
    hub.bytes_per_second["model.safetensors"] = 5 * 2**20  # 24 MiB: about 5 s in all
    partial = _big_dir(tmp_path) / ".prewarm-partial" / "model.safetensors.part"
    proc = subprocess.Popen(
        [sys.executable, "-m", "prewarm", "fetch", "Qwen/Big"],
        env={**env, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (partial.exists() and partial.stat().st_size > 0):
            assert time.monotonic() < deadline and proc.poll() is None, "fetch never wrote part of the file"
            time.sleep(0.01)
        sent = time.monotonic()
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=30)
        stopped = time.monotonic() - sent
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130 and stopped < 1.5, (proc.returncode, stopped, stderr)
    assert "Traceback" not in stderr and "Interrupted" in stderr, stderr
    kept = partial.stat().st_size
    assert 0 < kept < big_repo.stat().st_size and partial.read_bytes() == big_repo.read_bytes()[:kept]
    del hub.bytes_per_second["model.safetensors"]
    again = run_prewarm("fetch", "Qwen/Big", "--json", env=env)
    assert again.returncode == 0, again.stderr
    assert [r.headers.get("range") for r in hub.file_requests("model.safetensors")][-1] == f"bytes={kept}-"
    assert (_big_dir(tmp_path) / "model.safetensors").read_bytes() == big_repo.read_bytes()


# -- errors name the user's file, and always say what to do next ----------------------------------


def test_a_full_disk_mid_download_names_the_file_not_the_partial(
    env: dict[str, str], hub: Hub, big_repo: Path, tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    point = tmp_path / "small"
    point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(point)], check=True)
    try:
        hub.bytes_per_second["model.safetensors"] = 8 * 2**20
        dest = point / "model"
        partial = dest / ".prewarm-partial" / "model.safetensors.part"
        proc = subprocess.Popen(
            [sys.executable, "-m", "prewarm", "fetch", "Qwen/Big", "--dest", str(dest)],
            env={**env, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while not (partial.exists() and partial.stat().st_size > 0):
            assert time.monotonic() < deadline and proc.poll() is None, "fetch never wrote part of the file"
            time.sleep(0.01)
        with open(point / "filler", "wb", buffering=0) as filler, contextlib.suppress(OSError):
            while True:
                filler.write(b"\0" * 2**20)
        _, stderr = proc.communicate(timeout=60)
        errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
        assert proc.returncode == 4 and len(errors) == 1 and "Traceback" not in stderr, stderr
        assert errors[0] == f"Error: {dest / 'model.safetensors'}: the filesystem is full", stderr
        kept = partial.read_bytes()
        assert kept == big_repo.read_bytes()[: len(kept)], "what was written is a prefix, ready to resume"
    finally:
        subprocess.run(["umount", str(point)], check=False)
