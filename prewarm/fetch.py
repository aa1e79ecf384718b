"""Fetch a model from the Hugging Face hub: pinned to a commit, resumable, checked, offline-ready.

Built on huggingface_hub's own pieces (``HfApi.model_info`` for the commit and each file's size
and hashes, ``hf_hub_url`` and ``http_get`` for the bytes, ``build_hf_headers`` for the token)
rather than ``snapshot_download``, because since v1.18 a failed download's partial file is
deleted: here a partial file is kept under ``.prewarm-partial/`` and the next run continues it
with an HTTP Range request. Each file is checked against the hub's size, LFS sha256 or git blob
id before it is renamed into place, and ``.prewarm-fetch.json`` records what was checked so a
second run re-hashes nothing.

The destination may be writable by someone else, so nothing here follows a symlink found in it:
names below it are opened from a descriptor of it with O_NOFOLLOW at every step, the partial
directory and the lock must be our own, and a record that is damaged or not ours is ignored.
Names a repo lists for prewarm's own files (the manifest ``verify`` trusts, ``.prewarm*``) are
never taken from it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import hashlib
import importlib
import json
import logging
import math
import os
import queue
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

from prewarm.checkpoint import MANIFEST_NAME
from prewarm.config import cache_root
from prewarm.confine import unsafe_name_reason
from prewarm.errors import FilesystemError, PrewarmError, UsageError
from prewarm.fsutil import check_free_space, is_regular_owned, os_error, write_file_atomic
from prewarm.progress import NoProgress, Progress

DEFAULT_INCLUDE = ("*.safetensors", "*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken", "tokenizer*", "*.py")
PICKLE_PATTERNS = ("*.bin", "*.pth", "*.pt", "*.ckpt", "*.pkl", "*.pickle")
RECORD_NAME = ".prewarm-fetch.json"
LOCK_NAME = ".prewarm-fetch.lock"
PARTIAL_DIR = ".prewarm-partial"
_COMMIT = re.compile(r"[0-9a-f]{40}")
_COMMIT_LENGTH = 40
_MAX_RECORD_BYTES = 64 * 2**20
_BLOCK = 16 * 2**20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
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
    skipped_reserved: tuple[str, ...] = field(default=())  # files the repo lists under prewarm's own names

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


def is_reserved(name: str) -> bool:
    """A name only prewarm writes: the manifest verify trusts, and the fetch record, lock and partials."""
    parts = name.split("/")
    return parts[-1] == MANIFEST_NAME or any(p.startswith(".prewarm") for p in parts)


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
    if local is not None and len(revision) == _COMMIT_LENGTH and not _changed(*local):
        return _result(*local, started, None)  # a pinned commit already here: no network at all
    if constants.HF_HUB_OFFLINE:
        return _offline(repo_id, revision, local, started, "HF_HUB_OFFLINE is set")
    try:
        commit, remote = _remote_files(repo_id, revision)
    except _Unreachable as exc:
        return _offline(repo_id, revision, local, started, str(exc))
    reserved = sorted(f.name for f in remote if is_reserved(f.name))
    if reserved:
        log.warning("%s lists files under names only prewarm writes; not fetched: %s", repo_id, ", ".join(reserved))
    wanted, pickles = select_files([f.name for f in remote if f.name not in reserved], include)
    chosen = set(wanted)
    files = tuple(f for f in remote if f.name in chosen)
    if not files:
        raise HubError(
            f"none of the {len(remote)} files of {repo_id} at {revision!r} matches {', '.join(include or DEFAULT_INCLUDE)}",
            hint="name the files to fetch with --include GLOB",
        )
    directory = destination or default_destination(repo_id, commit)
    with _locked(directory) as place:
        stats, downloaded, nbytes = _download_missing(repo_id, commit, place, files, progress)
        record = {
            "repo_id": repo_id,
            "revision": revision,
            "commit": commit,
            "fetched_at": time.time(),
            "files": {f.name: _file_record(stats[f.name], f) for f in files},
        }
        write_file_atomic(directory / RECORD_NAME, (json.dumps(record, indent=1) + "\n").encode())
    seconds = time.perf_counter() - started
    return FetchResult(
        repo_id, revision, commit, directory, files, tuple(downloaded), nbytes, None, seconds, tuple(pickles), tuple(reserved)
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
        raise HubError(
            f"the hub answered {exc.response.status_code} for {repo_id}",
            hint="try again later; if it persists, check HF_ENDPOINT and HF_TOKEN",
        ) from None
    siblings = info.siblings or []
    for s in siblings:
        if (reason := _name_problem(s.rfilename)) is not None:
            raise HubError(
                f"{repo_id} lists a file name that would land outside the destination: {s.rfilename!r} ({reason})",
                hint="this revision cannot be fetched safely; report it to the repository's owner",
            )
    if not info.sha:
        raise HubError(
            f"the hub did not say which commit {revision!r} of {repo_id} is",
            hint="try again; check that HF_ENDPOINT is a Hugging Face hub",
        )
    files = [
        RemoteFile(s.rfilename, int(s.size or 0), s.lfs.sha256 if s.lfs else None, None if s.lfs else s.blob_id) for s in siblings
    ]
    return info.sha, files


def _name_problem(name: object) -> str | None:
    """Why ``name`` cannot be a file inside DIR: it leads outside, or is not text a path can hold."""
    reason = unsafe_name_reason(name)
    if reason is None and isinstance(name, str):
        try:
            name.encode()  # a lone surrogate (JSON can carry "\ud800") cannot be a file name or printed
        except UnicodeEncodeError:
            return "not valid text"
    return reason


# -- the destination, as descriptors ------------------------------------------------------------


_PLANTED_HINT = "someone else can write this directory: remove that entry, find out who put it there, and run again"


@dataclass(frozen=True)
class _Place:
    """DIR, its partial directory and its lock, as descriptors. Names below DIR are resolved from
    ``fd`` one step at a time without following a symlink. A download thread holds its own copies,
    so one left running after an interrupt still holds the lock: flock(2) belongs to the open file
    description and lasts until the last descriptor of it is closed."""

    directory: Path
    fd: int
    partials: int
    lock: int

    def dup(self) -> _Place:
        return _Place(self.directory, os.dup(self.fd), os.dup(self.partials), os.dup(self.lock))

    def close(self) -> None:
        for fd in (self.fd, self.partials, self.lock):
            os.close(fd)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[_Place]:
    """DIR with its lock held: one fetch at a time per directory (two would append to the same
    partial files). flock(2) waits for a live holder and dies with a killed one."""
    place = _open_place(directory)
    try:
        try:
            fcntl.flock(place.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("another prewarm fetch is writing %s; waiting for it", directory)
            fcntl.flock(place.lock, fcntl.LOCK_EX)
        yield place
    finally:
        place.close()


def _open_place(directory: Path) -> _Place:
    """DIR (made if need be), its lock file and its ``.prewarm-partial``, the last two our own."""
    with contextlib.ExitStack() as undo:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            undo.callback(os.close, dfd)
            lock = _open_own(dfd, directory, LOCK_NAME, os.O_RDWR | os.O_CREAT, "lock file")
            undo.callback(os.close, lock)
            with contextlib.suppress(FileExistsError):
                os.mkdir(PARTIAL_DIR, 0o700, dir_fd=dfd)
            partials = _open_own(dfd, directory, PARTIAL_DIR, os.O_RDONLY | os.O_DIRECTORY, "directory")
            undo.callback(os.close, partials)
            os.fchmod(partials, 0o700)  # no one else may add or swap entries (older versions made it 0755)
        except OSError as exc:
            raise os_error(exc, directory) from exc
        undo.pop_all()
    return _Place(directory, dfd, partials, lock)


def _open_own(dfd: int, directory: Path, name: str, flags: int, kind: str) -> int:
    """DIR/name opened without following a symlink (O_NOFOLLOW), and checked to be our own ``kind``."""
    try:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR, errno.EISDIR):
            raise
        fd = -1
    st = os.fstat(fd) if fd >= 0 else os.stat(name, dir_fd=dfd, follow_symlinks=False)
    is_kind = stat.S_ISDIR if flags & os.O_DIRECTORY else stat.S_ISREG
    if is_kind(st.st_mode) and st.st_uid == os.geteuid():
        return fd
    if fd >= 0:
        os.close(fd)
    what = (
        "a symlink" if stat.S_ISLNK(st.st_mode) else f"not a {kind}" if not is_kind(st.st_mode) else f"owned by uid {st.st_uid}"
    )
    raise FilesystemError(f"{what}, where fetch keeps its own {kind}", str(directory / name), hint=_PLANTED_HINT)


def _walk(dfd: int, parts: Sequence[str], create: bool) -> int:
    """A descriptor on the directory DIR/parts..., each step opened with O_NOFOLLOW|O_DIRECTORY:
    a symlink or a file on the way fails with ENOTDIR instead of leading elsewhere."""
    fd = os.dup(dfd)
    try:
        for part in parts:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, dir_fd=fd)
            step = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = step
    except BaseException:
        os.close(fd)
        raise
    return fd


def _trusted(st: os.stat_result) -> bool:
    """A regular file written by us or by root: one another user owns could change after it was checked."""
    return stat.S_ISREG(st.st_mode) and st.st_uid in (os.geteuid(), 0)


def _open_existing(dfd: int, name: str) -> int | None:
    """A read descriptor on DIR/name if it is a regular file we trust, reached without following a
    symlink (O_NONBLOCK: a FIFO planted there cannot block the open); None otherwise."""
    *parents, base = name.split("/")
    try:
        parent = _walk(dfd, parents, create=False)
    except OSError:
        return None
    try:
        fd = os.open(base, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=parent)
    except OSError:
        return None
    finally:
        os.close(parent)
    if _trusted(os.fstat(fd)):
        return fd
    os.close(fd)
    return None


def _install(place: _Place, partial: str, name: str) -> None:
    """Rename the checked partial file to DIR/name, its parent directories made and entered
    without following a symlink: one planted as ``a`` for ``a/b.json`` cannot send it outside DIR."""
    *parents, base = name.split("/")
    target = place.directory / name
    try:
        parent = _walk(place.fd, parents, create=True)
    except NotADirectoryError:
        raise FilesystemError("a parent directory of this file is a symlink or a file", str(target), hint=_PLANTED_HINT) from None
    except OSError as exc:
        raise os_error(exc, target) from exc
    try:
        os.replace(partial, base, src_dir_fd=place.partials, dst_dir_fd=parent)
        os.fsync(parent)
    except OSError as exc:
        raise os_error(exc, target) from exc
    finally:
        os.close(parent)


# -- downloading ----------------------------------------------------------------------------------


class _Cancelled(BaseException):
    """Raised in a download thread once the run is interrupted. Not an Exception, so the
    ``except Exception`` paths of huggingface_hub's retries (and ours) let it through."""


