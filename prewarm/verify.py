"""Check a directory against its manifest: every chunk of every file, hashed in parallel."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

from prewarm.checkpoint import MANIFEST_NAME, identity_of
from prewarm.confine import NotRegular, Root, open_regular, parse_json, read_small_file, root_of
from prewarm.errors import FilesystemError
from prewarm.fsutil import write_file_atomic
from prewarm.manifest import Manifest, default_threads, list_files, parallel_map, read_file_range, read_manifest
from prewarm.pagecache import cached_pages
from prewarm.progress import NoProgress, Progress


@dataclass(frozen=True)
class Problem:
    """``kind`` is missing, extra, size, corrupt, unreadable or refused (a FIFO, socket, device or a
    symlink leading outside the directory, which verify does not open); offset/length locate
    corruption."""

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
    identities: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # each file as it was opened to be hashed

    @property
    def ok(self) -> bool:
        return not self.problems


READ_GROUP = 64  # chunks per task: 1 GiB read front to back, as warm's segments


@dataclass(frozen=True)
class _Chunk:
    file: str
    root: Root
    offset: int
    length: int
    expected: str


def verify_directory(directory: Path, threads: int | None = None, progress: Progress | None = None) -> VerifyReport:
    """Hash every byte ``directory``'s manifest covers, once, on ``threads`` threads."""
    started = time.perf_counter()
    root = root_of(directory)
    manifest = read_manifest(directory)
    listing = list_files(root)
    problems = [Problem(name, "extra") for name in listing.files if name not in manifest.files]
    problems += [Problem(s.name, "extra", detail=s.reason) for s in listing.skipped if s.name not in manifest.files]
    identities: dict[str, tuple[int, ...]] = {}
    chunks = _plan_chunks(root, manifest, problems, identities)
    problems += _check_chunks(chunks, threads or default_threads(), progress or NoProgress())
    order = {name: i for i, name in enumerate(sorted(set(manifest.files) | {p.file for p in problems}))}
    problems.sort(key=lambda p: (order[p.file], p.offset or 0))
    return VerifyReport(
        directory,
        tuple(problems),
        len(manifest.files),
        sum(c.length for c in chunks),
        time.perf_counter() - started,
        identities,
    )


def _plan_chunks(root: Root, manifest: Manifest, problems: list[Problem], identities: dict[str, tuple[int, ...]]) -> list[_Chunk]:
    """The chunks to hash; files that are missing, refused, unreadable or resized become problems now."""
    chunks = []
    for name, digest in sorted(manifest.files.items()):
        try:
            fd = open_regular(root, name)  # opened, not just stat'ed: unreadable shows here
        except FileNotFoundError:
            problems.append(Problem(name, "missing"))
            continue
        except NotRegular as why:
            problems.append(Problem(name, "refused", detail=why.reason))
            continue
        except OSError as exc:
            problems.append(Problem(name, "unreadable", detail=exc.strerror or str(exc)))
            continue
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        size = st.st_size
        identities[name] = identity_of(st)  # a later write changes ctime, which no one can set back
        if size != digest.size:
            problems.append(Problem(name, "size", detail=f"{size} bytes, manifest says {digest.size}"))
            continue
        for i, expected in enumerate(digest.chunks):
            offset = i * manifest.chunk_size
            chunks.append(_Chunk(name, root, offset, min(manifest.chunk_size, size - offset), expected))
    return chunks


def _check_chunks(chunks: list[_Chunk], threads: int, progress: Progress) -> list[Problem]:
    progress.start("verifying", sum(c.length for c in chunks))

    def check(group: list[_Chunk], progress: Progress) -> list[Problem]:
        problems = []
        for chunk, (got, digest) in zip(group, _hash_group(group, progress), strict=True):
            if got != chunk.length:
                problems.append(Problem(chunk.file, "size", detail="file shrank while being verified"))
            elif digest != chunk.expected:
                problems.append(Problem(chunk.file, "corrupt", chunk.offset, chunk.length))
        return problems

    results = [p for problems in parallel_map(check, _groups(chunks), threads, progress) for p in problems]
    progress.finish()
    return _merge_adjacent(results)


