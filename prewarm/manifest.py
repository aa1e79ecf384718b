"""xxh3-128 manifests: what a directory should hold, per file and per fixed-size chunk.

``prewarm.manifest.json`` lists every file with its size, the xxh3-128 of the whole file (so
``xxhsum -H2`` can check it by hand) and of each ``chunk_size`` piece, which lets verify run
on many threads and name the byte range that is wrong.
"""

from __future__ import annotations

import json
import os
import re
import stat
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard, TypeVar

import xxhash

from prewarm.checkpoint import MANIFEST_NAME
from prewarm.confine import (
    Listing,
    NotRegular,
    Root,
    Skipped,
    list_regular_files,
    open_regular,
    parse_json,
    read_small_file,
    resolve_regular,
    root_of,
    unsafe_name_reason,
)
from prewarm.errors import FilesystemError, ManifestError
from prewarm.fsutil import os_error, write_file_atomic
from prewarm.progress import CancellableProgress, NoProgress, Progress
from prewarm.units import MAX_SIZE

FORMAT = "prewarm-manifest"
VERSION = 1
HASH = "xxh3_128"
CHUNK_SIZE = 16 * 2**20


@dataclass(frozen=True)
class FileDigest:
    size: int
    xxh3_128: str
    chunks: tuple[str, ...]


