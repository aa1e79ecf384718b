"""Reshard a checkpoint into ``model-0000i-of-0000N.safetensors`` files of at most a size.

Tensors are never decoded: each is a byte range copied through one reused buffer and hashed on
the way, so memory stays flat and the manifest costs no second read. Everything is written in a
temp directory that becomes the destination in one rename.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from prewarm.checkpoint import INDEX_NAME, Checkpoint, SourceFile, SourceTensor, identity_of, open_checkpoint, open_source
from prewarm.confine import NotRegular, Skipped, resolve_regular
from prewarm.errors import FilesystemError, InvalidCheckpoint
from prewarm.fsutil import atomic_directory, check_free_space, create_exclusive, os_error, write_all
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
    refused_files: tuple[Skipped, ...]  # not regular files, or symlinks leading outside SRC
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
    """Write ``destination`` (which must not exist) from the checkpoint at ``source``.

    Every source file is checked to be the one planned each time it is opened and once more at
    the end; if any changed meanwhile, nothing is left at ``destination``. Each file written gets
    at most the permission bits of the files it was made from."""
    progress = progress or NoProgress()
    started = time.perf_counter()
    checkpoint = open_checkpoint(source)
    plan = plan_shards(checkpoint.tensors, checkpoint.metadata, max_shard_size)
    index = encode_index(plan)
    total = sum(s.size for s in plan) + sum(f.size for f in checkpoint.other_files) + len(index)
    all_modes = _common_mode(checkpoint.files.values())
    timings = {"plan": time.perf_counter() - started}
    with atomic_directory(destination) as temp, _Writer(temp, destination, checkpoint, progress) as writer:
        check_free_space(temp, total)
        progress.start("resharding", total)
        for i, shard in enumerate(plan):
            ranges = [(t.file, t.info.begin, t.info.nbytes) for t in shard.tensors]
            mode = _common_mode(checkpoint.files[t.file] for t in shard.tensors) if shard.tensors else all_modes
            writer.write(shard_name(i, len(plan)), shard.header, ranges, mode)
        for other in checkpoint.other_files:
            writer.write(other.name, b"", [(other.path, 0, other.size)], other.mode & 0o666)
        writer.write(INDEX_NAME, index, [], all_modes)
        timings["copy"] = time.perf_counter() - started - timings["plan"]
        digests = writer.digests()
        progress.finish()
        timings["sync"] = time.perf_counter() - started - timings["plan"] - timings["copy"]
        check_unchanged(checkpoint)
        options = {"max_shard_size": max_shard_size}
        manifest = Manifest(digests, CHUNK_SIZE, source_info or _source_info(checkpoint), options)
        manifest_bytes = write_manifest(temp, manifest, all_modes)
    timings["total"] = time.perf_counter() - started
    shards = tuple((shard_name(i, len(plan)), s.size, len(s.tensors)) for i, s in enumerate(plan))
    return ReshardResult(
        destination,
        shards,
        tuple(sorted(f.name for f in checkpoint.other_files)),
        checkpoint.skipped_files,
        checkpoint.refused,
        checkpoint.tensor_bytes,
        total + manifest_bytes,
        timings,
    )


def _common_mode(files: Iterable[SourceFile]) -> int:
    """The permission bits every one of ``files`` has (never execute, setuid or sticky)."""
    mode = 0o666
    for f in files:
        mode &= f.mode
    return mode


def check_unchanged(checkpoint: Checkpoint) -> None:
    """Fail if a source file is not the one planned: replaced, rewritten or resized meanwhile."""
    for f in checkpoint.files.values():
        try:
            _, st = resolve_regular(checkpoint.root, f.name)
        except (OSError, NotRegular):
            raise _changed(f.path) from None
        if identity_of(st) != f.identity:
            raise _changed(f.path)


def _changed(path: Path) -> FilesystemError:
    return FilesystemError(
        "changed while being resharded (replaced, rewritten or resized): nothing was written",
        str(path),
        hint="run again when nothing is writing the source",
    )


def _source_info(checkpoint: Checkpoint) -> dict[str, object]:
    files = {h.path.name: {"size": h.size} for h in checkpoint.weight_files}
    return {"kind": "path", "path": str(checkpoint.source.resolve()), "files": files}


_Range = tuple[Path, int, int]  # (file, offset, length)
OPEN_SOURCES = 64  # source descriptors kept open at once: a checkpoint of 10,000 files fits any ulimit -n
PENDING_SYNCS = 8  # written files waiting for their fsync (each holds a descriptor)


class _Writer:
    """Writes files into the temp directory, hashing as it goes; fsyncs overlap the next copy."""

    def __init__(self, directory: Path, destination: Path, checkpoint: Checkpoint, progress: Progress) -> None:
        self.directory = directory
        self.destination = destination
        self.checkpoint = checkpoint
        self.progress = progress
        self.buffer = memoryview(bytearray(COPY_BUFFER))
        self.sources: OrderedDict[Path, int] = OrderedDict()
        self.syncer = ThreadPoolExecutor(1, thread_name_prefix="prewarm-fsync")
        self.sync_slots = threading.BoundedSemaphore(PENDING_SYNCS)
        self.pending: dict[str, Future[FileDigest]] = {}

    def __enter__(self) -> _Writer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.syncer.shutdown()
        for fd in self.sources.values():
            os.close(fd)
        self.sources.clear()

    def write(self, name: str, prefix: bytes, ranges: Sequence[_Range], mode: int) -> None:
        """Write ``prefix`` then each source byte range to a new file ``name`` created with ``mode``."""
        final = self.destination / name  # errors name the user's destination, not the temp directory
        digester = Digester(CHUNK_SIZE)
        self.sync_slots.acquire()
        try:
            fd = create_exclusive(self.directory, name, mode)
        except OSError as exc:
            self.sync_slots.release()
            raise os_error(exc, final) from exc

        def consume(view: memoryview) -> None:
            digester.update(view)
            write_all(fd, view)
            self.progress.advance(len(view))

        try:
            consume(memoryview(prefix))
            for file, offset, length in ranges:
                if read_range(self._source(file), offset, length, self.buffer, consume) != length:
                    raise _changed(file)
        except OSError as exc:
            os.close(fd)
            self.sync_slots.release()
            raise os_error(exc, final) from exc
        except BaseException:
            os.close(fd)
            self.sync_slots.release()
            raise
        self.pending[name] = self.syncer.submit(self._sync_and_close, fd, final, digester)

    def _sync_and_close(self, fd: int, path: Path, digester: Digester) -> FileDigest:
        try:
            return _sync_and_close(fd, path, digester)
        finally:
            self.sync_slots.release()

    def _source(self, file: Path) -> int:
        """The source's descriptor, from a small LRU; a file opened again must be the one planned."""
        if file in self.sources:
            self.sources.move_to_end(file)
            return self.sources[file]
        planned = self.checkpoint.files[file]
        fd = open_source(self.checkpoint.root, planned.name)
        if identity_of(os.fstat(fd)) != planned.identity:
            os.close(fd)
            raise _changed(file)
        self.sources[file] = fd
        if len(self.sources) > OPEN_SOURCES:
            os.close(self.sources.popitem(last=False)[1])
        return fd

    def digests(self) -> dict[str, FileDigest]:
        """Wait for every fsync; the digests of all files written."""
        return {name: future.result() for name, future in sorted(self.pending.items())}


def _sync_and_close(fd: int, path: Path, digester: Digester) -> FileDigest:
    try:
        os.fsync(fd)
    except OSError as exc:
        raise os_error(exc, path) from exc
    finally:
        os.close(fd)
    return digester.finish()
