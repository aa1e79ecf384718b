"""Manifests and verify: locating corruption, naming every kind of problem."""

from __future__ import annotations

import itertools
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from prewarm.checkpoint import MANIFEST_NAME
from prewarm.manifest import Digester, build_manifest, read_manifest, write_manifest
from prewarm.reshard import reshard
from prewarm.verify import verify_directory
from tests.helpers import assert_clean_failure, run_prewarm

SHARD = "model-00001-of-00003.safetensors"


@pytest.fixture(scope="module")
def served(synthetic_7b_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return reshard(synthetic_7b_small, tmp_path_factory.mktemp("v") / "served", 90_000_000).destination


@pytest.fixture
def restore(served: Path) -> Iterator[Path]:
    """Tests damage ``served`` in place (copying 186 MB each time is slow) and this undoes it."""
    manifest = read_manifest(served)
    saved = {name: (served / name).read_bytes() for name in manifest.files if not name.endswith(".safetensors")}
    yield served
    for name in os.listdir(served):
        if name not in manifest.files and name != MANIFEST_NAME:
            os.unlink(served / name)
    for name, data in saved.items():
        (served / name).write_bytes(data)
    assert verify_directory(served).ok, "a test left the fixture damaged"


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_verify_passes_and_is_fast_on_the_output(served: Path) -> None:
    proc = run_prewarm("verify", served, "--json", check=True)
    report = json.loads(proc.stdout)
    assert report["ok"] is True and report["problems"] == []
    assert report["bytes_checked"] == read_manifest(served).total_bytes


@pytest.mark.parametrize("offset", [0, 16 * 2**20 - 1, 16 * 2**20, 40_000_000])
def test_a_flipped_byte_is_located_to_its_chunk(restore: Path, offset: int) -> None:
    _flip(restore / SHARD, offset)
    try:
        proc = run_prewarm("verify", restore, "--json")
        assert proc.returncode == 1
        problems = json.loads(proc.stdout)["problems"]
        assert len(problems) == 1
        p = problems[0]
        assert p["file"] == SHARD and p["kind"] == "corrupt"
        assert p["offset"] <= offset < p["offset"] + p["length"]
        assert p["length"] == 16 * 2**20 and p["offset"] % (16 * 2**20) == 0
        human = run_prewarm("verify", restore)
        assert f"corrupt    {SHARD} bytes {p['offset']}-{p['offset'] + p['length'] - 1}" in human.stdout
        assert "FAILED: 1 problem:" in human.stdout
    finally:
        _flip(restore / SHARD, offset)


def test_adjacent_bad_chunks_are_one_range(restore: Path) -> None:
    for offset in (5, 16 * 2**20 + 5):
        _flip(restore / SHARD, offset)
    try:
        problems = verify_directory(restore, threads=2).problems
        assert [(p.kind, p.offset, p.length) for p in problems] == [("corrupt", 0, 32 * 2**20)]
    finally:
        for offset in (5, 16 * 2**20 + 5):
            _flip(restore / SHARD, offset)


def test_missing_extra_and_resized_files_are_named(restore: Path) -> None:
    (restore / "config.json").unlink()
    (restore / "stray.txt").write_text("hi")
    with open(restore / "model.safetensors.index.json", "ab") as f:
        f.write(b" ")
    proc = run_prewarm("verify", restore, "--json")
    assert proc.returncode == 1
    kinds = {(p["file"], p["kind"]) for p in json.loads(proc.stdout)["problems"]}
    assert kinds == {("config.json", "missing"), ("stray.txt", "extra"), ("model.safetensors.index.json", "size")}


def test_verify_without_a_manifest_says_what_to_run(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("x")
    assert_clean_failure(run_prewarm("verify", tmp_path), 3, "no prewarm.manifest.json here")
    assert "prewarm manifest" in run_prewarm("verify", tmp_path).stderr
    assert_clean_failure(run_prewarm("verify", tmp_path / "nope"), 4, "no such directory")
    (tmp_path / "file").write_text("x")
    assert_clean_failure(run_prewarm("verify", tmp_path / "file"), 4, "not a directory")


def test_a_garbled_manifest_is_one_line(tmp_path: Path) -> None:
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    assert_clean_failure(run_prewarm("verify", tmp_path), 3, "not valid JSON")
    (tmp_path / MANIFEST_NAME).write_text('{"format": "prewarm-manifest", "version": 1, "hash": "xxh3_128"}')
    assert_clean_failure(run_prewarm("verify", tmp_path), 3, "not a valid manifest")


def test_manifest_for_a_hub_style_snapshot_with_symlinks(tiny_model: Path, tmp_path: Path) -> None:
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for f in tiny_model.iterdir():
        shutil.copy(f, blobs / f.name)
        (snapshot / f.name).symlink_to(blobs / f.name)
    proc = run_prewarm("manifest", snapshot, "--json", check=True)
    assert json.loads(proc.stdout)["files"] == len(list(tiny_model.iterdir()))
    manifest = read_manifest(snapshot)
    assert manifest.files["config.json"].xxh3_128 == xxhash.xxh3_128((tiny_model / "config.json").read_bytes()).hexdigest()
    assert run_prewarm("verify", snapshot).returncode == 0
    _flip(blobs / "model-00003-of-00004.safetensors", 1000)
    proc = run_prewarm("verify", snapshot, "--json")
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["problems"][0]["file"] == "model-00003-of-00004.safetensors"


def test_manifest_is_rewritten_atomically_and_ignores_itself(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"1" * 100)
    write_manifest(tmp_path, build_manifest(tmp_path).manifest)
    first = (tmp_path / MANIFEST_NAME).read_bytes()
    write_manifest(tmp_path, build_manifest(tmp_path).manifest)
    assert (tmp_path / MANIFEST_NAME).read_bytes() == first
    assert sorted(os.listdir(tmp_path)) == ["a.bin", MANIFEST_NAME]


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=3000), cuts=st.lists(st.integers(0, 3000), max_size=6), chunk=st.integers(1, 700))
def test_digester_matches_xxh3_of_the_pieces(data: bytes, cuts: list[int], chunk: int) -> None:
    digester = Digester(chunk)
    points = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    for a, b in itertools.pairwise(points):
        digester.update(data[a:b])
    digest = digester.finish()
    assert digest.size == len(data)
    assert digest.xxh3_128 == xxhash.xxh3_128(data).hexdigest()
    assert digest.chunks == tuple(xxhash.xxh3_128(data[i : i + chunk]).hexdigest() for i in range(0, len(data), chunk))