def _download_missing(
    repo_id: str, commit: str, place: _Place, files: Sequence[RemoteFile], progress: Progress
) -> tuple[dict[str, os.stat_result], list[str], int]:
    """(the stat of every file, the names downloaded, the bytes downloaded)."""
    record = _load_record(place.directory, warn=False)  # any damage was reported by _local_snapshot
    known = record.files if record else {}
    stats = {f.name: st for f in files if (st := _already_have(place, f, known.get(f.name))) is not None}
    todo = [f for f in files if f.name not in stats]
    remaining = sum(f.size - min(_partial_size(place, f.name), f.size) for f in todo)
    check_free_space(place.directory, remaining)
    progress.start("downloading", remaining)
    stats |= _download_all(place, todo, lambda p, f, cancel: _download_one(repo_id, commit, p, f, progress, cancel))
    progress.finish()
    with contextlib.suppress(OSError):  # left in place while it holds a partial download
        os.rmdir(PARTIAL_DIR, dir_fd=place.fd)
    return stats, [f.name for f in todo], remaining


def _download_all(
    place: _Place, todo: Sequence[RemoteFile], download: Callable[[_Place, RemoteFile, threading.Event], os.stat_result]
) -> dict[str, os.stat_result]:
    """Run the downloads on DOWNLOAD_THREADS daemon threads and wait for all; the first error is
    raised once the others are done. On Ctrl-C or SIGTERM (raised here, in the main thread) the
    threads are told to stop and not waited for: one may sit in a socket read for as long as the
    server takes, and a daemon thread does not keep the process from exiting."""
    pending: queue.SimpleQueue[RemoteFile] = queue.SimpleQueue()
    for remote in todo:
        pending.put(remote)
    done: queue.SimpleQueue[tuple[str, os.stat_result | BaseException]] = queue.SimpleQueue()
    cancel = threading.Event()
    for i in range(min(DOWNLOAD_THREADS, len(todo))):
        args = (place.dup(), pending, done, download, cancel)
        threading.Thread(target=_download_worker, args=args, name=f"prewarm-fetch-{i}", daemon=True).start()
    stats: dict[str, os.stat_result] = {}
    errors: list[BaseException] = []
    try:
        for _ in todo:
            name, outcome = done.get()
            if isinstance(outcome, BaseException):
                errors.append(outcome)
            else:
                stats[name] = outcome
    except BaseException:
        cancel.set()
        raise
    if errors:
        raise errors[0]
    return stats


