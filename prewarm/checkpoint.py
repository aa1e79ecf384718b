"""Find and validate a checkpoint as published: its weight files, tensors and other files."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from prewarm.errors import FilesystemError, InvalidCheckpoint
from prewarm.safetensors import SafetensorsFile, TensorInfo, read_safetensors_header

INDEX_NAME = "model.safetensors.index.json"
MANIFEST_NAME = "prewarm.manifest.json"
# Weight formats that are not safetensors (pickles can run code when loaded; the rest are
# other runtimes' copies of the same weights): never copied into a serving directory.
OTHER_WEIGHT_SUFFIXES = (
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".pkl",
    ".pickle",
    ".h5",
    ".msgpack",
    ".gguf",
    ".onnx",
    ".tflite",
    ".npz",
)


@dataclass(frozen=True)
class SourceTensor:
    info: TensorInfo
    file: Path


@dataclass(frozen=True)
class Checkpoint:
    """A source checkpoint, validated; ``tensors`` are in model order."""

    source: Path
    weight_files: tuple[SafetensorsFile, ...]
    tensors: tuple[SourceTensor, ...]
    metadata: dict[str, str] | None
    other_files: tuple[Path, ...]  # config, tokenizer, templates: copied as they are
    skipped_files: tuple[Path, ...]  # other weight formats and unindexed shards

    @property
    def tensor_bytes(self) -> int:
        return sum(t.info.nbytes for t in self.tensors)


def open_checkpoint(source: Path) -> Checkpoint:
    """Read every header of ``source`` (a directory or one .safetensors file) and cross-check them."""
    if not source.exists():
        raise FilesystemError("no such file or directory", str(source))
    other: list[Path] = []
    skipped: list[Path] = []
    if source.is_file():
        files = [source]
    elif source.is_dir():
        files, other, skipped = _scan_directory(source)
    else:
        raise InvalidCheckpoint("not a regular file or directory", str(source))
    headers = tuple(read_safetensors_header(f) for f in files)
    tensors = _collect_tensors(headers)
    if source.is_dir() and (source / INDEX_NAME).exists():
        _check_index_matches(source / INDEX_NAME, tensors)
    return Checkpoint(
        source,
        headers,
        tuple(sorted(tensors, key=lambda t: model_order_key(t.info.name))),
        _merge_metadata(headers),
        tuple(other),
        tuple(skipped),
    )


def _scan_directory(root: Path) -> tuple[list[Path], list[Path], list[Path]]:
    visible = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    entries = [p for p in visible if p.is_file()]
    subdirectories = [p for p in visible if p.is_dir()]  # e.g. "original/" with another format's weights
    shards = [p for p in entries if p.suffix == ".safetensors"]
    if (root / INDEX_NAME).is_file():
        indexed = _index_files(root / INDEX_NAME)
        skipped = [p for p in shards if p.name not in indexed]
        shards = [root / name for name in sorted(indexed)]
    else:
        skipped = []
    if not shards:
        raise InvalidCheckpoint(
            "no .safetensors weight files found", str(root), hint="convert pickled weights to safetensors first"
        )
    other: list[Path] = []
    pickles: list[Path] = []
    for p in entries:
        if p.suffix == ".safetensors" or p.name in (INDEX_NAME, MANIFEST_NAME) or p.name.endswith(".index.json"):
            continue
        (pickles if p.suffix in OTHER_WEIGHT_SUFFIXES else other).append(p)
    return shards, other, skipped + pickles + subdirectories


def _index_files(index_path: Path) -> set[str]:
    weight_map = _read_index(index_path)
    names = set(weight_map.values())
    for name in sorted(names):
        if "/" in name or name in ("", ".", ".."):
            raise InvalidCheckpoint(f"weight_map names {name!r}, which is not a file beside the index", str(index_path))
        if not (index_path.parent / name).is_file():
            raise InvalidCheckpoint(f"weight_map names {name!r}, which is missing", str(index_path))
    return names


def _read_index(index_path: Path) -> dict[str, str]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidCheckpoint(f"index is not valid JSON: {exc}", str(index_path)) from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InvalidCheckpoint("index has no weight_map of tensor names to file names", str(index_path))
    return weight_map


def _collect_tensors(headers: tuple[SafetensorsFile, ...]) -> list[SourceTensor]:
    owner: dict[str, Path] = {}
    tensors = []
    for header in headers:
        for info in header.tensors:
            if info.name in owner:
                raise InvalidCheckpoint(
                    f"tensor {info.name!r} is in both {owner[info.name].name} and {header.path.name}", str(header.path.parent)
                )
            owner[info.name] = header.path
            tensors.append(SourceTensor(info, header.path))
    return tensors


def _check_index_matches(index_path: Path, tensors: list[SourceTensor]) -> None:
    weight_map = _read_index(index_path)
    actual = {t.info.name: t.file.name for t in tensors}
    for name, file in sorted(weight_map.items()):
        if actual.get(name) != file:
            where = f"is in {actual[name]}" if name in actual else "is in no shard"
            raise InvalidCheckpoint(f"index puts tensor {name!r} in {file}, but it {where}", str(index_path))
    unindexed = sorted(set(actual) - set(weight_map))
    if unindexed:
        raise InvalidCheckpoint(
            f"tensor {unindexed[0]!r} in {actual[unindexed[0]]} is missing from the index ({len(unindexed)} tensors in all)",
            str(index_path),
        )


def _merge_metadata(headers: tuple[SafetensorsFile, ...]) -> dict[str, str] | None:
    if all(header.metadata is None for header in headers):
        return None
    merged: dict[str, str] = {}
    for header in headers:
        for key, value in (header.metadata or {}).items():
            if merged.setdefault(key, value) != value:
                raise InvalidCheckpoint(
                    f"shards disagree on __metadata__ {key!r}: {merged[key]!r} vs {value!r}", str(header.path)
                )
    return merged


_NUMBER = re.compile(r"(\d+)")
_HEAD_PREFIXES = ("lm_head", "output", "score", "classifier", "head")


def model_order_key(name: str) -> tuple[int, tuple[tuple[int, int | str], ...]]:
    """Embeddings first, then numbered blocks in numeric order, then the rest, heads last.

    Checkpoints store tensors sorted as strings (layers.10 before layers.2); a loader that
    walks the model front to back then jumps around each file. This puts them in the order
    the forward pass uses them, so each shard is read front to back.
    """
    parts = tuple((1, int(p)) if p.isdigit() else (0, p) for p in _NUMBER.split(name) if p)
    top = name.split(".", 1)[0]
    if top in _HEAD_PREFIXES:
        rank = 3
    elif "embed" in name or top in ("wte", "wpe", "tok_embeddings"):
        rank = 0
    elif _NUMBER.search(name):
        rank = 1
    else:
        rank = 2
    return rank, parts
