"""``.prewarm-fetch.json``: what a fetch checked, so that the next run re-hashes nothing.

It holds the commit and, for each file, the hub's size and hashes and the stat (size, mtime,
inode) the file had once it matched them: a file whose stat is unchanged needs no second hash.
The record lies in a directory others may write, so one that is damaged, hostile (naming files
outside DIR or prewarm's own) or not a regular file of ours or root's is ignored with a warning;
a bad record only costs a re-check of the files.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import stat
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from prewarm.config import cache_root
from prewarm.fetch_hub import RemoteFile
from prewarm.fetch_place import is_reserved, name_problem, open_existing, trusted
from prewarm.fsutil import write_file_atomic

RECORD_NAME = ".prewarm-fetch.json"
_COMMIT = re.compile(r"[0-9a-f]{40}")
_MAX_RECORD_BYTES = 64 * 2**20
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Entry:
    size: int
    mtime_ns: int
    inode: int
    sha256: str | None
    blob_id: str | None


@dataclass(frozen=True)
class Record:
    repo_id: str
    revision: str
    commit: str
    fetched_at: float
    files: dict[str, Entry]


class _Damaged(Exception):
    """Why a fetch record cannot be used, in a few words."""


def _file_record(st: os.stat_result, remote: RemoteFile) -> dict[str, Any]:
    return {
        "size": remote.size,
        "sha256": remote.sha256,
        "blob_id": remote.blob_id,
        "mtime_ns": st.st_mtime_ns,
        "inode": st.st_ino,
    }


def write_record(
    directory: Path, repo_id: str, revision: str, commit: str, files: Sequence[RemoteFile], stats: Mapping[str, os.stat_result]
) -> None:
    """Record ``files`` as checked, each with the stat it had then (``stats``), in one atomic write."""
    record = {
        "repo_id": repo_id,
        "revision": revision,
        "commit": commit,
        "fetched_at": time.time(),
        "files": {f.name: _file_record(stats[f.name], f) for f in files},
    }
    write_file_atomic(directory / RECORD_NAME, (json.dumps(record, indent=1) + "\n").encode())


def load_record(directory: Path, warn: bool = True) -> Record | None:
    """The fetch record in ``directory``, or None when there is none or it cannot be used (damaged,
    hostile, or not ours: then with a warning). A bad record only costs a re-check of the files."""
    path = directory / RECORD_NAME
    try:
        return _parse_record(_read_record(path))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        why = "a symlink" if exc.errno == errno.ELOOP else exc.strerror or str(exc)
    except _Damaged as exc:
        why = str(exc)
    if warn:
        log.warning("%s: ignoring a damaged fetch record (%s)", path, why)
    return None


def _read_record(path: Path) -> bytes:
    # O_NOFOLLOW: a symlink planted at the name fails (ELOOP); O_NONBLOCK: a FIFO cannot block the open
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not trusted(st):
            raise _Damaged("not a regular file" if not stat.S_ISREG(st.st_mode) else f"owned by uid {st.st_uid}")
        chunks: list[bytes] = []
        while (chunk := os.read(fd, 2**20)) and sum(map(len, chunks)) <= _MAX_RECORD_BYTES:
            chunks.append(chunk)
    finally:
        os.close(fd)
    if sum(map(len, chunks)) > _MAX_RECORD_BYTES:
        raise _Damaged(f"larger than {_MAX_RECORD_BYTES} bytes")
    return b"".join(chunks)


def _parse_record(raw: bytes) -> Record:
    try:
        data = json.loads(raw)
    except RecursionError:
        raise _Damaged("nested too deeply") from None
    except ValueError:
        raise _Damaged("not JSON") from None
    if not isinstance(data, dict):
        raise _Damaged("not a JSON object")
    repo_id, revision, commit = (data.get(key) for key in ("repo_id", "revision", "commit"))
    if not (_is_text(repo_id) and _is_text(revision) and isinstance(commit, str) and _COMMIT.fullmatch(commit)):
        raise _Damaged("repo_id, revision or commit is missing or wrong")
    files = data.get("files")
    if not isinstance(files, dict) or not files:
        raise _Damaged("'files' is not an object naming files")
    entries = {name: _parse_entry(name, entry) for name, entry in files.items()}
    return Record(repo_id, revision, commit, _finite(data.get("fetched_at")), entries)


def _parse_entry(name: str, entry: object) -> Entry:
    reason = name_problem(name) or ("one of prewarm's own names" if is_reserved(name) else None)
    if reason is not None:
        raise _Damaged(f"file {name!r}: {reason}")
    if not isinstance(entry, dict):
        raise _Damaged(f"file {name!r}: not an object")
    try:
        size, mtime_ns, inode = (_count(entry[key]) for key in ("size", "mtime_ns", "inode"))
        return Entry(size, mtime_ns, inode, _hex(entry["sha256"]), _hex(entry["blob_id"]))
    except (KeyError, TypeError):
        raise _Damaged(f"file {name!r}: size, mtime_ns, inode, sha256 or blob_id is missing or wrong") from None


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TypeError
    return value


def _hex(value: object) -> str | None:
    if value is None or (isinstance(value, str) and re.fullmatch(r"[0-9a-f]{1,128}", value)):
        return value
    raise TypeError


def _is_text(value: object) -> TypeGuard[str]:
    if not isinstance(value, str):
        return False
    try:
        value.encode()
    except UnicodeEncodeError:  # a lone surrogate: not text that can be printed
        return False
    return True


def _finite(value: object) -> float:
    try:
        number = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan
    except OverflowError:
        number = math.nan
    if not math.isfinite(number):
        raise _Damaged("'fetched_at' is not a time")
    return number


def local_snapshot(repo_id: str, revision: str, destination: Path | None) -> tuple[Path, Record] | None:
    """The newest directory holding a finished fetch of ``revision`` (branch, tag or commit), if any."""
    candidates = [destination] if destination else sorted((cache_root() / "hub" / repo_id.replace("/", "--")).glob("*"))
    found = []
    for directory in candidates:
        record = load_record(directory)
        if record and record.repo_id == repo_id and (record.revision == revision or record.commit.startswith(revision)):
            found.append((directory, record))
    return max(found, key=lambda f: f[1].fetched_at, default=None)


def same(st: os.stat_result, entry: Entry) -> bool:
    return (st.st_size, st.st_mtime_ns, st.st_ino) == (entry.size, entry.mtime_ns, entry.inode)


def changed(directory: Path, record: Record) -> list[str]:
    """The record's files that are missing, changed, or no longer regular files we trust."""
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return sorted(record.files)
    try:
        return sorted(name for name, entry in record.files.items() if not _intact_file(dfd, name, entry))
    finally:
        os.close(dfd)


def _intact_file(dfd: int, name: str, entry: Entry) -> bool:
    fd = open_existing(dfd, name)
    if fd is None:
        return False
    try:
        return same(os.fstat(fd), entry)
    finally:
        os.close(fd)