def _download_worker(
    place: _Place,
    pending: queue.SimpleQueue[RemoteFile],
    done: queue.SimpleQueue[tuple[str, os.stat_result | BaseException]],
    download: Callable[[_Place, RemoteFile, threading.Event], os.stat_result],
    cancel: threading.Event,
) -> None:
    try:
        while not cancel.is_set():
            try:
                remote = pending.get_nowait()
            except queue.Empty:
                return
            try:
                outcome: os.stat_result | BaseException = download(place, remote, cancel)
            except BaseException as exc:
                outcome = exc
            done.put((remote.name, outcome))
    finally:
        place.close()


def _partial_name(name: str) -> str:
    return name.replace("%", "%25").replace("/", "%2F") + ".part"  # one flat, unambiguous name per file


def _partial_size(place: _Place, name: str) -> int:
    try:
        st = os.stat(_partial_name(name), dir_fd=place.partials, follow_symlinks=False)
    except OSError:
        return 0
    return st.st_size if stat.S_ISREG(st.st_mode) else 0


def _already_have(place: _Place, remote: RemoteFile, entry: _Entry | None) -> os.stat_result | None:
    """The file's stat when it is here and matches the hub: by the record (cheap) or by hashing it."""
    fd = _open_existing(place.fd, remote.name)
    if fd is None:
        return None
    try:
        st = os.fstat(fd)
        if entry is not None and (entry.sha256, entry.blob_id) == (remote.sha256, remote.blob_id) and _same(st, entry):
            return st
        return st if _matches(fd, st.st_size, remote) is None else None
    finally:
        os.close(fd)


