"""Reshard a checkpoint into ``model-0000i-of-0000N.safetensors`` files of at most a size.

Tensors are never decoded: each is a byte range copied through one reused buffer and hashed on
the way, so memory stays flat and the manifest costs no second read. Everything is written in a
temp directory that becomes the destination in one rename.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from prewarm.checkpoint import INDEX_NAME, Checkpoint, SourceTensor, open_checkpoint
from prewarm.errors import FilesystemError, InvalidCheckpoint
from prewarm.fsutil import atomic_directory, check_free_space, os_error
from prewarm.manifest import CHUNK_SIZE, Digester, FileDigest, Manifest, read_range, write_manifest
from prewarm.progress import NoProgress, Progress
from prewarm.safetensors import encode_header, header_entry, metadata_entry, padded_header_length
from prewarm.units import format_size

DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # "5GB" as transformers and the hub count it
COPY_BUFFER = 16 * 2**20


@dataclass(frozen=True)
class PlannedShard:
    tensors: tuple[SourceTensor, ...]
    header: bytes  # length prefix and padded JSON, exactly as written

    @property
    def size(self) -> int:
        return len(self.header) + sum(t.info.nbytes for t in self.tensors)


@dataclass(frozen=True)
class ReshardResult:
    destination: Path
    shards: tuple[tuple[str, int, int], ...]  # (file name, bytes, tensors)
    copied_files: tuple[str, ...]
    skipped_files: tuple[str, ...]
    tensor_bytes: int
    bytes_written: int
    timings: dict[str, float]


def shard_name(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def plan_shards(
    tensors: Sequence[SourceTensor], metadata: dict[str, str] | None, max_shard_size: int
) -> tuple[PlannedShard, ...]:
    """Split ``tensors`` (in order) greedily into shards whose files, header included, fit."""
    base = [metadata_entry(metadata)] if metadata is not None else []
    shards: list[PlannedShard] = []
    current: list[SourceTensor] = []
    members = list(base)
    member_bytes = sum(map(len, members))
    cursor = 0
    for tensor in tensors:
        entry = _entry(tensor, cursor)
        if (
            current
            and 8 + padded_header_length([member_bytes, len(entry)], len(members) + 1) + cursor + tensor.info.nbytes
            > max_shard_size
        ):
            shards.append(PlannedShard(tuple(current), encode_header(members)))
            current, members, member_bytes, cursor = [], list(base), sum(map(len, base)), 0
            entry = _entry(tensor, 0)
        needed = 8 + padded_header_length([member_bytes, len(entry)], len(members) + 1) + cursor + tensor.info.nbytes
        if not current and needed > max_shard_size:
            raise _too_large(tensor, needed, max_shard_size)
        current.append(tensor)
        members.append(entry)
        member_bytes += len(entry)
        cursor += tensor.info.nbytes
    if current or not shards:
        shards.append(PlannedShard(tuple(current), encode_header(members)))
    return tuple(shards)


def _entry(tensor: SourceTensor, begin: int) -> bytes:
    info = tensor.info
    return header_entry(info.name, info.dtype, info.shape, begin, begin + info.nbytes)


def _too_large(tensor: SourceTensor, needed: int, limit: int) -> InvalidCheckpoint:
    unit, scale = ("GB", 10**9) if needed >= 10**9 else ("MB", 10**6)
    suggestion = f"{math.ceil(needed / scale * 10) / 10:g}{unit}"
    info = tensor.info
    return InvalidCheckpoint(
        f"tensor {info.name!r} ({info.dtype} {list(info.shape)}, {format_size(info.nbytes)}) does not fit "
        f"in a shard of {format_size(limit)}",
        str(tensor.file),
        hint=f"use --max-shard-size {suggestion} or more",
    )


def encode_index(shards: Sequence[PlannedShard]) -> bytes:
    """``model.safetensors.index.json`` as transformers writes it (sorted keys, indent 2)."""
    names = [shard_name(i, len(shards)) for i in range(len(shards))]
    weight_map = {t.info.name: name for name, shard in zip(names, shards, strict=True) for t in shard.tensors}
    total = sum(t.info.nbytes for shard in shards for t in shard.tensors)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    return (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()


def reshard(
    source: Path,
    destination: Path,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    progress: Progress | None = None,
    source_info: dict[str, object] | None = None,
) -> ReshardResult:
    """Write ``destination`` (which must not exist) from the checkpoint at ``source``."""
    progress = progress or NoProgress()
    started = time.perf_counter()
    checkpoint = open_checkpoint(source)
    plan = plan_shards(checkpoint.tensors, checkpoint.metadata, max_shard_size)
    index = encode_index(plan)
    others = {p.name: p.stat().st_size for p in checkpoint.other_files}
    total = sum(s.size for s in plan) + sum(others.values()) + len(index)
    timings = {"plan": time.perf_counter() - started}
    with atomic_directory(destination) as temp, _Writer(temp, progress) as writer:
        check_free_space(temp, total)
        progress.start("resharding", total)
        for i, shard in enumerate(plan):
            ranges = [(t.file, t.info.begin, t.info.nbytes) for t in shard.tensors]
            writer.write(shard_name(i, len(plan)), shard.header, ranges)
        for path in checkpoint.other_files:
            writer.write(path.name, b"", [(path, 0, others[path.name])])
        writer.write(INDEX_NAME, index, [])
        timings["copy"] = time.perf_counter() - started - timings["plan"]
        digests = writer.digests()
        progress.finish()
        timings["sync"] = time.perf_counter() - started - timings["plan"] - timings["copy"]
        options = {"max_shard_size": max_shard_size}
        write_manifest(temp, Manifest(digests, CHUNK_SIZE, source_info or _source_info(checkpoint), options))
    timings["total"] = time.perf_counter() - started
    shards = tuple((shard_name(i, len(plan)), s.size, len(s.tensors)) for i, s in enumerate(plan))
    return ReshardResult(
        destination,
        shards,
        tuple(sorted(others)),
        tuple(p.name for p in checkpoint.skipped_files),
        checkpoint.tensor_bytes,
        total + len(index),
        timings,
    )


def _source_info(checkpoint: Checkpoint) -> dict[str, object]:
    files = {h.path.name: {"size": h.size} for h in checkpoint.weight_files}
    return {"kind": "path", "path": str(checkpoint.source.resolve()), "files": files}


_Range = tuple[Path, int, int]  # (file, offset, length)


class _Writer:
    """Writes files into the temp directory, hashing as it goes; fsyncs overlap the next copy."""

    def __init__(self, directory: Path, progress: Progress) -> None:
        self.directory = directory
        self.progress = progress
        self.buffer = memoryview(bytearray(COPY_BUFFER))
        self.sources: dict[Path, int] = {}
        self.syncer = ThreadPoolExecutor(1, thread_name_prefix="prewarm-fsync")
        self.pending: dict[str, Future[FileDigest]] = {}

    def __enter__(self) -> _Writer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.syncer.shutdown()
        for fd in self.sources.values():
            os.close(fd)

    def write(self, name: str, prefix: bytes, ranges: Sequence[_Range]) -> None:
        """Write ``prefix`` then each source byte range to a new file ``name``."""
        path = self.directory / name
        digester = Digester(CHUNK_SIZE)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as exc:
            raise os_error(exc, path) from exc

        def consume(view: memoryview) -> None:
            digester.update(view)
            _write_all(fd, view)
            self.progress.advance(len(view))

        try:
            consume(memoryview(prefix))
            for file, offset, length in ranges:
                if read_range(self._source(file), offset, length, self.buffer, consume) != length:
                    raise FilesystemError("changed while being read: shorter than expected", str(file))
        except OSError as exc:
            os.close(fd)
            raise os_error(exc, path) from exc
        except BaseException:
            os.close(fd)
            raise
        self.pending[name] = self.syncer.submit(_sync_and_close, fd, path, digester)

    def _source(self, file: Path) -> int:
        if file not in self.sources:
            try:
                self.sources[file] = os.open(file, os.O_RDONLY)
            except OSError as exc:
                raise os_error(exc, file) from exc
        return self.sources[file]

    def digests(self) -> dict[str, FileDigest]:
        """Wait for every fsync; the digests of all files written."""
        return {name: future.result() for name, future in sorted(self.pending.items())}


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view) :]


def _sync_and_close(fd: int, path: Path, digester: Digester) -> FileDigest:
    try:
        os.fsync(fd)
    except OSError as exc:
        raise os_error(exc, path) from exc
    finally:
        os.close(fd)
    return digester.finish()