class Digester:
    """Digests of a whole file and of each ``chunk_size`` piece, fed once, in order."""

    def __init__(self, chunk_size: int = CHUNK_SIZE) -> None:
        self.chunk_size = chunk_size
        self._whole = xxhash.xxh3_128()
        self._chunk = xxhash.xxh3_128()
        self._fill = 0
        self._size = 0
        self._chunks: list[str] = []

    def update(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        self._whole.update(view)
        self._size += len(view)
        while view:
            take = min(len(view), self.chunk_size - self._fill)
            self._chunk.update(view[:take])
            self._fill += take
            view = view[take:]
            if self._fill == self.chunk_size:
                self._close_chunk()

    def _close_chunk(self) -> None:
        self._chunks.append(self._chunk.hexdigest())
        self._chunk.reset()
        self._fill = 0

    def finish(self) -> FileDigest:
        if self._fill:
            self._close_chunk()
        return FileDigest(self._size, self._whole.hexdigest(), tuple(self._chunks))


@dataclass(frozen=True)
class Manifest:
    files: Mapping[str, FileDigest]
    chunk_size: int = CHUNK_SIZE
    source: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        """Pretty JSON with one line per file, so a diff of two manifests reads file by file."""
        head = {
            "format": FORMAT,
            "version": VERSION,
            "hash": HASH,
            "chunk_size": self.chunk_size,
            "source": dict(self.source),
            "options": dict(self.options),
        }
        lines = [f" {json.dumps(k)}: {json.dumps(v, sort_keys=True)}," for k, v in head.items()]
        entries = [
            f"  {json.dumps(name)}: " + json.dumps({"size": d.size, HASH: d.xxh3_128, "chunks": list(d.chunks)})
            for name, d in sorted(self.files.items())
        ]
        return ("{\n" + "\n".join(lines) + '\n "files": {\n' + ",\n".join(entries) + "\n }\n}\n").encode()

    @property
    def total_bytes(self) -> int:
        return sum(d.size for d in self.files.values())


def read_manifest(directory: Path) -> Manifest:
    """The manifest of ``directory``, every field checked: a damaged or hostile manifest is one
    ManifestError, never a traceback, and names nothing outside the directory."""
    path = directory / MANIFEST_NAME
    try:
        raw = read_small_file(root_of(directory), MANIFEST_NAME, MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raise ManifestError(
            "no prewarm.manifest.json here", str(directory), hint=f"run `prewarm manifest {directory}` to create one"
        ) from None
    except NotRegular as why:
        raise ManifestError(f"the manifest is {why.reason}", str(path), hint=_REBUILD_HINT) from None
    except OSError as exc:
        raise os_error(exc, path) from exc
    try:
        doc = parse_json(raw, file_names=True)
    except ValueError as exc:
        raise ManifestError(f"not valid JSON: {exc}", str(path), hint=_REBUILD_HINT) from None
    try:
        return parse_manifest(doc)
    except ValueError as exc:
        raise ManifestError(f"not a valid manifest: {exc}", str(path), hint=_REBUILD_HINT) from None


MAX_MANIFEST_BYTES = 1 << 30
_REBUILD_HINT = "rebuild it: reshard again, or run `prewarm manifest DIR` on files you trust"
_HEX128 = re.compile(r"[0-9a-f]{32}")


def parse_manifest(doc: object) -> Manifest:
    """A Manifest from parsed JSON; ValueError saying what is wrong."""
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    if (doc.get("format"), doc.get("version"), doc.get("hash")) != (FORMAT, VERSION, HASH):
        raise ValueError(f"unsupported format {doc.get('format')!r} version {doc.get('version')!r} hash {doc.get('hash')!r}")
    chunk_size = doc.get("chunk_size")
    if not _is_int(chunk_size) or not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size {chunk_size!r} is not a whole number of bytes from 1 to {MAX_CHUNK_SIZE}")
    files, source, options = doc.get("files"), doc.get("source", {}), doc.get("options", {})
    if not isinstance(files, dict) or not isinstance(source, dict) or not isinstance(options, dict):
        raise ValueError("files, source and options must be JSON objects")
    digests = {_checked_name(name): _parse_entry(name, entry, chunk_size) for name, entry in files.items()}
    return Manifest(digests, chunk_size, source, options)


MAX_CHUNK_SIZE = 1 << 30


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _checked_name(name: str) -> str:
    reason = unsafe_name_reason(name)
    if reason is None and name == MANIFEST_NAME:
        reason = "the manifest itself"
    if reason is not None:
        raise ValueError(f"it lists {name!r}: {reason}, not a file inside the directory")
    return name


def _parse_entry(name: str, entry: object, chunk_size: int) -> FileDigest:
    if not isinstance(entry, dict):
        raise ValueError(f"the entry for {name!r} is not a JSON object")
    size, whole, chunks = entry.get("size"), entry.get(HASH), entry.get("chunks")
    if not _is_int(size) or not 0 <= size <= MAX_SIZE:
        raise ValueError(f"{name!r} has size {size!r}, not a number of bytes")
    if not isinstance(chunks, list) or not all(isinstance(c, str) and _HEX128.fullmatch(c) for c in [whole, *chunks]):
        raise ValueError(f"{name!r} has digests that are not 32 hex digits")
    if len(chunks) != -(-size // chunk_size):
        raise ValueError(f"{name!r} has {len(chunks)} chunk digests, {-(-size // chunk_size)} expected for {size} bytes")
    return FileDigest(size, str(whole), tuple(chunks))


def write_manifest(directory: Path, manifest: Manifest, mode: int = 0o644) -> int:
    """Write the manifest into ``directory``; the number of bytes written."""
    data = manifest.to_json()
    write_file_atomic(directory / MANIFEST_NAME, data, mode)
    return len(data)


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)))


def list_files(root: Root) -> Listing:
    """The regular files a manifest covers (all but hidden ones and the manifest), and what was skipped."""
    return list_regular_files(root, exclude=frozenset({MANIFEST_NAME}))


def read_range(fd: int, offset: int, length: int, buffer: memoryview, consume: Callable[[memoryview], None]) -> int:
    """pread ``length`` bytes from ``offset`` through ``buffer``; return how many there were."""
    done = 0
    while done < length:
        n = os.preadv(fd, [buffer[: min(len(buffer), length - done)]], offset + done)
        if n == 0:
            break
        consume(buffer[:n])
        done += n
    return done


def read_file_range(fd: int, offset: int, length: int, consume: Callable[[memoryview], None], exact: bool = False) -> int:
    """Read ``length`` bytes of the file open at ``fd`` from ``offset`` front to back, advised
    sequential: the kernel's readahead then ramps to its largest window and fills the page cache
    with large folios, which a later mmap load (safetensors, vLLM) reads back 2x faster than pages
    brought in by small interleaved reads (measured here). With ``exact``, readahead is off
    (POSIX_FADV_RANDOM), so no page past the range is read: for a memory budget."""
    os.posix_fadvise(fd, offset, length, os.POSIX_FADV_RANDOM if exact else os.POSIX_FADV_SEQUENTIAL)
    return read_range(fd, offset, length, thread_buffer(min(length, READ_BUFFER) or 1), consume)