def _open_partial(place: _Place, name: str) -> int:
    """The partial download ``name``, to continue: it must be a regular file of ours with one link.
    Anything else at the name (a symlink, which O_NOFOLLOW refuses to follow; a hard link to a file
    elsewhere; another user's file) was planted: it is deleted and the download starts afresh."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, 0o600, dir_fd=place.partials)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
    else:
        st = os.fstat(fd)
        if is_regular_owned(st) and st.st_nlink == 1:
            return fd
        os.close(fd)
    log.warning("%s was not a partial download of ours: deleted, starting afresh", place.directory / PARTIAL_DIR / name)
    os.unlink(name, dir_fd=place.partials)
    return os.open(name, flags | os.O_EXCL, 0o600, dir_fd=place.partials)


def _download_one(
    repo_id: str, commit: str, place: _Place, remote: RemoteFile, progress: Progress, cancel: threading.Event
) -> os.stat_result:
    partial, target = _partial_name(remote.name), place.directory / remote.name
    try:
        fd = _open_partial(place, partial)
    except OSError as exc:
        raise os_error(exc, target) from exc
    try:
        out = _HashingFile(fd, remote, cancel)
        _get(repo_id, commit, remote, out, progress)
        os.fsync(fd)
        if (problem := out.mismatch()) is not None:
            os.unlink(partial, dir_fd=place.partials)
            raise HubError(
                f"{remote.name}: {problem}; the bad download was deleted",
                hint="run again to download it afresh; if it keeps failing, the hub copy or a proxy is at fault",
            )
        st = os.fstat(fd)
    except OSError as exc:
        raise os_error(exc, target) from exc
    finally:
        os.close(fd)
    _install(place, partial, remote.name)
    return st


def _get(repo_id: str, commit: str, remote: RemoteFile, out: _HashingFile, progress: Progress) -> None:
    """http_get into ``out`` from where it ends. On any failure http_get leaves the file as it is
    (it only truncates it itself when a server ignores the Range), so what arrived is kept."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]

    progress.advance(0)
    try:
        http_get(
            hf_hub_url(repo_id, remote.name, revision=commit),
            out,  # type: ignore[arg-type]
            resume_size=out.size,
            headers=build_hf_headers(),
            expected_size=remote.size,
            displayed_filename=remote.name,
            tqdm_class=_forwarding_bar(progress, out.cancel),
        )
    except _transport_errors() as exc:
        raise HubError(
            f"download of {remote.name} was cut off ({type(exc).__name__}) after {out.size} of {remote.size} bytes",
            hint=_RESUME_HINT,
        ) from None
    except HfHubHTTPError as exc:
        raise HubError(
            f"download of {remote.name} failed: the hub answered {exc.response.status_code}", hint=_RESUME_HINT
        ) from None
    except OSError as exc:
        if exc.errno is not None:
            raise
        raise HubError(  # http_get's own check: the server sent fewer bytes than it announced
            f"download of {remote.name} ended early at {out.size} of {remote.size} bytes", hint=_RESUME_HINT
        ) from None


