"""Check a directory against its manifest: every chunk of every file, hashed in parallel."""

from __future__ import annotations

import contextlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import xxhash

from prewarm.checkpoint import MANIFEST_NAME
from prewarm.errors import FilesystemError, ManifestError
from prewarm.fsutil import require_directory, write_file_atomic
from prewarm.manifest import Manifest, default_threads, list_files, read_file_range, read_manifest
from prewarm.progress import NoProgress, Progress


@dataclass(frozen=True)
class Problem:
    """``kind`` is missing, extra, size, corrupt or unreadable; offset/length locate corruption."""

    file: str
    kind: str
    offset: int | None = None
    length: int | None = None
    detail: str = ""


@dataclass(frozen=True)
class VerifyReport:
    directory: Path
    problems: tuple[Problem, ...]
    files: int
    bytes_checked: int
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.problems


READ_GROUP = 64  # chunks per task: 1 GiB read front to back, as warm's segments


@dataclass(frozen=True)
class _Chunk:
    file: str
    path: Path
    offset: int
    length: int
    expected: str


def verify_directory(directory: Path, threads: int | None = None, progress: Progress | None = None) -> VerifyReport:
    """Hash every byte ``directory``'s manifest covers, once, on ``threads`` threads."""
    started = time.perf_counter()
    require_directory(directory)
    manifest = read_manifest(directory)
    problems = [Problem(name, "extra") for name in list_files(directory) if name not in manifest.files]
    chunks = _plan_chunks(directory, manifest, problems)
    problems += _check_chunks(chunks, threads or default_threads(), progress or NoProgress())
    order = {name: i for i, name in enumerate(sorted(set(manifest.files) | {p.file for p in problems}))}
    problems.sort(key=lambda p: (order[p.file], p.offset or 0))
    return VerifyReport(
        directory, tuple(problems), len(manifest.files), sum(c.length for c in chunks), time.perf_counter() - started
    )


def _plan_chunks(directory: Path, manifest: Manifest, problems: list[Problem]) -> list[_Chunk]:
    """The chunks to hash; files that are missing, unreadable or resized become problems now."""
    chunks = []
    for name, digest in sorted(manifest.files.items()):
        expected_chunks = -(-digest.size // manifest.chunk_size)
        if len(digest.chunks) != expected_chunks:
            raise ManifestError(f"{name} has {len(digest.chunks)} chunk digests, {expected_chunks} expected", str(directory))
        try:
            fd = os.open(directory / name, os.O_RDONLY)  # opened, not just stat'ed: unreadable shows here
        except FileNotFoundError:
            problems.append(Problem(name, "missing"))
            continue
        except OSError as exc:
            problems.append(Problem(name, "unreadable", detail=exc.strerror or str(exc)))
            continue
        try:
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if size != digest.size:
            problems.append(Problem(name, "size", detail=f"{size} bytes, manifest says {digest.size}"))
            continue
        for i, expected in enumerate(digest.chunks):
            offset = i * manifest.chunk_size
            chunks.append(_Chunk(name, directory / name, offset, min(manifest.chunk_size, size - offset), expected))
    return chunks


def _check_chunks(chunks: list[_Chunk], threads: int, progress: Progress) -> list[Problem]:
    progress.start("verifying", sum(c.length for c in chunks))

    def check(group: list[_Chunk]) -> list[Problem]:
        problems = []
        for chunk, (got, digest) in zip(group, _hash_group(group, progress), strict=True):
            if got != chunk.length:
                problems.append(Problem(chunk.file, "size", detail="file shrank while being verified"))
            elif digest != chunk.expected:
                problems.append(Problem(chunk.file, "corrupt", chunk.offset, chunk.length))
        return problems

    with ThreadPoolExecutor(threads) as pool:
        results = [p for problems in pool.map(check, _groups(chunks)) for p in problems]
    progress.finish()
    return _merge_adjacent(results)


def _groups(chunks: list[_Chunk]) -> list[list[_Chunk]]:
    """Consecutive chunks of one file, READ_GROUP at a time: each thread reads a long run front to
    back, as warm does (see read_file_range)."""
    groups: list[list[_Chunk]] = []
    for chunk in chunks:
        last = groups[-1] if groups else None
        if last and len(last) < READ_GROUP and last[-1].path == chunk.path and last[-1].offset + last[-1].length == chunk.offset:
            last.append(chunk)
        else:
            groups.append([chunk])
    return groups


def _hash_group(group: list[_Chunk], progress: Progress) -> list[tuple[int, str]]:
    """(bytes read, xxh3-128) per chunk of a run, read in one sequential pass."""
    start, end = group[0].offset, group[-1].offset + group[-1].length
    hashers = [xxhash.xxh3_128() for _ in group]
    done = [0] * len(group)
    index = 0

    def consume(view: memoryview) -> None:
        nonlocal index
        progress.advance(len(view))
        while view:
            take = min(len(view), group[index].length - done[index])
            hashers[index].update(view[:take])
            done[index] += take
            view = view[take:]
            if done[index] == group[index].length and index + 1 < len(group):
                index += 1

    with contextlib.suppress(OSError):  # the file vanished or became unreadable meanwhile: chunks come out short
        read_file_range(group[0].path, start, end - start, consume)
    return [(n, h.hexdigest()) for n, h in zip(done, hashers, strict=True)]


def _merge_adjacent(problems: list[Problem]) -> list[Problem]:
    """One problem per run of consecutive bad chunks in a file, not one per chunk."""
    merged: list[Problem] = []
    for p in problems:
        last = merged[-1] if merged else None
        if (
            last
            and p.kind == last.kind == "corrupt"
            and p.file == last.file
            and last.offset is not None
            and last.length is not None
            and last.offset + last.length == p.offset
        ):
            merged[-1] = Problem(p.file, "corrupt", last.offset, last.length + (p.length or 0))
        elif not (last and p.kind == last.kind == "size" and p.file == last.file):
            merged.append(p)
    return merged


RECORD_NAME = ".prewarm-verified.json"  # hidden: manifests and verify ignore it


@dataclass(frozen=True)
class VerificationRecord:
    verified_at: float  # seconds since the epoch
    ok: bool
    problems: int
    manifest_changed: bool  # the manifest is not the one that was verified


def record_verification(report: VerifyReport) -> bool:
    """Note the result beside the manifest, for `prewarm status`; False if DIR is not writable."""
    doc = {
        "verified_at": time.time(),
        "ok": report.ok,
        "problems": len(report.problems),
        "manifest": _manifest_identity(report.directory),
    }
    try:
        write_file_atomic(report.directory / RECORD_NAME, (json.dumps(doc) + "\n").encode())
    except FilesystemError:
        return False
    return True


def last_verification(directory: Path) -> VerificationRecord | None:
    try:
        doc = json.loads((directory / RECORD_NAME).read_bytes())
        return VerificationRecord(
            float(doc["verified_at"]),
            bool(doc["ok"]),
            int(doc["problems"]),
            doc["manifest"] != _manifest_identity(directory),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _manifest_identity(directory: Path) -> list[int] | None:
    """(size, mtime, inode) of the manifest: a rewrite changes it, and stat leaves the page cache
    alone, so `prewarm status` does not change what it measures."""
    try:
        stat = (directory / MANIFEST_NAME).stat()
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino]
