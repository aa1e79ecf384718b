"""The safetensors file format, read strictly and written byte-exactly, without torch.

Layout (https://github.com/huggingface/safetensors#format): an 8-byte little-endian header
length N, N bytes of UTF-8 JSON (padded with spaces to a multiple of 8), then the tensor data.
Each JSON entry gives a dtype, a shape and ``data_offsets`` relative to the end of the header.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prewarm.errors import InvalidCheckpoint
from prewarm.fsutil import os_error

# Bits per element, as the safetensors Rust crate defines them (F4/F6 pack below a byte).
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}
MAX_HEADER_BYTES = 100_000_000  # the reference implementation refuses larger headers
METADATA_KEY = "__metadata__"
_TENSOR_FIELDS = {"dtype", "shape", "data_offsets"}
_HINT = "the file is damaged or not a safetensors file: fetch or export it again"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor entry; ``begin``/``end`` are absolute byte offsets in its file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsFile:
    path: Path
    size: int
    data_start: int
    metadata: dict[str, str] | None
    tensors: tuple[TensorInfo, ...]  # in data order


def tensor_nbytes(dtype: str, shape: Sequence[int]) -> int | None:
    """Bytes a tensor of this dtype and shape occupies, or None if it is not whole bytes."""
    bits = DTYPE_BITS[dtype] * math.prod(shape)
    return bits // 8 if bits % 8 == 0 else None


def read_safetensors_header(path: Path, fd: int | None = None) -> SafetensorsFile:
    """Parse and validate ``path``'s header (read from ``fd`` when given) against its size;
    raise InvalidCheckpoint if broken."""
    try:
        with open(path, "rb") if fd is None else os.fdopen(os.dup(fd), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = os.pread(f.fileno(), 8, 0)
            if len(prefix) < 8:
                raise InvalidCheckpoint(
                    f"not a safetensors file: only {size} bytes, too short for a header", str(path), hint=_HINT
                )
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise InvalidCheckpoint(
                    f"invalid header length {header_len} for a file of {size} bytes (not a safetensors file, or truncated)",
                    str(path),
                    hint=_HINT,
                )
            raw = os.pread(f.fileno(), header_len, 8)
    except OSError as exc:
        raise os_error(exc, path) from exc
    header = _parse_header_json(raw, path)
    metadata = _parse_metadata(header.pop(METADATA_KEY, None), path)
    tensors = sorted(
        (_parse_entry(name, entry, 8 + header_len, path) for name, entry in header.items()), key=lambda t: (t.begin, t.end)
    )
    _check_contiguous(tensors, 8 + header_len, size, path)
    return SafetensorsFile(path, size, 8 + header_len, metadata, tuple(tensors))


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


class _DuplicateKey(ValueError):
    pass


def _parse_header_json(raw: bytes, path: Path) -> dict[str, Any]:
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except _DuplicateKey as exc:
        raise InvalidCheckpoint(f"header names tensor {exc.args[0]!r} twice", str(path), hint=_HINT) from None
    except RecursionError:
        raise InvalidCheckpoint("header is nested too deeply to be a safetensors header", str(path), hint=_HINT) from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidCheckpoint(f"header is not valid JSON: {exc}", str(path), hint=_HINT) from None
    if not isinstance(header, dict):
        raise InvalidCheckpoint("header is not a JSON object", str(path), hint=_HINT)
    for key in header:
        if not _is_text(key):
            raise InvalidCheckpoint(f"tensor name {key!r} has a lone surrogate, which is not text", str(path), hint=_HINT)
    return header


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _parse_metadata(value: Any, path: Path) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(v, str) and _is_text(v) and _is_text(k) for k, v in value.items()):
        raise InvalidCheckpoint(f"{METADATA_KEY} must map strings to strings", str(path), hint=_HINT)
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_entry(name: str, entry: Any, data_start: int, path: Path) -> TensorInfo:
    def bad(what: str) -> InvalidCheckpoint:
        return InvalidCheckpoint(f"tensor {name!r}: {what}", str(path), hint=_HINT)

    if not isinstance(entry, dict):
        raise bad("entry is not a JSON object")
    if set(entry) != _TENSOR_FIELDS:
        raise bad(f"fields must be exactly {sorted(_TENSOR_FIELDS)}, found {sorted(entry)}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_BITS:
        raise bad(f"unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
        raise bad(f"shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets) and offsets[0] <= offsets[1]):
        raise bad(f"data_offsets {offsets!r} is not [begin, end] with begin <= end")
    expected = tensor_nbytes(dtype, shape)
    if expected != offsets[1] - offsets[0]:
        raise bad(f"{dtype} {shape} needs {expected} bytes but data_offsets {offsets} span {offsets[1] - offsets[0]}")
    return TensorInfo(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def _check_contiguous(tensors: Sequence[TensorInfo], data_start: int, size: int, path: Path) -> None:
    cursor, previous = data_start, "the header"
    for t in tensors:
        if t.begin > cursor:
            hole = t.begin - cursor
            raise InvalidCheckpoint(f"hole of {hole} bytes between {previous} and tensor {t.name!r}", str(path), hint=_HINT)
        if t.begin < cursor:
            raise InvalidCheckpoint(f"tensor {t.name!r} overlaps {previous}", str(path), hint=_HINT)
        cursor, previous = t.end, f"tensor {t.name!r}"
    if cursor > size:
        raise InvalidCheckpoint(f"truncated: tensors need {cursor} bytes, the file has {size}", str(path), hint=_HINT)
    if cursor < size:
        raise InvalidCheckpoint(f"{size - cursor} unexplained bytes after the last tensor", str(path), hint=_HINT)


def header_entry(name: str, dtype: str, shape: Sequence[int], begin: int, end: int) -> bytes:
    """One ``"name":{...}`` member of the header JSON, exactly as ``encode_header`` writes it."""
    body = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
    return _json_member(name, body)


def metadata_entry(metadata: dict[str, str]) -> bytes:
    return _json_member(METADATA_KEY, metadata)


def _json_member(key: str, value: Any) -> bytes:
    text = json.dumps(key, ensure_ascii=False) + ":" + json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text.encode("utf-8")


def padded_header_length(members: Iterable[int], count: int) -> int:
    """Length of the JSON for members of the given byte lengths, padded to 8 (as the crate pads)."""
    raw = 2 + sum(members) + max(count - 1, 0)
    return raw + (-raw % 8)


def encode_header(members: Sequence[bytes]) -> bytes:
    """The file's first bytes: length prefix and space-padded JSON built from ``members``."""
    body = b"{" + b",".join(members) + b"}"
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body