def _forwarding_bar(progress: Progress, cancel: threading.Event) -> type:
    """A tqdm class for http_get that shows nothing itself and forwards bytes to ``progress``.
    http_get counts each block before writing it: once cancelled, nothing more is reported (a
    thread left running must not write to stderr while the interpreter shuts down)."""
    from tqdm.auto import tqdm

    class Forward(tqdm):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            if cancel.is_set():
                raise _Cancelled
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


def _matches(fd: int, size: int, remote: RemoteFile) -> str | None:
    """None if the file open as ``fd`` is what the hub says; otherwise what differs."""
    if size != remote.size:
        return f"{size} bytes, the hub says {remote.size}"
    digest = _Digest(remote)
    while block := os.read(fd, _BLOCK):
        digest.update(block)
    return digest.mismatch()


class _HashingFile:
    """The partial file as http_get writes it: each byte also goes into the hub's hash, so the
    check costs no second read. Bytes already there from an earlier run are hashed first.

    Writes go straight to the descriptor, unbuffered: whatever was written when the run stops
    (an interrupt, a kill) is in the file and is a prefix of the hub's bytes, ready to resume."""

    def __init__(self, fd: int, remote: RemoteFile, cancel: threading.Event) -> None:
        self.fd, self.remote, self.cancel = fd, remote, cancel
        if os.fstat(fd).st_size > remote.size:
            os.ftruncate(fd, remote.size)
        self._rehash()

    @property
    def size(self) -> int:
        return self.digest.size

    def _rehash(self) -> None:
        self.digest = _Digest(self.remote)
        os.lseek(self.fd, 0, os.SEEK_SET)
        while block := os.read(self.fd, _BLOCK):
            self._stop_if_cancelled()
            self.digest.update(block)

    def _stop_if_cancelled(self) -> None:
        if self.cancel.is_set():
            raise _Cancelled

    def write(self, data: bytes) -> int:
        self._stop_if_cancelled()
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]
        self.digest.update(data)
        return len(data)

    def truncate(self, size: int | None = None) -> int:  # http_get: the server ignored our Range
        size = self.tell() if size is None else size
        os.ftruncate(self.fd, size)
        self._rehash()
        return size

    def seek(self, offset: int, whence: int = 0) -> int:
        return os.lseek(self.fd, offset, whence)

    def tell(self) -> int:
        return os.lseek(self.fd, 0, os.SEEK_CUR)

    def flush(self) -> None:
        pass  # nothing is buffered

    def mismatch(self) -> str | None:
        return self.digest.mismatch()


