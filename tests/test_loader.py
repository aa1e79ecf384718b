"""The checked reader (prewarm.loader): byte identity with safetensors, checking, refusals, memory.

Everything runs on the CPU with small models except the RSS test (256 MiB, in a subprocess); the
CUDA class is skipped where there is no GPU.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from prewarm.checkpoint import MANIFEST_NAME
from prewarm.confine import root_of
from prewarm.errors import ExitCode, PrewarmError
from prewarm.loader import READ_AHEAD, CheckedReader, LoadCheckFailed, LoadOptions, LoadRefused
from prewarm.manifest import CHUNK_SIZE, Manifest, build_manifest, digest_files, list_files, read_manifest, write_manifest
from prewarm.reshard import reshard
from prewarm.safetensors import encode_header, header_entry, metadata_entry
from prewarm.verify import RECORD_NAME, record_verification, verify_directory
from tests.helpers import ROOT

CHUNK = 64 * 1024  # the test serving directory's chunk size: tensors span many chunks, chunks hold many tensors
CTIME_TICK = 0.05  # ctime moves in kernel clock ticks (4 ms here): a write within one tick of the last keeps it


# --- helpers -----------------------------------------------------------------------------------


def rechunk(directory: Path, chunk_size: int) -> Manifest:
    """Write the manifest `prewarm manifest` would (every regular, non-hidden file), with ``chunk_size``
    chunks instead of CHUNK_SIZE: build_manifest's own listing and digests, chunked smaller."""
    root = root_of(directory)
    names = list_files(root).files
    old = read_manifest(directory) if (directory / MANIFEST_NAME).exists() else None
    files = digest_files(root, names, threads=2, chunk_size=chunk_size)
    manifest = Manifest(files, chunk_size, old.source if old else {"kind": "directory"}, old.options if old else {})
    write_manifest(directory, manifest)
    assert read_manifest(directory).chunk_size == chunk_size
    return manifest


def layout(path: Path) -> list[tuple[str, int, int]]:
    """(name, begin, end) of every tensor, absolute file offsets, in offset order: parsed here from
    the raw header, independently of prewarm.safetensors."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    spans = [(name, 8 + n + e["data_offsets"][0], 8 + n + e["data_offsets"][1]) for name, e in header.items()]
    return sorted(spans, key=lambda s: (s[1], s[2]))


def shards_of(directory: Path) -> list[str]:
    return sorted(name for name in read_manifest(directory).files if name.endswith(".safetensors"))


def reference(directory: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name in shards_of(directory):
        tensors.update(load_file(directory / name, device=device))
    return tensors


def raw(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes: random BF16/F16/F32 bytes hold NaNs, so values cannot be compared."""
    return t.reshape(-1).view(torch.uint8)


def assert_same_tensor(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype, (name, got.dtype, want.dtype)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    assert got.device == want.device, (name, got.device, want.device)
    assert torch.equal(raw(got), raw(want)), f"{name}: bytes differ"


def load_all(directory: Path, device: str = "cpu", **options: object) -> tuple[CheckedReader, list[tuple[str, torch.Tensor]]]:
    reader = CheckedReader(directory, device, LoadOptions(**options))  # type: ignore[arg-type]
    with reader:
        got = list(reader.tensors())  # all kept: a tensor that aliased a reused buffer would be overwritten by now
    return reader, got


def drain(reader: CheckedReader, into: list[str]) -> None:
    with reader:
        for name, _ in reader.tensors():
            into.append(name)


def flip(path: Path, offset: int, mask: int = 0xFF) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ mask]))


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def copy_served(served: Path, tmp_path: Path) -> Path:
    directory = Path(shutil.copytree(served, tmp_path / "served"))
    os.chmod(directory, 0o755)  # whatever the umask: a record in a group-writable directory is never trusted
    return directory


