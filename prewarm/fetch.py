"""Fetch a model from the Hugging Face hub: pinned to a commit, resumable, checked, offline-ready.

Built on huggingface_hub's own pieces (``HfApi.model_info`` for the commit and each file's size
and hashes, ``hf_hub_url`` and ``http_get`` for the bytes, ``build_hf_headers`` for the token)
rather than ``snapshot_download``, because since v1.18 a failed download's partial file is
deleted: here a partial file is kept under ``.prewarm-partial/`` and the next run continues it
with an HTTP Range request. Each file is checked against the hub's size, LFS sha256 or git blob
id before it is renamed into place, and ``.prewarm-fetch.json`` records what was checked so a
second run re-hashes nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import hashlib
import importlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from prewarm.config import cache_root
from prewarm.errors import PrewarmError, UsageError
from prewarm.fsutil import check_free_space, fsync_path, os_error, write_file_atomic
from prewarm.progress import NoProgress, Progress

DEFAULT_INCLUDE = ("*.safetensors", "*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken", "tokenizer*", "*.py")
PICKLE_PATTERNS = ("*.bin", "*.pth", "*.pt", "*.ckpt", "*.pkl", "*.pickle")
RECORD_NAME = ".prewarm-fetch.json"
LOCK_NAME = ".prewarm-fetch.lock"
PARTIAL_DIR = ".prewarm-partial"
_COMMIT_LENGTH = 40
DOWNLOAD_THREADS = 4  # files at once, hashing as they arrive (snapshot_download uses 8 by default)
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
log = logging.getLogger(__name__)
_RESUME_HINT = "run the same command again: it resumes where it stopped"


@dataclass
class HubError(PrewarmError):
    """The hub said no, or could not be reached."""


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int
    sha256: str | None  # LFS files
    blob_id: str | None  # git blob sha1, for the others


@dataclass(frozen=True)
class FetchResult:
    repo_id: str
    revision: str
    commit: str
    directory: Path
    files: tuple[RemoteFile, ...]
    downloaded: tuple[str, ...]
    bytes_downloaded: int
    offline_reason: str | None  # set when the hub was not asked: why, and the files are what was fetched before
    seconds: float
    skipped_pickles: tuple[str, ...] = field(default=())

    def source_info(self) -> dict[str, Any]:
        """The manifest's ``source`` for a serving directory built from this fetch."""
        return {
            "kind": "hub",
            "repo_id": self.repo_id,
            "revision": self.revision,
            "commit": self.commit,
            "files": {f.name: {"size": f.size, "sha256": f.sha256, "blob_id": f.blob_id} for f in self.files},
        }


def default_destination(repo_id: str, commit: str) -> Path:
    return cache_root() / "hub" / repo_id.replace("/", "--") / commit


def select_files(names: Sequence[str], include: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """(wanted, pickles left out): ``include`` globs, or the default set that never takes pickles."""
    patterns = tuple(include) if include else DEFAULT_INCLUDE
    wanted = [n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)]
    pickles = [n for n in names if any(fnmatch.fnmatch(n, p) for p in PICKLE_PATTERNS) and n not in wanted]
    return sorted(wanted), sorted(pickles)


