"""Fetch a model from the Hugging Face hub: pinned to a commit, resumable, checked, offline-ready.

``fetch`` composes the parts, each in its own module: what the hub lists at a revision
(``fetch_hub``), which of those files to take (here), the destination held under its lock
(``fetch_place``), resumable downloads checked against the hub's hashes (``fetch_download``), and
``.prewarm-fetch.json``, the record of what was checked, so that a second run re-hashes nothing
(``fetch_record``). When the hub cannot be asked (HF_HUB_OFFLINE is set, or it cannot be reached),
the files fetched before are used if they are all still there and unchanged.
"""

from __future__ import annotations

import fnmatch
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prewarm.config import cache_root
from prewarm.errors import UsageError
from prewarm.fetch_download import download_missing
from prewarm.fetch_hub import HubError, RemoteFile, Unreachable, remote_files
from prewarm.fetch_place import is_reserved, locked
from prewarm.fetch_record import Record, changed, local_snapshot, write_record
from prewarm.progress import NoProgress, Progress

__all__ = [
    "DEFAULT_INCLUDE",
    "PICKLE_PATTERNS",
    "REPO_ID",
    "FetchResult",
    "HubError",
    "RemoteFile",
    "default_destination",
    "fetch",
    "is_reserved",
    "select_files",
]

DEFAULT_INCLUDE = ("*.safetensors", "*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken", "tokenizer*", "*.py")
PICKLE_PATTERNS = ("*.bin", "*.pth", "*.pt", "*.ckpt", "*.pkl", "*.pickle")
_COMMIT_LENGTH = 40
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
log = logging.getLogger(__name__)


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
    local = local_snapshot(repo_id, revision, destination)
    if local is not None and len(revision) == _COMMIT_LENGTH and not changed(*local):
        return _result(*local, started, None)  # a pinned commit already here: no network at all
    if constants.HF_HUB_OFFLINE:
        return _offline(repo_id, revision, local, started, "HF_HUB_OFFLINE is set")
    try:
        commit, remote = remote_files(repo_id, revision)
    except Unreachable as exc:
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
    with locked(directory) as place:
        stats, downloaded, nbytes = download_missing(repo_id, commit, place, files, progress)
        write_record(directory, repo_id, revision, commit, files, stats)
    seconds = time.perf_counter() - started
    return FetchResult(
        repo_id, revision, commit, directory, files, tuple(downloaded), nbytes, None, seconds, tuple(pickles), tuple(reserved)
    )


def _result(directory: Path, record: Record, started: float, offline_reason: str | None) -> FetchResult:
    files = tuple(RemoteFile(name, e.size, e.sha256, e.blob_id) for name, e in sorted(record.files.items()))
    seconds = time.perf_counter() - started
    return FetchResult(record.repo_id, record.revision, record.commit, directory, files, (), 0, offline_reason, seconds)


def _offline(repo_id: str, revision: str, local: tuple[Path, Record] | None, started: float, why: str) -> FetchResult:
    if local is None:
        raise HubError(
            f"{why}, and {repo_id} at {revision!r} has not been fetched here before",
            hint="connect to the hub (or unset HF_HUB_OFFLINE) and fetch it once",
        )
    missing = changed(*local)
    if missing:
        raise HubError(
            f"{why}, and {len(missing)} files of {repo_id} are missing or changed in {local[0]}: {', '.join(missing[:5])}",
            hint="reconnect and fetch again to restore them",
        )
    return _result(*local, started, why)
