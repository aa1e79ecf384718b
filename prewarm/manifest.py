"""xxh3-128 manifests: what a directory should hold, per file and per fixed-size chunk.

``prewarm.manifest.json`` lists every file with its size, the xxh3-128 of the whole file (so
``xxhsum -H2`` can check it by hand) and of each ``chunk_size`` piece, which lets verify run
on many threads and name the byte range that is wrong.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from prewarm.checkpoint import MANIFEST_NAME
from prewarm.errors import FilesystemError, ManifestError
from prewarm.fsutil import os_error, require_directory, write_file_atomic
from prewarm.progress import NoProgress, Progress

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
    path = directory / MANIFEST_NAME
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise ManifestError(
            "no prewarm.manifest.json here", str(directory), hint=f"run `prewarm manifest {directory}` to create one"
        ) from None
    except OSError as exc:
        raise os_error(exc, path) from exc
    except ValueError as exc:
        raise ManifestError(f"not valid JSON: {exc}", str(path)) from None
    try:
        if doc["format"] != FORMAT or doc["version"] != VERSION or doc["hash"] != HASH:
            raise ManifestError(
                f"unsupported manifest {doc['format']!r} version {doc['version']!r} hash {doc['hash']!r}", str(path)
            )
        files = {name: FileDigest(int(e["size"]), str(e[HASH]), tuple(e["chunks"])) for name, e in doc["files"].items()}
        return Manifest(files, int(doc["chunk_size"]), doc.get("source", {}), doc.get("options", {}))
    except (KeyError, TypeError, AttributeError) as exc:
        raise ManifestError(f"malformed manifest ({exc!r} missing or wrong)", str(path)) from None


def write_manifest(directory: Path, manifest: Manifest) -> Path:
    path = directory / MANIFEST_NAME
    write_file_atomic(path, manifest.to_json())
    return path


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)))


def list_files(directory: Path) -> list[str]:
    """Relative paths of the files a manifest covers: all but hidden ones and the manifest."""
    found = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = Path(root).relative_to(directory)
        found += [(rel / f).as_posix() for f in files if not f.startswith(".")]
    return sorted(name for name in found if name != MANIFEST_NAME)


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


def read_file_range(path: Path, offset: int, length: int, consume: Callable[[memoryview], None]) -> int:
    """Read ``length`` bytes of ``path`` from ``offset`` front to back on a descriptor of its own,
    advised sequential: the kernel's readahead then ramps to its largest window and fills the page
    cache with large folios, which a later mmap load (safetensors, vLLM) reads back 2x faster than
    pages brought in by small interleaved reads (measured here)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_SEQUENTIAL)
        return read_range(fd, offset, length, thread_buffer(min(length, READ_BUFFER) or 1), consume)
    finally:
        os.close(fd)


READ_BUFFER = 16 * 2**20
_buffers = threading.local()


def thread_buffer(size: int) -> memoryview:
    """One reused read buffer per thread: memory stays flat however large the files are."""
    buf = getattr(_buffers, "buf", None)
    if buf is None or len(buf) < size:
        buf = _buffers.buf = memoryview(bytearray(size))
    return buf[:size]


def digest_file(path: Path, chunk_size: int = CHUNK_SIZE, progress: Progress | None = None) -> FileDigest:
    progress = progress or NoProgress()
    digester = Digester(chunk_size)

    def consume(view: memoryview) -> None:
        digester.update(view)
        progress.advance(len(view))

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise os_error(exc, path) from exc
    try:
        size = os.fstat(fd).st_size
        got = read_range(fd, 0, size, thread_buffer(chunk_size), consume)
    finally:
        os.close(fd)
    if got != size:
        raise FilesystemError(f"changed while being read: {got} of {size} bytes", str(path))
    return digester.finish()


def digest_files(
    directory: Path,
    names: Iterable[str],
    threads: int | None = None,
    progress: Progress | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> dict[str, FileDigest]:
    """Digest files in parallel, largest first, each read once front to back."""
    progress = progress or NoProgress()
    sizes = {name: (directory / name).stat().st_size for name in names}
    progress.start("hashing", sum(sizes.values()))
    order = sorted(sizes, key=lambda n: -sizes[n])
    with ThreadPoolExecutor(threads or default_threads()) as pool:
        digests = dict(zip(order, pool.map(lambda n: digest_file(directory / n, chunk_size, progress), order), strict=True))
    progress.finish()
    return {name: digests[name] for name in sorted(digests)}


def build_manifest(
    directory: Path, threads: int | None = None, progress: Progress | None = None, source: Mapping[str, Any] | None = None
) -> Manifest:
    """A manifest of ``directory`` as it is now (for a directory prewarm did not write)."""
    require_directory(directory)
    files = digest_files(directory, list_files(directory), threads, progress)
    return Manifest(files, CHUNK_SIZE, source or {"kind": "directory", "path": str(directory.resolve())})