def _groups(chunks: list[_Chunk]) -> list[list[_Chunk]]:
    """Consecutive chunks of one file, READ_GROUP at a time: each thread reads a long run front to
    back, as warm does (see read_file_range)."""
    groups: list[list[_Chunk]] = []
    for chunk in chunks:
        last = groups[-1] if groups else None
        if last and len(last) < READ_GROUP and last[-1].file == chunk.file and last[-1].offset + last[-1].length == chunk.offset:
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

    with contextlib.suppress(OSError, NotRegular):  # the file vanished or was replaced meanwhile: chunks come out short
        fd = open_regular(group[0].root, group[0].file)
        try:
            read_file_range(fd, start, end - start, consume)
        finally:
            os.close(fd)
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
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VerificationRecord:
    verified_at: float  # seconds since the epoch
    ok: bool
    problems: int
    manifest_changed: bool  # the manifest's bytes are not the ones that were verified
    identities: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # see checkpoint.identity_of


def record_verification(report: VerifyReport) -> None:
    """Note the result beside the manifest, for `prewarm status`. Raises FilesystemError when DIR
    cannot take it (read-only): the caller reports the check first and this as a warning."""
    doc = {
        "verified_at": time.time(),
        "ok": report.ok,
        "problems": len(report.problems),
        "manifest_xxh3_128": _manifest_digest(report.directory),
        "files": {name: list(identity) for name, identity in report.identities.items()},
    }
    write_file_atomic(report.directory / RECORD_NAME, (json.dumps(doc) + "\n").encode(), 0o644)


def last_verification(directory: Path) -> VerificationRecord | None:
    """The last record, or None when there is none; a damaged one is treated as absent, with a warning."""
    try:
        doc = parse_json(read_small_file(root_of(directory), RECORD_NAME, 1 << 20))
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        at, ok, problems = doc.get("verified_at"), doc.get("ok"), doc.get("problems")
        if not (isinstance(at, int | float) and not isinstance(at, bool) and 0 <= at < 2**33):  # NaN fails too
            raise ValueError(f"verified_at {at!r} is not a time")
        if not isinstance(ok, bool) or not (isinstance(problems, int) and not isinstance(problems, bool) and problems >= 0):
            raise ValueError("ok must be true or false and problems a count")
        changed = doc.get("manifest_xxh3_128") != _manifest_digest(directory)
        return VerificationRecord(float(at), ok, problems, changed, _identities(doc.get("files")))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, OverflowError, NotRegular) as exc:
        log.warning("%s: ignoring a damaged verification record (%s)", directory / RECORD_NAME, exc)
        return None


def _identities(files: object) -> dict[str, tuple[int, ...]]:
    """The record's file identities; anything malformed is left out (and so never trusted)."""
    if not isinstance(files, dict):
        return {}
    return {
        name: tuple(value)
        for name, value in files.items()
        if isinstance(value, list) and len(value) == 5 and all(type(v) is int for v in value)
    }


def _manifest_digest(directory: Path) -> str | None:
    """xxh3-128 of the manifest's bytes: a copy (`cp -a`, rsync) is the same manifest, a rewrite
    is not. Read after residency is measured, so `prewarm status` does not change what it shows."""
    try:
        fd = open_regular(root_of(directory), MANIFEST_NAME)
    except (OSError, NotRegular, FilesystemError):
        return None
    try:
        was_cached = cached_pages(fd)
        digest = xxhash.xxh3_128()
        while chunk := os.read(fd, 2**20):
            digest.update(chunk)
        if was_cached == 0:  # looking must not warm: `prewarm status` reports this file's residency
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return digest.hexdigest()
    except OSError:
        return None
    finally:
        os.close(fd)
