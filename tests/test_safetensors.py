"""The format module on hand-written bytes, and against the safetensors library itself."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from prewarm.errors import InvalidCheckpoint
from prewarm.safetensors import (
    DTYPE_BITS,
    encode_header,
    header_entry,
    metadata_entry,
    padded_header_length,
    read_safetensors_header,
)
from tests.helpers import write_raw_safetensors

GOLDEN = (
    b"\x40\x00\x00\x00\x00\x00\x00\x00"
    b'{"a":{"dtype":"F16","shape":[2],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[],"data_offsets":[4,5]}}'
)


def test_reads_a_golden_file(tmp_path: Path) -> None:
    body = GOLDEN[8:] + b" " * (0x40 - len(GOLDEN[8:]))
    path = tmp_path / "g.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + b"\x00\x3c\x00\x40\x07")
    parsed = read_safetensors_header(path)
    assert [(t.name, t.dtype, t.shape, t.begin, t.end) for t in parsed.tensors] == [
        ("a", "F16", (2,), 8 + len(body), 12 + len(body)),
        ("b", "U8", (), 12 + len(body), 13 + len(body)),
    ]
    assert parsed.metadata is None


def test_encoded_header_is_what_the_library_reads(tmp_path: Path) -> None:
    members = [metadata_entry({"format": "pt"}), header_entry("x", "BF16", [3], 0, 6), header_entry("y", "I32", [1], 6, 10)]
    header = encode_header(members)
    assert len(header) - 8 == padded_header_length(map(len, members), len(members))
    assert (len(header) - 8) % 8 == 0
    path = tmp_path / "h.safetensors"
    path.write_bytes(header + bytes(range(10)))
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert f.get_tensor("y").view(torch.uint8).tolist() == [6, 7, 8, 9]


_dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int64])


@settings(max_examples=40, deadline=None)
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=12), st.tuples(_dtypes, st.lists(st.integers(0, 5), max_size=3)), min_size=1, max_size=6
    )
)
def test_parses_whatever_the_library_writes(tmp_path_factory: pytest.TempPathFactory, spec: dict) -> None:
    path = tmp_path_factory.mktemp("p") / "x.safetensors"
    tensors = {name: torch.zeros(shape, dtype=dtype) for name, (dtype, shape) in spec.items()}
    save_file(tensors, str(path), metadata={"k": "v"})
    parsed = read_safetensors_header(path)
    assert {t.name for t in parsed.tensors} == set(spec)
    assert parsed.metadata == {"k": "v"}
    for t in parsed.tensors:
        assert t.shape == tuple(spec[t.name][1])
        assert t.nbytes == tensors[t.name].numel() * tensors[t.name].element_size()


def _entry(dtype: str = "U8", shape: list[int] | None = None, offsets: list[int] | None = None) -> dict:
    return {"dtype": dtype, "shape": shape if shape is not None else [4], "data_offsets": offsets or [0, 4]}


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        ({"a": _entry(dtype="Q7")}, b"1234", "unknown dtype 'Q7'"),
        ({"a": _entry(shape=[5])}, b"1234", "needs 5 bytes"),
        ({"a": _entry(), "b": _entry(offsets=[2, 6], shape=[4])}, b"123456", "overlaps"),
        ({"a": _entry(), "b": _entry(offsets=[6, 10])}, b"1234567890", "hole of 2 bytes"),
        ({"a": _entry(offsets=[2, 6])}, b"123456", "hole of 2 bytes"),
        ({"a": _entry()}, b"12", "truncated"),
        ({"a": _entry()}, b"123456", "2 unexplained bytes"),
        ({"a": {**_entry(), "extra": 1}}, b"1234", "fields must be exactly"),
        ({"a": _entry(shape=[-4])}, b"1234", "not a list of non-negative integers"),
        ({"a": _entry(shape=[True, 4])}, b"1234", "not a list of non-negative integers"),
        ({"a": _entry(offsets=[4, 0])}, b"1234", "begin <= end"),
        ({"__metadata__": {"k": 1}, "a": _entry()}, b"1234", "__metadata__ must map strings"),
        ({"a": "nope"}, b"", "not a JSON object"),
    ],
)
def test_rejects_broken_headers(tmp_path: Path, header: dict, data: bytes, message: str) -> None:
    path = write_raw_safetensors(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(InvalidCheckpoint) as info:
        read_safetensors_header(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("raw", "header_len", "message"),
    [
        (b'{"a":1', None, "not valid JSON"),
        (b"\xff\xfe", None, "not valid JSON"),
        (b"[1, 2]", None, "not a JSON object"),
        (
            b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
            None,
            "names tensor 'a' twice",
        ),
        (b"{}", 10**9, "invalid header length"),
        (b"{}", 200_000_000, "invalid header length"),
    ],
)
def test_rejects_unparseable_headers(tmp_path: Path, raw: bytes, header_len: int | None, message: str) -> None:
    path = write_raw_safetensors(tmp_path / "bad.safetensors", raw, b"\x00", header_len)
    with pytest.raises(InvalidCheckpoint) as info:
        read_safetensors_header(path)
    assert message in str(info.value)


def test_rejects_a_file_too_short_for_a_header(tmp_path: Path) -> None:
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(InvalidCheckpoint, match="too short"):
        read_safetensors_header(path)


def test_every_known_dtype_has_whole_or_packed_bits() -> None:
    assert DTYPE_BITS["BF16"] == 16 and DTYPE_BITS["F4"] == 4
    assert all(bits in (4, 6, 8, 16, 32, 64) for bits in DTYPE_BITS.values())