@pytest.fixture(scope="module")
def served(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen2 resharded into 6 shards, its manifest chunked at 64 KiB. Do not modify: copy it."""
    directory = reshard(tiny_model, tmp_path_factory.mktemp("loader") / "served", 700_000).destination
    rechunk(directory, CHUNK)
    assert verify_directory(directory).ok
    return directory


# --- 1. byte identity ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"threads": 1, "buffers": 1},
        {"threads": 4, "buffers": 2, "piece_bytes": 4096},
        {"threads": 2, "buffers": 7, "piece_bytes": 10_000},
        {},
    ],
    ids=["1-thread-1-buffer", "4-threads-2-buffers-4k-pieces", "2-threads-7-buffers-odd-pieces", "defaults"],
)
def test_every_tensor_is_byte_identical_to_load_file(served: Path, options: dict[str, int]) -> None:
    shards = shards_of(served)
    spans = [span for name in shards for span in layout(served / name)]
    # the directory exercises what it should: many shards, tensors over many chunks, chunks over many tensors
    assert len(shards) >= 4
    assert max(end - begin for _, begin, end in spans) >= 4 * CHUNK
    chunks = [(n, k * CHUNK, (k + 1) * CHUNK) for n in shards for k in range(-(-(served / n).stat().st_size // CHUNK))]
    assert max(sum(1 for _, b, e in layout(served / n) if b < hi and e > lo) for n, lo, hi in chunks) >= 4
    assert max(sum(1 for _, b, e in layout(served / n) if lo <= b < e <= hi) for n, lo, hi in chunks) >= 2
    assert read_manifest(served).total_bytes > 40 * CHUNK

    want = reference(served)
    reader, got = load_all(served, **options)
    assert [name for name, _ in got] == [name for name, _, _ in spans], "not in file then offset order"
    assert sorted(want) == sorted(name for name, _ in got)
    for name, tensor in got:
        assert_same_tensor(name, tensor, want[name])
        assert tensor.is_contiguous()
    assert reader.report.hashed is True


def test_tensors_do_not_share_memory(served: Path) -> None:
    """Each yielded tensor owns its bytes: none is a view of a reused buffer or of another tensor."""
    _, got = load_all(served, threads=2, buffers=2)
    spans = sorted((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for _, t in got if t.numel())
    for (a, alen), (b, _) in itertools.pairwise(spans):
        assert a + alen <= b, "two yielded tensors overlap in memory"


# --- 2. any safetensors files --------------------------------------------------------------------

DTYPES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
SHAPES = st.one_of(
    st.lists(st.integers(0, 13), max_size=3),  # 0-dim, zero-size and odd shapes
    st.lists(st.integers(1, 60_000), min_size=1, max_size=1),  # long ones, over many chunks
)
FILES = st.lists(st.lists(st.tuples(st.sampled_from(sorted(DTYPES)), SHAPES), max_size=7), min_size=1, max_size=3)


def write_random_files(
    directory: Path, files: list[list[tuple[str, list[int]]]], seed: int, metadata: bool
) -> list[tuple[str, str, tuple[int, ...], bytes]]:
    """Safetensors files with tensors packed in the given order (unaligned offsets); (name, dtype,
    shape, bytes) of every tensor in sorted-file-name then offset order."""
    rng = random.Random(seed)
    written: dict[str, list[tuple[str, str, tuple[int, ...], bytes]]] = {}
    for i, specs in enumerate(files):
        file_name = f"part-{(7 * i) % 10}-{i}.safetensors"  # written out of name order
        members = [metadata_entry({"format": "pt", "i": str(i)})] if metadata else []
        tensors, cursor = [], 0
        for j, (dtype, shape) in enumerate(specs):
            n = DTYPES[dtype]
            for d in shape:
                n *= d
            data = rng.randbytes(n)
            if dtype == "BOOL":
                data = bytes(b & 1 for b in data)
            name = f"f{i}.t{j}.{dtype.lower()}"
            members.append(header_entry(name, dtype, shape, cursor, cursor + n))
            tensors.append((name, dtype, tuple(shape), data))
            cursor += n
        (directory / file_name).write_bytes(encode_header(members) + b"".join(t[3] for t in tensors))
        written[file_name] = tensors
    (directory / "config.json").write_text('{"not": "weights"}')
    return [t for name in sorted(written) for t in written[name]]


TORCH_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    files=FILES,
    chunk=st.one_of(st.integers(4096, 16 * 1024), st.integers(4096, 256 * 1024)),
    threads=st.integers(1, 4),
    buffers=st.integers(1, 6),
    piece=st.integers(4096, 64 * 1024),
    seed=st.integers(0, 2**32 - 1),
    metadata=st.booleans(),
)
def test_any_safetensors_files_load_byte_identical(
    files: list[list[tuple[str, list[int]]]], chunk: int, threads: int, buffers: int, piece: int, seed: int, metadata: bool
) -> None:
    with tempfile.TemporaryDirectory() as temp:
        directory = Path(temp)
        expected = write_random_files(directory, files, seed, metadata)
        rechunk(directory, chunk)
        want = reference(directory)
        reader, got = load_all(directory, threads=threads, buffers=buffers, piece_bytes=piece)
        assert [name for name, _ in got] == [name for name, *_ in expected]
        for (name, tensor), (_, dtype, shape, data) in zip(got, expected, strict=True):
            assert tensor.dtype == TORCH_DTYPES[dtype] and tuple(tensor.shape) == shape, name
            assert raw(tensor).numpy().tobytes() == data, name
            assert_same_tensor(name, tensor, want[name])
        sizes = [(directory / name).stat().st_size for name in os.listdir(directory) if name.endswith(".safetensors")]
        assert (reader.report.files, reader.report.tensors, reader.report.bytes) == (len(files), len(expected), sum(sizes))


# --- 3. a flipped byte ---------------------------------------------------------------------------


def _in_a_long_tensor(directory: Path, shards: list[str]) -> tuple[int, int]:
    """The middle of the longest tensor of a middle shard."""
    index = len(shards) // 2
    _, begin, end = max(layout(directory / shards[index]), key=lambda s: s[2] - s[1])
    return index, (begin + end) // 2


def _at_a_chunk_start_inside_a_tensor(directory: Path, shards: list[str]) -> tuple[int, int]:
    """The first byte of a chunk whose previous chunk holds the start of the same tensor."""
    index = 1
    for _, begin, end in layout(directory / shards[index]):
        boundary = (begin // CHUNK + 1) * CHUNK
        if boundary < end:
            return index, boundary
    raise AssertionError("no tensor crosses a chunk boundary")


def _first_tensor_byte(directory: Path, shards: list[str]) -> tuple[int, int]:
    return 1, layout(directory / shards[1])[0][1]


def _last_byte(directory: Path, shards: list[str]) -> tuple[int, int]:
    index = len(shards) - 1
    return index, (directory / shards[index]).stat().st_size - 1


@pytest.mark.parametrize("where", [_in_a_long_tensor, _at_a_chunk_start_inside_a_tensor, _first_tensor_byte, _last_byte])
def test_a_flipped_byte_fails_the_load_before_any_tensor_of_its_chunk(served: Path, tmp_path: Path, where: object) -> None:
    directory = copy_served(served, tmp_path)
    shards = shards_of(directory)
    index, offset = where(directory, shards)  # type: ignore[operator]
    path = directory / shards[index]
    size = path.stat().st_size
    flip(path, offset)
    lo = offset // CHUNK * CHUNK
    hi = min(lo + CHUNK, size)

    yielded: list[str] = []
    with pytest.raises(LoadCheckFailed) as caught:
        drain(CheckedReader(directory, options=LoadOptions(threads=3, buffers=4)), yielded)
    error = caught.value
    assert error.path == str(path)
    assert shards[index] in str(error)
    assert f"bytes {lo}-{hi - 1}" in error.message, error.message
    assert (error.offset, error.length) == (lo, hi - lo)
    assert error.hint and "prewarm verify" in error.hint

    in_chunk = {name for name, begin, end in layout(path) if begin < hi and end > lo}
    assert in_chunk, "the flipped byte is in no tensor"
    assert not in_chunk & set(yielded), f"yielded tensors holding the bad chunk: {sorted(in_chunk & set(yielded))}"
    # and nothing good was held back: everything before the bad chunk came out, in order
    before = [n for s in shards[:index] for n, _, _ in layout(directory / s)]
    before += [n for n, _, end in layout(path) if end <= lo]
    assert yielded == before


def test_a_flipped_header_byte_that_still_parses_is_caught_before_its_names_are_used(served: Path, tmp_path: Path) -> None:
    directory = copy_served(served, tmp_path)
    shards = shards_of(directory)
    path = directory / shards[2]
    head = path.read_bytes()[:4096]
    offset = head.index(b"weight")
    flip(path, offset, 0x01)  # "weight" -> "veight": still valid JSON, a name the manifest never saw
    yielded: list[str] = []
    with pytest.raises(LoadCheckFailed) as caught:
        drain(CheckedReader(directory, options=LoadOptions(threads=2, buffers=2)), yielded)
    assert caught.value.path == str(path) and caught.value.offset == 0
    assert not [n for n in yielded if "veight" in n]
    assert yielded == [n for s in shards[:2] for n, _, _ in layout(directory / s)]


def test_a_header_that_no_longer_parses_is_refused_before_loading(served: Path, tmp_path: Path) -> None:
    directory = copy_served(served, tmp_path)
    path = directory / shards_of(directory)[0]
    flip(path, 12)  # inside the JSON: not UTF-8 any more
    fds = open_fds()
    with pytest.raises(PrewarmError) as caught:
        CheckedReader(directory)
    assert caught.value.path == str(path)
    assert open_fds() == fds


# --- 4. refusals ---------------------------------------------------------------------------------


def test_no_manifest_is_refused_with_a_hint(served: Path, tmp_path: Path) -> None:
    directory = copy_served(served, tmp_path)
    (directory / MANIFEST_NAME).unlink()
    with pytest.raises(LoadRefused) as caught:
        CheckedReader(directory)
    assert "manifest" in caught.value.message
    assert caught.value.hint and "prewarm manifest" in caught.value.hint


def _missing(directory: Path, name: str, tmp_path: Path) -> None:
    (directory / name).unlink()


def _resized(directory: Path, name: str, tmp_path: Path) -> None:
    with open(directory / name, "ab") as f:
        f.write(b"\0")


def _truncated(directory: Path, name: str, tmp_path: Path) -> None:
    os.truncate(directory / name, (directory / name).stat().st_size - 1)


def _symlink_outside(directory: Path, name: str, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere" / name
    outside.parent.mkdir()
    shutil.move(directory / name, outside)  # the very same bytes, but outside the directory
    (directory / name).symlink_to(outside)


def _a_directory(directory: Path, name: str, tmp_path: Path) -> None:
    (directory / name).unlink()
    (directory / name).mkdir()


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (_missing, "missing"),
        (_resized, "the manifest says"),
        (_truncated, "the manifest says"),
        (_symlink_outside, "refused"),
        (_a_directory, "refused"),
    ],
    ids=["missing", "grown", "shrunk", "symlink-outside", "directory"],
)
def test_files_that_are_not_the_manifests_are_refused(served: Path, tmp_path: Path, damage: object, needle: str) -> None:
    directory = copy_served(served, tmp_path)
    name = shards_of(directory)[3]  # the shards before it are open by then: they must be closed again
    damage(directory, name, tmp_path)  # type: ignore[operator]
    fds = open_fds()
    with pytest.raises(LoadRefused) as caught:
        CheckedReader(directory)
    assert caught.value.path == str(directory / name)
    assert needle in caught.value.message, caught.value.message
    assert open_fds() == fds, "descriptors of the shards opened before the refusal leaked"


def test_a_tensor_in_two_shards_is_refused(tmp_path: Path) -> None:
    for name in ("a.safetensors", "b.safetensors"):
        (tmp_path / name).write_bytes(encode_header([header_entry("same", "U8", [3], 0, 3)]) + b"abc")
    rechunk(tmp_path, 4096)
    with pytest.raises(LoadRefused, match=r"'same' is in both a\.safetensors and b\.safetensors"):
        CheckedReader(tmp_path)


def test_only_the_manifests_shards_are_loaded(served: Path, tmp_path: Path) -> None:
    directory = copy_served(served, tmp_path)
    (directory / "zz-extra.safetensors").write_bytes(encode_header([header_entry("planted", "U8", [3], 0, 3)]) + b"abc")
    _, got = load_all(directory, threads=2, buffers=2)
    assert "planted" not in {name for name, _ in got}
    assert len(got) == len(reference(served))


def test_a_shard_that_shrinks_during_the_load_is_refused(served: Path, tmp_path: Path) -> None:
    directory = copy_served(served, tmp_path)
    path = directory / shards_of(directory)[-1]
    reader = CheckedReader(directory, options=LoadOptions(threads=2, buffers=2))  # sizes checked here
    os.truncate(path, path.stat().st_size - CHUNK - 100)
    with pytest.raises(LoadRefused, match="shrank"):
        drain(reader, [])


def test_stopping_early_ends_the_readers_and_closes_the_files(served: Path) -> None:
    fds = open_fds()
    with CheckedReader(served, options=LoadOptions(threads=3, buffers=5)) as reader:
        for _ in reader.tensors():
            break
    assert open_fds() == fds
    assert not [t for t in threading.enumerate() if t.name.startswith("prewarm-load")]


# --- 5. bounded memory ---------------------------------------------------------------------------


def test_on_the_cpu_reads_go_straight_into_the_tensors_without_buffers(served: Path) -> None:
    """On the CPU the tensors' own memory is read into and hashed there: no buffer is made,
    however many pieces pass (the GPU path's buffers are counted in TestCuda)."""
    reader, got = load_all(served, threads=2, buffers=3, piece_bytes=4096)
    assert len(got) == len(reference(served))
    pieces = reader.report.bytes // 4096
    assert pieces > 100 * 2 * 3
    assert reader.report.buffers_made == 0


@pytest.mark.parametrize("options", [{"buffers": 0}, {"threads": 0}, {"threads": 0, "buffers": 0}])
def test_zero_means_automatic_and_loads(served: Path, options: dict[str, int]) -> None:
    """LoadOptions accepts 0 for threads and buffers as "0 (automatic)" (its own message), and the
    daemon's load_buffers documents 0 as the default: such a load must work, not crash a reader."""
    want = reference(served)
    reader, got = load_all(served, **options)
    assert [name for name, _ in got] == [n for s in shards_of(served) for n, _, _ in layout(served / s)]
    for name, tensor in got:
        assert_same_tensor(name, tensor, want[name])
    assert reader.report.threads >= 1 and reader.report.buffers == (options.get("buffers") or 2)


RSS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    from prewarm.loader import CheckedReader, LoadOptions

    OPTIONS = LoadOptions(threads=int(sys.argv[2]), buffers=int(sys.argv[3]), piece_bytes=int(sys.argv[4]))

    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    def load(keep):
        reader = CheckedReader(Path(sys.argv[1]), options=OPTIONS)
        torch.empty(1 << 20, dtype=torch.uint8).fill_(1)  # the allocator warmed up
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets the peak (VmHWM) to now
            base = rss("VmRSS")
        except OSError:
            base = rss("VmHWM")  # the peak so far: growth can only be under-stated, which the control shows
        kept, count, total, check = [], 0, 0, 0
        for name, tensor in reader.tensors():
            count += 1
            total += tensor.numel() * tensor.element_size()
            check ^= int(tensor.reshape(-1).view(torch.uint8)[:8].sum())
            if keep:
                kept.append(tensor)
            del tensor
        return {"growth": rss("VmHWM") - base, "tensors": count, "bytes": total, "check": check}

    print(json.dumps({"dropping": load(False), "keeping": load(True)}))
    """
)


def test_peak_memory_stays_at_the_buffers_not_the_model(tmp_path: Path) -> None:
    """256 MiB in 2 shards of 32 tensors of 4 MiB, 16 MiB chunks, 2 threads of 2 buffers of 4 MiB: a consumer
    that drops each tensor sees the loader's own memory only (its buffers and the tensors of the
    chunks in flight). The same load keeping the tensors is the control."""
    tensor_bytes, per_shard, shards = 4 * 2**20, 32, 2
    block = bytearray(os.urandom(tensor_bytes))
    directory = tmp_path / "big"
    directory.mkdir()
    for s in range(shards):
        members = [
            header_entry(f"s{s}.t{i}", "BF16", [1024, 2048], i * tensor_bytes, (i + 1) * tensor_bytes) for i in range(per_shard)
        ]
        with open(directory / f"model-{s}.safetensors", "wb") as f:
            f.write(encode_header(members))
            for i in range(per_shard):
                block[:8] = struct.pack("<Q", s * per_shard + i)
                f.write(block)
    built = build_manifest(directory)  # what `prewarm manifest` writes: 16 MiB chunks
    write_manifest(directory, built.manifest, built.mode)
    model = shards * per_shard * tensor_bytes
    threads, buffers, piece = 2, 2, 4 * 2**20

    proc = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(directory), str(threads), str(buffers), str(piece)],
        capture_output=True,
        text=True,
        timeout=120,
        # freed blocks go straight back to the kernel: the peak is what the loader holds, not how
        # glibc's heap happened to fragment (which adds 0-50 MiB from run to run here)
        env={**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)},
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    dropping, keeping = result["dropping"], result["keeping"]
    for run in (dropping, keeping):
        assert (run["tensors"], run["bytes"]) == (shards * per_shard, model)
    assert dropping["check"] == keeping["check"]
    assert keeping["growth"] >= model * 0.75, f"the control kept {model} bytes but RSS grew {keeping['growth']}: not measured"
    host = LoadOptions(threads=threads, buffers=buffers, piece_bytes=piece).host_bytes()
    bound = tensor_bytes + threads * READ_AHEAD * CHUNK_SIZE + host + 32 * 2**20
    assert dropping["growth"] < bound, f"peak RSS grew {dropping['growth'] / 2**20:.0f} MiB loading {model / 2**20:.0f} MiB"
    assert dropping["growth"] < model / 2


# --- 6. check = record ---------------------------------------------------------------------------


def hashes(directory: Path, check: str) -> bool:
    """Whether a load with ``check`` would hash (the reader decides when it opens the files)."""
    with CheckedReader(directory, options=LoadOptions(check=check)) as reader:
        return reader.report.hashed


def verified(directory: Path) -> None:
    report = verify_directory(directory)
    record_verification(report)
    assert report.ok


def test_record_trusts_an_unchanged_verified_directory(served: Path, tmp_path: Path) -> None:
    directory = copy_served(served, tmp_path)
    verified(directory)
    reader, got = load_all(directory, check="record", threads=2, buffers=2)
    assert reader.report.hashed is False and reader.report.check == "record"
    want = reference(directory)
    assert [n for n, _ in got] == [n for s in shards_of(directory) for n, _, _ in layout(directory / s)]
    for name, tensor in got:
        assert_same_tensor(name, tensor, want[name])
    # the same record does nothing for check = hash
    assert hashes(directory, "hash")


def test_record_hashes_a_shard_rewritten_with_its_old_mtime(served: Path, tmp_path: Path) -> None:
    directory = copy_served(served, tmp_path)
    verified(directory)
    path = directory / shards_of(directory)[2]
    before = path.stat()
    time.sleep(CTIME_TICK)
    flip(path, before.st_size // 2)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    reader = CheckedReader(directory, options=LoadOptions(check="record", threads=2, buffers=2))
    assert reader.report.hashed is True
    with pytest.raises(LoadCheckFailed) as caught:
        drain(reader, [])
    assert caught.value.path == str(path)


def test_record_hashes_a_shard_replaced_by_an_identical_copy(served: Path, tmp_path: Path) -> None:
    directory = copy_served(served, tmp_path)
    verified(directory)
    path = directory / shards_of(directory)[0]
    shutil.copy2(path, tmp_path / "copy")
    os.replace(tmp_path / "copy", path)  # same bytes and mtime, another inode
    assert hashes(directory, "record")


def test_record_without_a_record_hashes(served: Path, tmp_path: Path) -> None:
    directory = copy_served(served, tmp_path)
    assert not (directory / RECORD_NAME).exists()
    reader, got = load_all(directory, check="record", threads=2, buffers=2)
    assert reader.report.hashed is True and len(got) == len(reference(served))


def test_record_whose_manifest_changed_hashes(served: Path, tmp_path: Path) -> None:
    directory = copy_served(served, tmp_path)
    verified(directory)
    rechunk(directory, 3 * CHUNK)  # a new manifest of the same files
    reader, got = load_all(directory, check="record", threads=2, buffers=2)
    assert reader.report.hashed is True
    want = reference(directory)
    for name, tensor in got:
        assert_same_tensor(name, tensor, want[name])


def test_record_of_a_failed_verification_hashes(served: Path, tmp_path: Path) -> None:
    directory = copy_served(served, tmp_path)
    path = directory / shards_of(directory)[1]
    flip(path, path.stat().st_size - 1)
    report = verify_directory(directory)
    record_verification(report)
    assert not report.ok
    reader = CheckedReader(directory, options=LoadOptions(check="record", threads=2, buffers=2))
    assert reader.report.hashed is True
    with pytest.raises(LoadCheckFailed):
        drain(reader, [])


def test_record_that_others_could_write_is_not_trusted(served: Path, tmp_path: Path) -> None:
    directory = copy_served(served, tmp_path)
    verified(directory)
    os.chmod(directory / RECORD_NAME, 0o666)
    assert hashes(directory, "record")
    os.chmod(directory / RECORD_NAME, 0o644)
    os.chmod(directory, 0o775)
    assert hashes(directory, "record")


def _data_changed(path: Path) -> None:
    flip(path, path.stat().st_size - 1)


def _header_changed(path: Path) -> None:
    flip(path, path.read_bytes()[:4096].index(b"weight"), 0x01)


@pytest.mark.parametrize(
    ("change", "needle"), [(_data_changed, "changed while being loaded"), (_header_changed, "header changed")]
)
def test_record_load_refuses_a_shard_changed_during_the_load(served: Path, tmp_path: Path, change: object, needle: str) -> None:
    directory = copy_served(served, tmp_path)
    verified(directory)
    time.sleep(CTIME_TICK)
    reader = CheckedReader(directory, options=LoadOptions(check="record", threads=2, buffers=2))
    assert reader.report.hashed is False
    path = directory / shards_of(directory)[1]
    change(path)  # type: ignore[operator]
    yielded: list[str] = []
    with pytest.raises(LoadRefused, match=needle) as caught:
        drain(reader, yielded)
    assert caught.value.path == str(path)
    if change is _header_changed:  # caught at the shard's first chunk: nothing of it came out
        assert not {n for n, _, _ in layout(path)} & set(yielded)


# --- 7. options ----------------------------------------------------------------------------------

BAD_OPTIONS = [
    {"check": "sha256"},
    {"check": "Hash"},
    {"check": None},
    {"threads": -1},
    {"threads": 257},
    {"threads": True},
    {"threads": 1.5},
    {"threads": "4"},
    {"buffers": -1},
    {"buffers": 257},
    {"piece_bytes": 4095},
    {"piece_bytes": 0},
    {"piece_bytes": -4096},
    {"piece_bytes": 2**30 + 1},
    {"piece_bytes": 65536.0},
]


@pytest.mark.parametrize("bad", BAD_OPTIONS, ids=[f"{k}={v!r}" for d in BAD_OPTIONS for k, v in d.items()])
def test_bad_options_are_usage_errors(bad: dict[str, object]) -> None:
    for make in (lambda: LoadOptions(**bad), lambda: LoadOptions.from_config(bad)):  # type: ignore[arg-type]
        with pytest.raises(LoadRefused) as caught:
            make()
        assert caught.value.exit_code == ExitCode.USAGE
        assert next(iter(bad)) in caught.value.message


@pytest.mark.parametrize("config", [{"thread": 4}, {"check": "hash", "chunk_size": 1}, {"": 0}])
def test_unknown_settings_are_usage_errors(config: dict[str, object]) -> None:
    with pytest.raises(LoadRefused) as caught:
        LoadOptions.from_config(config)
    assert caught.value.exit_code == ExitCode.USAGE
    assert repr(sorted(set(config) - {"check"})[0]) in caught.value.message
    assert caught.value.hint and "check, threads, buffers and piece_bytes" in caught.value.hint


def test_good_options() -> None:
    options = LoadOptions.from_config({"check": "record", "threads": 3, "buffers": 256, "piece_bytes": 4096})
    assert options == LoadOptions("record", 3, 256, 4096)
    assert LoadOptions(threads=3, buffers=5, piece_bytes=8192).host_bytes() == 3 * 5 * 8192
    assert 1 <= LoadOptions().resolved_threads() <= 16
    assert LoadOptions.from_config({}) == LoadOptions()


# --- 8. the report -------------------------------------------------------------------------------


def test_the_report_counts_what_was_loaded(served: Path) -> None:
    shards = shards_of(served)
    reader, got = load_all(served, threads=2, buffers=4)
    report = reader.report
    assert report.bytes == sum((served / name).stat().st_size for name in shards)
    assert report.files == len(shards)
    assert report.tensors == len(got) == len(reference(served))
    assert (report.hashed, report.check, report.threads) == (True, "hash", 2)
    assert report.buffers_made == 0  # the CPU path reads straight into the tensors
    assert report.device == "cpu" and report.directory == str(served)
    assert report.seconds > 0 and report.gb_per_s > 0
    as_dict = report.as_dict()
    assert json.loads(json.dumps(as_dict))["bytes"] == report.bytes and "gb_per_s" in as_dict


# --- 9. CUDA -------------------------------------------------------------------------------------


def pinned_allocations() -> int:
    """Requests to torch's pinned host allocator so far (torch.empty(pin_memory=True) goes there)."""
    return int(torch.cuda.host_memory_stats().get("allocations.allocated", 0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
class TestCuda:
    def test_identity_onto_cuda_with_pinned_buffers(self, served: Path) -> None:
        want = reference(served, device="cuda")
        got: list[tuple[str, torch.Tensor]] = []
        pinned = pinned_allocations()
        with CheckedReader(served, "cuda", LoadOptions(threads=2, buffers=2, piece_bytes=16384)) as reader:
            for name, tensor in reader.tensors():
                assert tensor.is_cuda, name
                got.append((name, tensor))
        torch.cuda.synchronize()
        assert reader.report.device.startswith("cuda") and 1 <= reader.report.buffers_made <= 2 * 2
        assert pinned_allocations() - pinned >= reader.report.buffers_made, "the host buffers were not pinned"
        assert [n for n, _ in got] == [n for s in shards_of(served) for n, _, _ in layout(served / s)]
        for name, tensor in got:
            assert_same_tensor(name, tensor, want[name])

    def test_a_flipped_byte_fails_a_cuda_load(self, served: Path, tmp_path: Path) -> None:
        directory = copy_served(served, tmp_path)
        shards = shards_of(directory)
        index, offset = _in_a_long_tensor(directory, shards)
        flip(directory / shards[index], offset)
        yielded: list[str] = []
        with pytest.raises(LoadCheckFailed) as caught:
            drain(CheckedReader(directory, "cuda", LoadOptions(threads=2, buffers=2)), yielded)
        lo = offset // CHUNK * CHUNK
        assert caught.value.offset == lo
        assert not {n for n, b, e in layout(directory / shards[index]) if b < lo + CHUNK and e > lo} & set(yielded)