READ_BUFFER = 16 * 2**20
_buffers = threading.local()


def thread_buffer(size: int) -> memoryview:
    """One reused read buffer per thread: memory stays flat however large the files are."""
    buf = getattr(_buffers, "buf", None)
    if buf is None or len(buf) < size:
        buf = _buffers.buf = memoryview(bytearray(size))
    return buf[:size]


def digest_file(root: Root, name: str, chunk_size: int = CHUNK_SIZE, progress: Progress | None = None) -> FileDigest:
    progress = progress or NoProgress()
    digester = Digester(chunk_size)

    def consume(view: memoryview) -> None:
        digester.update(view)
        progress.advance(len(view))

    fd = open_file(root, name)
    try:
        size = os.fstat(fd).st_size
        got = read_range(fd, 0, size, thread_buffer(chunk_size), consume)
    finally:
        os.close(fd)
    if got != size:
        raise FilesystemError(f"changed while being read: {got} of {size} bytes", str(root.path(name)), hint=_AGAIN_HINT)
    return digester.finish()


_AGAIN_HINT = "run again when nothing is writing the directory"


def open_file(root: Root, name: str) -> int:
    """open_regular with its refusals as one-line errors naming the user's path."""
    path = root.path(name)
    try:
        return open_regular(root, name)
    except NotRegular as why:
        raise FilesystemError(f"refused: {why.reason}", str(path), hint="remove it, or replace it with the real file") from None
    except OSError as exc:
        raise os_error(exc, path) from exc


T = TypeVar("T")
R = TypeVar("R")


def parallel_map(
    work: Callable[[T, Progress], R], items: Iterable[T], threads: int | None, progress: Progress, name: str = "prewarm-read"
) -> list[R]:
    """``work(item, progress)`` for every item on ``threads`` threads, results in order. On Ctrl-C or
    SIGTERM every worker stops at its next buffer (16 MiB), so the command ends within moments
    instead of finishing every file it had started."""
    cancel = threading.Event()
    guarded = CancellableProgress(progress, cancel)
    pool = ThreadPoolExecutor(threads or default_threads(), thread_name_prefix=name)
    try:
        return list(pool.map(lambda item: work(item, guarded), items))
    except BaseException:
        cancel.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def digest_files(
    root: Root,
    names: Iterable[str],
    threads: int | None = None,
    progress: Progress | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> dict[str, FileDigest]:
    """Digest files in parallel, largest first, each read once front to back."""
    progress = progress or NoProgress()
    sizes = {name: _size_of(root, name) for name in names}
    progress.start("hashing", sum(sizes.values()))
    order = sorted(sizes, key=lambda n: -sizes[n])
    results = parallel_map(lambda n, guarded: digest_file(root, n, chunk_size, guarded), order, threads, progress)
    digests = dict(zip(order, results, strict=True))
    progress.finish()
    return {name: digests[name] for name in sorted(digests)}


def _size_of(root: Root, name: str) -> int:
    fd = open_file(root, name)
    try:
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


@dataclass(frozen=True)
class BuiltManifest:
    manifest: Manifest
    skipped: tuple[Skipped, ...]  # FIFOs, sockets, symlinks leading outside the directory: not hashed
    mode: int  # the permission bits all the files share: the manifest gets no more


def build_manifest(
    directory: Path, threads: int | None = None, progress: Progress | None = None, source: Mapping[str, Any] | None = None
) -> BuiltManifest:
    """A manifest of ``directory`` as it is now (for a directory prewarm did not write)."""
    root = root_of(directory)
    listing = list_files(root)
    files = digest_files(root, listing.files, threads, progress)
    mode = 0o666
    for name in listing.files:
        mode &= stat.S_IMODE(resolve_regular(root, name)[1].st_mode)
    manifest = Manifest(files, CHUNK_SIZE, source or {"kind": "directory", "path": str(directory.resolve())})
    return BuiltManifest(manifest, listing.skipped, mode)
