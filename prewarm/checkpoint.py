"""Find and validate a checkpoint as published: its weight files, tensors and other files."""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from prewarm.confine import (
    NotRegular,
    Root,
    Skipped,
    check_name,
    list_regular_files,
    open_regular,
    parse_json,
    read_small_file,
    resolve_regular,
    root_of,
)
from prewarm.errors import FilesystemError, InvalidCheckpoint
from prewarm.fsutil import os_error
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
class SourceFile:
    """A file of the source as it was when planned: copying checks it is still the same file."""

    name: str  # relative to the root
    path: Path
    identity: tuple[int, int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns
    mode: int  # permission bits: what is written from it gets no more

    @property
    def size(self) -> int:
        return self.identity[2]


def identity_of(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


@dataclass(frozen=True)
class Checkpoint:
    """A source checkpoint, validated; ``tensors`` are in model order."""

    source: Path
    root: Root
    weight_files: tuple[SafetensorsFile, ...]
    tensors: tuple[SourceTensor, ...]
    metadata: dict[str, str] | None
    other_files: tuple[SourceFile, ...]  # config, tokenizer, templates: copied as they are
    skipped_files: tuple[str, ...]  # other weight formats, unindexed shards, subdirectories
    refused: tuple[Skipped, ...]  # FIFOs, sockets, symlinks leading outside SRC: never opened
    files: dict[Path, SourceFile]  # every file read, by path

    @property
    def tensor_bytes(self) -> int:
        return sum(t.info.nbytes for t in self.tensors)


def open_checkpoint(source: Path) -> Checkpoint:
    """Read every header of ``source`` (a directory or one .safetensors file) and cross-check them."""
    if str(source) == "":
        raise FilesystemError("an empty path was given", hint="name the checkpoint (is a shell variable unset?)")
    try:
        st = os.stat(source)
    except OSError as exc:
        raise os_error(exc, source) from exc
    if stat.S_ISDIR(st.st_mode):
        root = root_of(source)
        weights, other, skipped, refused = _scan_directory(root)
    elif stat.S_ISREG(st.st_mode):
        root = Root(source.parent, (os.path.realpath(source),))  # the user named this one file
        weights, other, skipped, refused = [source.name], [], [], []
    else:
        raise InvalidCheckpoint(
            "not a regular file or directory", str(source), hint="give a model directory or a .safetensors file"
        )
    files: dict[Path, SourceFile] = {}
    headers = tuple(_read_weight_header(root, name, files) for name in weights)
    others = tuple(_source_file(root, name, files) for name in other)
    tensors = _collect_tensors(headers)
    if stat.S_ISDIR(st.st_mode) and INDEX_NAME not in skipped and _has_index(root):
        _source_file(root, INDEX_NAME, files)  # not copied (a new index is written), but it must not change
        _check_index_matches(root.path(INDEX_NAME), _read_index(root), tensors)
    return Checkpoint(
        source,
        root,
        headers,
        tuple(sorted(tensors, key=lambda t: model_order_key(t.info.name))),
        _merge_metadata(headers),
        others,
        tuple(skipped),
        tuple(refused),
        files,
    )


def _has_index(root: Root) -> bool:
    try:
        resolve_regular(root, INDEX_NAME)
    except (OSError, NotRegular):
        return False
    return True


def open_source(root: Root, name: str) -> int:
    """A descriptor on a source file; refusals and OS errors as one-line errors naming it."""
    path = root.path(name)
    try:
        return open_regular(root, name)
    except NotRegular as why:
        raise InvalidCheckpoint(f"refused: {why.reason}", str(path), hint=_REFUSED_HINT) from None
    except OSError as exc:
        raise os_error(exc, path) from exc


_REFUSED_HINT = "copy the real file into the checkpoint directory, or remove what is there"


def _source_file(root: Root, name: str, files: dict[Path, SourceFile]) -> SourceFile:
    fd = open_source(root, name)
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    files[root.path(name)] = SourceFile(name, root.path(name), identity_of(st), stat.S_IMODE(st.st_mode))
    return files[root.path(name)]


def _read_weight_header(root: Root, name: str, files: dict[Path, SourceFile]) -> SafetensorsFile:
    fd = open_source(root, name)
    try:
        st = os.fstat(fd)
        header = read_safetensors_header(root.path(name), fd)
    finally:
        os.close(fd)
    files[root.path(name)] = SourceFile(name, root.path(name), identity_of(st), stat.S_IMODE(st.st_mode))
    return header


def _scan_directory(root: Root) -> tuple[list[str], list[str], list[str], list[Skipped]]:
    """(weight files, other files, skipped names, refused entries) at the top of the checkpoint."""
    listing = list_regular_files(root)
    entries = [n for n in listing.files if "/" not in n]
    subdirectories = sorted(  # e.g. "original/" with another format's weights
        e.name for e in os.scandir(root.directory) if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")
    )
    refused = [s for s in listing.skipped if "/" not in s.name]
    shards = [n for n in entries if n.endswith(".safetensors")]
    skipped: list[str] = []
    if INDEX_NAME in entries:
        indexed = _index_files(root, set(entries), {s.name: s.reason for s in refused})
        skipped = [n for n in shards if n not in indexed]
        shards = sorted(indexed)
    if not shards:
        raise InvalidCheckpoint(
            "no .safetensors weight files found", str(root.directory), hint="convert pickled weights to safetensors first"
        )
    other: list[str] = []
    pickles: list[str] = []
    for name in entries:
        if name.endswith(".safetensors") or name in (INDEX_NAME, MANIFEST_NAME) or name.endswith(".index.json"):
            continue
        (pickles if name.endswith(OTHER_WEIGHT_SUFFIXES) else other).append(name)
    return shards, other, skipped + pickles + subdirectories, refused


def _index_files(root: Root, regular: set[str], refused: dict[str, str]) -> set[str]:
    index_path = root.path(INDEX_NAME)
    names = set(_read_index(root).values())
    for name in sorted(names):
        check_name(name, "its weight_map", index_path)
        if "/" in name:
            raise InvalidCheckpoint(
                f"weight_map names {name!r}, which is not a file beside the index", str(index_path), hint=_INDEX_HINT
            )
        if name in refused:
            raise InvalidCheckpoint(f"weight_map names {name!r}, which is {refused[name]}", str(index_path), hint=_REFUSED_HINT)
        if name not in regular:
            raise InvalidCheckpoint(f"weight_map names {name!r}, which is missing", str(index_path), hint=_INDEX_HINT)
    return names


_INDEX_HINT = "fetch or export the checkpoint again: the index and the shards do not belong together"


def _read_index(root: Root) -> dict[str, str]:
    index_path = root.path(INDEX_NAME)
    try:
        index = parse_json(read_small_file(root, INDEX_NAME))
    except NotRegular as why:
        raise InvalidCheckpoint(f"refused: {why.reason}", str(index_path), hint=_REFUSED_HINT) from None
    except OSError as exc:
        raise os_error(exc, index_path) from exc
    except ValueError as exc:
        raise InvalidCheckpoint(f"index is not valid JSON: {exc}", str(index_path), hint=_INDEX_HINT) from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InvalidCheckpoint("index has no weight_map of tensor names to file names", str(index_path), hint=_INDEX_HINT)
    return weight_map


def _collect_tensors(headers: tuple[SafetensorsFile, ...]) -> list[SourceTensor]:
    owner: dict[str, Path] = {}
    tensors = []
    for header in headers:
        for info in header.tensors:
            if info.name in owner:
                raise InvalidCheckpoint(
                    f"tensor {info.name!r} is in both {owner[info.name].name} and {header.path.name}",
                    str(header.path.parent),
                    hint=_INDEX_HINT,
                )
            owner[info.name] = header.path
            tensors.append(SourceTensor(info, header.path))
    return tensors


def _check_index_matches(index_path: Path, weight_map: dict[str, str], tensors: list[SourceTensor]) -> None:
    actual = {t.info.name: t.file.name for t in tensors}
    for name, file in sorted(weight_map.items()):
        if actual.get(name) != file:
            where = f"is in {actual[name]}" if name in actual else "is in no shard"
            raise InvalidCheckpoint(f"index puts tensor {name!r} in {file}, but it {where}", str(index_path), hint=_INDEX_HINT)
    unindexed = sorted(set(actual) - set(weight_map))
    if unindexed:
        raise InvalidCheckpoint(
            f"tensor {unindexed[0]!r} in {actual[unindexed[0]]} is missing from the index ({len(unindexed)} tensors in all)",
            str(index_path),
            hint=_INDEX_HINT,
        )


def _merge_metadata(headers: tuple[SafetensorsFile, ...]) -> dict[str, str] | None:
    if all(header.metadata is None for header in headers):
        return None
    merged: dict[str, str] = {}
    for header in headers:
        for key, value in (header.metadata or {}).items():
            if merged.setdefault(key, value) != value:
                raise InvalidCheckpoint(
                    f"shards disagree on __metadata__ {key!r}: {merged[key]!r} vs {value!r}", str(header.path), hint=_INDEX_HINT
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