# -- the record of what was fetched ---------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    size: int
    mtime_ns: int
    inode: int
    sha256: str | None
    blob_id: str | None


@dataclass(frozen=True)
class _Record:
    repo_id: str
    revision: str
    commit: str
    fetched_at: float
    files: dict[str, _Entry]


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


def _load_record(directory: Path, warn: bool = True) -> _Record | None:
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
        if not _trusted(st):
            raise _Damaged("not a regular file" if not stat.S_ISREG(st.st_mode) else f"owned by uid {st.st_uid}")
        chunks: list[bytes] = []
        while (chunk := os.read(fd, 2**20)) and sum(map(len, chunks)) <= _MAX_RECORD_BYTES:
            chunks.append(chunk)
    finally:
        os.close(fd)
    if sum(map(len, chunks)) > _MAX_RECORD_BYTES:
        raise _Damaged(f"larger than {_MAX_RECORD_BYTES} bytes")
    return b"".join(chunks)


def _parse_record(raw: bytes) -> _Record:
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
    return _Record(repo_id, revision, commit, _finite(data.get("fetched_at")), entries)


def _parse_entry(name: str, entry: object) -> _Entry:
    reason = _name_problem(name) or ("one of prewarm's own names" if is_reserved(name) else None)
    if reason is not None:
        raise _Damaged(f"file {name!r}: {reason}")
    if not isinstance(entry, dict):
        raise _Damaged(f"file {name!r}: not an object")
    try:
        size, mtime_ns, inode = (_count(entry[key]) for key in ("size", "mtime_ns", "inode"))
        return _Entry(size, mtime_ns, inode, _hex(entry["sha256"]), _hex(entry["blob_id"]))
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


def _local_snapshot(repo_id: str, revision: str, destination: Path | None) -> tuple[Path, _Record] | None:
    """The newest directory holding a finished fetch of ``revision`` (branch, tag or commit), if any."""
    candidates = [destination] if destination else sorted((cache_root() / "hub" / repo_id.replace("/", "--")).glob("*"))
    found = []
    for directory in candidates:
        record = _load_record(directory)
        if record and record.repo_id == repo_id and (record.revision == revision or record.commit.startswith(revision)):
            found.append((directory, record))
    return max(found, key=lambda f: f[1].fetched_at, default=None)


def _same(st: os.stat_result, entry: _Entry) -> bool:
    return (st.st_size, st.st_mtime_ns, st.st_ino) == (entry.size, entry.mtime_ns, entry.inode)


def _changed(directory: Path, record: _Record) -> list[str]:
    """The record's files that are missing, changed, or no longer regular files we trust."""
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return sorted(record.files)
    try:
        return sorted(name for name, entry in record.files.items() if not _intact_file(dfd, name, entry))
    finally:
        os.close(dfd)


def _intact_file(dfd: int, name: str, entry: _Entry) -> bool:
    fd = _open_existing(dfd, name)
    if fd is None:
        return False
    try:
        return _same(os.fstat(fd), entry)
    finally:
        os.close(fd)


def _result(directory: Path, record: _Record, started: float, offline_reason: str | None) -> FetchResult:
    files = tuple(RemoteFile(name, e.size, e.sha256, e.blob_id) for name, e in sorted(record.files.items()))
    seconds = time.perf_counter() - started
    return FetchResult(record.repo_id, record.revision, record.commit, directory, files, (), 0, offline_reason, seconds)


def _offline(repo_id: str, revision: str, local: tuple[Path, _Record] | None, started: float, why: str) -> FetchResult:
    if local is None:
        raise HubError(
            f"{why}, and {repo_id} at {revision!r} has not been fetched here before",
            hint="connect to the hub (or unset HF_HUB_OFFLINE) and fetch it once",
        )
    missing = _changed(*local)
    if missing:
        raise HubError(
            f"{why}, and {len(missing)} files of {repo_id} are missing or changed in {local[0]}: {', '.join(missing[:5])}",
            hint="reconnect and fetch again to restore them",
        )
    return _result(*local, started, why)