def fetch(
    repo_id: str,
    revision: str = "main",
    destination: Path | None = None,
    include: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> FetchResult:
    """Make ``destination`` hold the repo's files at ``revision``, downloading only what is missing."""
    from huggingface_hub import constants

    started = time.perf_counter()
    progress = progress or NoProgress()
    if not REPO_ID.fullmatch(repo_id):
        raise UsageError(f"{repo_id!r} is not a hub repository id", hint="write it as owner/name, e.g. Qwen/Qwen2.5-7B-Instruct")
    local = _local_snapshot(repo_id, revision, destination)
    if local is not None and len(revision) == _COMMIT_LENGTH and _intact(local):
        return _result(local, started, None)  # a pinned commit already here: no network at all
    if constants.HF_HUB_OFFLINE:
        return _offline(repo_id, revision, local, started, "HF_HUB_OFFLINE is set")
    try:
        commit, remote = _remote_files(repo_id, revision)
    except _Unreachable as exc:
        return _offline(repo_id, revision, local, started, str(exc))
    wanted, pickles = select_files([f.name for f in remote], include)
    files = tuple(f for f in remote if f.name in wanted)
    if not files:
        raise HubError(
            f"none of the {len(remote)} files of {repo_id} at {revision!r} matches {', '.join(include or DEFAULT_INCLUDE)}",
            hint="name the files to fetch with --include GLOB",
        )
    directory = destination or default_destination(repo_id, commit)
    with _exclusive(directory):
        downloaded, nbytes = _download_missing(repo_id, commit, directory, files, progress)
        record = {
            "repo_id": repo_id,
            "revision": revision,
            "commit": commit,
            "fetched_at": time.time(),
            "files": {f.name: _file_record(directory / f.name, f) for f in files},
        }
        write_file_atomic(directory / RECORD_NAME, (json.dumps(record, indent=1) + "\n").encode())
    return FetchResult(
        repo_id,
        revision,
        commit,
        directory,
        files,
        tuple(downloaded),
        nbytes,
        None,
        time.perf_counter() - started,
        tuple(pickles),
    )


class _Unreachable(Exception):
    """The hub could not be reached (connection refused, DNS, timeout)."""


def _transport_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (
        ("httpx2", "TransportError"),
        ("httpx", "TransportError"),
        ("requests", "ConnectionError"),
        ("requests", "Timeout"),
    ):
        with contextlib.suppress(ImportError, AttributeError):  # whichever HTTP client this hub version uses
            errors.append(getattr(importlib.import_module(module), name))
    return tuple(errors)


def _remote_files(repo_id: str, revision: str) -> tuple[str, list[RemoteFile]]:
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = constants.ENDPOINT
    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    except GatedRepoError:
        raise HubError(
            f"{repo_id} is gated: you have not been granted access",
            hint="accept its terms on the hub, then set HF_TOKEN to a token of that account",
        ) from None
    except RevisionNotFoundError:
        raise HubError(
            f"revision {revision!r} not found in {repo_id}", hint="give a branch, tag or full commit hash that exists"
        ) from None
    except RepositoryNotFoundError:
        raise HubError(
            f"repository {repo_id} not found on {endpoint}", hint="check the name; if it is private, set HF_TOKEN"
        ) from None
    except OfflineModeIsEnabled as exc:
        raise _Unreachable("HF_HUB_OFFLINE is set") from exc
    except _transport_errors() as exc:
        raise _Unreachable(f"cannot reach {endpoint}: {type(exc).__name__}") from exc
    except HfHubHTTPError as exc:
        raise HubError(f"the hub answered {exc.response.status_code} for {repo_id}") from None
    unsafe = [s.rfilename for s in info.siblings or [] if not _safe_name(s.rfilename)]
    if unsafe:
        raise HubError(f"{repo_id} lists a file name that would land outside the destination: {unsafe[0]!r}")
    files = [
        RemoteFile(s.rfilename, int(s.size or 0), s.lfs.sha256 if s.lfs else None, None if s.lfs else s.blob_id)
        for s in info.siblings or []
    ]
    if not info.sha:
        raise HubError(f"the hub did not say which commit {revision!r} of {repo_id} is")
    return info.sha, files


@contextlib.contextmanager
def _exclusive(directory: Path) -> Iterator[None]:
    """One fetch at a time per directory (flock(2)): two would append to the same partial files."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise os_error(exc, directory) from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("another prewarm fetch is writing %s; waiting for it", directory)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _safe_name(name: str) -> bool:
    parts = name.split("/")
    return bool(name) and not name.startswith("/") and all(p not in ("", ".", "..") for p in parts)


def _download_missing(
    repo_id: str, commit: str, directory: Path, files: Sequence[RemoteFile], progress: Progress
) -> tuple[list[str], int]:
    try:
        (directory / PARTIAL_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise os_error(exc, directory) from exc
    known = _read_record(directory)
    todo = [f for f in files if not _already_have(directory, f, known)]
    partial_sizes = {f.name: _size(directory / PARTIAL_DIR / _partial_name(f.name)) for f in todo}
    remaining = sum(f.size - min(partial_sizes[f.name], f.size) for f in todo)
    check_free_space(directory, remaining)
    progress.start("downloading", remaining)
    with ThreadPoolExecutor(DOWNLOAD_THREADS, thread_name_prefix="prewarm-fetch") as pool:
        list(pool.map(lambda f: _download_one(repo_id, commit, directory, f, progress), todo))
    progress.finish()
    with contextlib.suppress(OSError):  # left in place while it holds a partial download
        (directory / PARTIAL_DIR).rmdir()
    return [f.name for f in todo], remaining


def _partial_name(name: str) -> str:
    return name.replace("/", "%2F") + ".part"


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _already_have(directory: Path, remote: RemoteFile, known: dict[str, Any]) -> bool:
    """True when the file is here and matches the hub: by the record (cheap) or by hashing it."""
    entry = known.get(remote.name)
    if (
        entry is not None
        and (entry.get("sha256"), entry.get("blob_id")) == (remote.sha256, remote.blob_id)
        and _intact_file(directory, remote.name, entry)
    ):
        return True
    path = directory / remote.name
    return path.is_file() and _matches(path, remote) is None


def _download_one(repo_id: str, commit: str, directory: Path, remote: RemoteFile, progress: Progress) -> None:
    from huggingface_hub import hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]

    partial = directory / PARTIAL_DIR / _partial_name(remote.name)
    resume = min(_size(partial), remote.size)
    progress.advance(0)
    url = hf_hub_url(repo_id, remote.name, revision=commit)
    try:
        with open(partial, "ab+") as raw:
            raw.truncate(resume)
            out = _HashingFile(raw, remote)
            http_get(
                url,
                out,  # type: ignore[arg-type]
                resume_size=resume,
                headers=build_hf_headers(),
                expected_size=remote.size,
                displayed_filename=remote.name,
                tqdm_class=_forwarding_bar(progress),
            )
            raw.flush()
            os.fsync(raw.fileno())
            problem = out.mismatch()
    except _transport_errors() as exc:
        raise HubError(
            f"download of {remote.name} was cut off ({type(exc).__name__}) after {_size(partial)} of {remote.size} bytes",
            hint=_RESUME_HINT,
        ) from None
    except HfHubHTTPError as exc:
        raise HubError(
            f"download of {remote.name} failed: the hub answered {exc.response.status_code}", hint=_RESUME_HINT
        ) from None
    except OSError as exc:
        if exc.errno is None:  # http_get's own check: the server sent fewer bytes than it announced
            raise HubError(
                f"download of {remote.name} ended early at {_size(partial)} of {remote.size} bytes", hint=_RESUME_HINT
            ) from None
        raise os_error(exc, partial) from exc
    if problem is not None:
        partial.unlink()
        raise HubError(
            f"{remote.name}: {problem}; the bad download was deleted",
            hint="run again to download it afresh; if it keeps failing, the hub copy or a proxy is at fault",
        )
    target = directory / remote.name
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, target)
    fsync_path(target.parent)


def _forwarding_bar(progress: Progress) -> type:
    """A tqdm class for http_get that shows nothing itself and forwards bytes to ``progress``."""
    from tqdm.auto import tqdm

    class Forward(tqdm):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            progress.advance(int(n or 0))
            return None

    return Forward


class _Digest:
    """What the hub says a file hashes to: LFS sha256, else the git blob id (sha1 of a header
    and the bytes), else nothing to check but the size."""

    def __init__(self, remote: RemoteFile) -> None:
        self.remote = remote
        self.expected: str | None
        self.hasher: Any
        if remote.sha256:
            self.kind, self.expected, self.hasher = "sha256", remote.sha256, hashlib.sha256()
        elif remote.blob_id:
            self.kind, self.expected = "git blob id", remote.blob_id
            self.hasher = hashlib.sha1(f"blob {remote.size}\0".encode(), usedforsecurity=False)
        else:
            self.kind, self.expected, self.hasher = "", None, None
        self.size = 0

    def update(self, data: bytes) -> None:
        if self.hasher is not None:
            self.hasher.update(data)
        self.size += len(data)

    def mismatch(self) -> str | None:
        """None if what was fed is what the hub says; otherwise what differs."""
        if self.size != self.remote.size:
            return f"{self.size} bytes, the hub says {self.remote.size}"
        if self.hasher is None or self.hasher.hexdigest() == self.expected:
            return None
        return f"{self.kind} {self.hasher.hexdigest()} does not match the hub's {self.expected}"


def _matches(path: Path, remote: RemoteFile) -> str | None:
    """None if the file at ``path`` is what the hub says; otherwise what differs."""
    if _size(path) != remote.size:
        return f"{_size(path)} bytes, the hub says {remote.size}"
    digest = _Digest(remote)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(16 * 2**20), b""):
            digest.update(block)
    return digest.mismatch()


class _HashingFile:
    """The partial file as http_get writes it: each byte also goes into the hub's hash, so the
    check costs no second read. Bytes already there from an earlier run are hashed first."""

    def __init__(self, raw: BinaryIO, remote: RemoteFile) -> None:
        self.raw, self.remote = raw, remote
        self._rehash()

    def _rehash(self) -> None:
        self.digest = _Digest(self.remote)
        self.raw.seek(0)
        for block in iter(lambda: self.raw.read(16 * 2**20), b""):
            self.digest.update(block)

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.raw.write(data)

    def truncate(self, size: int | None = None) -> int:  # http_get: the server ignored our Range
        result = self.raw.truncate(size)
        self._rehash()
        return result

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def flush(self) -> None:
        self.raw.flush()

    def mismatch(self) -> str | None:
        return self.digest.mismatch()


def _file_record(path: Path, remote: RemoteFile) -> dict[str, Any]:
    stat = path.stat()
    return {
        "size": remote.size,
        "sha256": remote.sha256,
        "blob_id": remote.blob_id,
        "mtime_ns": stat.st_mtime_ns,
        "inode": stat.st_ino,
    }


def _read_record(directory: Path) -> dict[str, Any]:
    try:
        files = json.loads((directory / RECORD_NAME).read_bytes()).get("files", {})
        return files if isinstance(files, dict) else {}
    except (OSError, ValueError, AttributeError):
        return {}


def _local_snapshot(repo_id: str, revision: str, destination: Path | None) -> Path | None:
    """The directory holding a finished fetch of ``revision`` (branch, tag or commit), if any."""
    candidates = (
        [destination]
        if destination
        else sorted((cache_root() / "hub" / repo_id.replace("/", "--")).glob("*"), key=_fetched_at, reverse=True)
    )
    for directory in candidates:
        try:
            record = json.loads((directory / RECORD_NAME).read_bytes())
        except (OSError, ValueError):
            continue
        if record.get("repo_id") == repo_id and (
            record.get("revision") == revision or str(record.get("commit", "")).startswith(revision)
        ):
            return directory
    return None


def _fetched_at(directory: Path) -> float:
    try:
        return float(json.loads((directory / RECORD_NAME).read_bytes()).get("fetched_at", 0))
    except (OSError, ValueError):
        return 0.0


def _intact(directory: Path) -> bool:
    record: dict[str, Any] = json.loads((directory / RECORD_NAME).read_bytes())
    return all(_intact_file(directory, name, entry) for name, entry in record["files"].items())


def _intact_file(directory: Path, name: str, entry: dict[str, Any]) -> bool:
    try:
        stat = (directory / name).stat()
    except OSError:
        return False
    return bool(stat.st_size == entry["size"] and stat.st_mtime_ns == entry["mtime_ns"] and stat.st_ino == entry["inode"])


def _result(directory: Path, started: float, offline_reason: str | None) -> FetchResult:
    record = json.loads((directory / RECORD_NAME).read_bytes())
    files = tuple(RemoteFile(name, e["size"], e.get("sha256"), e.get("blob_id")) for name, e in sorted(record["files"].items()))
    return FetchResult(
        record["repo_id"],
        record["revision"],
        record["commit"],
        directory,
        files,
        (),
        0,
        offline_reason,
        time.perf_counter() - started,
    )


def _offline(repo_id: str, revision: str, local: Path | None, started: float, why: str) -> FetchResult:
    if local is None:
        raise HubError(
            f"{why}, and {repo_id} at {revision!r} has not been fetched here before",
            hint="connect to the hub (or unset HF_HUB_OFFLINE) and fetch it once",
        )
    record = json.loads((local / RECORD_NAME).read_bytes())
    missing = sorted(n for n, e in record["files"].items() if not _intact_file(local, n, e))
    if missing:
        raise HubError(
            f"{why}, and {len(missing)} files of {repo_id} are missing or changed in {local}: {', '.join(missing[:5])}",
            hint="reconnect and fetch again to restore them",
        )
    return _result(local, started, why)
