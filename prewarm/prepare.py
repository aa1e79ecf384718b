"""The disk stages composed for the daemon: fetch, reshard, verify, warm, each reported as a phase.

A directory that already has a valid prewarm manifest is served as it is; a hub repo id is
fetched, and anything that is not a serving directory yet is resharded into the cache first.
Weights that fail verification are never handed to an engine: a serving directory prewarm built
itself is rebuilt once from the source; otherwise preparing fails with the problems named.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from prewarm.config import DaemonSettings
from prewarm.errors import ManifestError, PrewarmError
from prewarm.fetch import REPO_ID, fetch
from prewarm.manifest import read_manifest
from prewarm.progress import NoProgress, Progress
from prewarm.reshard import reshard
from prewarm.units import parse_size
from prewarm.verify import VerifyReport, record_verification, verify_directory
from prewarm.warm import warm

log = logging.getLogger(__name__)
OnPhase = Callable[[str, str, "float | None"], None]  # (state, phase name, seconds or None at its start)


@dataclass(frozen=True)
class Prepared:
    serving_dir: Path
    served_name: str
    source_dir: Path
    verification: dict[str, Any]
    residency: dict[str, Any]
    identities: dict[str, tuple[int, int, int]]
    owned: bool  # the serving directory is prewarm's own (in the cache), rebuilt from the source


@contextlib.contextmanager
def _phase(on_phase: OnPhase, state: str, name: str) -> Iterator[None]:
    on_phase(state, name, None)
    started = time.monotonic()
    yield
    on_phase(state, name, time.monotonic() - started)


def prepare(settings: DaemonSettings, on_phase: OnPhase, progress: Progress | None = None) -> Prepared:
    """Fetch, reshard, verify and warm what ``settings.model`` names; ``progress`` sees each stage's bytes."""
    progress = progress or NoProgress()
    source = settings.model
    source_info: dict[str, object] | None = None
    if REPO_ID.fullmatch(source) and not os.path.lexists(source):
        with _phase(on_phase, "fetching", "fetch"):
            fetched = fetch(source, settings.revision, progress=progress)
        source_dir, source_info, name = fetched.directory, fetched.source_info(), source
        serving = settings.cache_dir / "serving" / source.replace("/", "--") / fetched.commit
    else:
        source_dir, name = Path(source), Path(source).resolve().name
        serving = source_dir if _is_serving_dir(source_dir) else _cache_place(settings, source_dir)
    owned = serving != source_dir
    report = _build_and_verify(settings, source_dir, serving, owned, source_info, on_phase, progress)
    with _phase(on_phase, "warming", "warm"):
        warmed = warm(serving, progress=progress)
    return Prepared(
        serving,
        settings.served_model_name or name,
        source_dir,
        {
            "ok": report.ok,
            "problems": len(report.problems),
            "files": report.files,
            "bytes": report.bytes_checked,
            "seconds": round(report.seconds, 3),
            "at": time.time(),
        },
        {
            "total_bytes": warmed.after.total_bytes,
            "resident_bytes": warmed.after.resident_bytes,
            "unknown_bytes": warmed.after.unknown_bytes,
        },
        file_identities(serving),
        owned,
    )


def _is_serving_dir(directory: Path) -> bool:
    try:
        read_manifest(directory)
    except (ManifestError, PrewarmError):
        return False
    return True


def _cache_place(settings: DaemonSettings, source_dir: Path) -> Path:
    """Where a local checkpoint's serving directory goes: named for its real path and for what its
    files are now (name, size, mtime), so a changed checkpoint gets a new serving directory while
    the running engine keeps the old one."""
    real = os.path.realpath(source_dir)
    key = xxhash.xxh3_64(real.encode())
    with os.scandir(real) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.is_file() and not entry.name.startswith("."):
                st = entry.stat()
                key.update(f"{entry.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return settings.cache_dir / "serving" / f"{Path(real).name}-{key.hexdigest()[:16]}"


def file_identities(directory: Path) -> dict[str, tuple[int, int, int]]:
    """(size, mtime, inode) of every file the manifest lists, as verified: a later difference
    means the files on disk are no longer the ones the engine loaded."""
    identities = {}
    for name in read_manifest(directory).files:
        try:
            st = os.stat(directory / name)
        except OSError:
            continue
        identities[name] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return identities


def _build_and_verify(
    settings: DaemonSettings,
    source_dir: Path,
    serving: Path,
    owned: bool,
    info: dict[str, object] | None,
    on_phase: OnPhase,
    progress: Progress,
) -> VerifyReport:
    for attempt in (1, 2):
        if owned and not serving.exists():
            serving.parent.mkdir(parents=True, exist_ok=True)
            with _phase(on_phase, "resharding", "reshard"):
                reshard(source_dir, serving, parse_size(settings.max_shard_size), progress, source_info=info)
        with _phase(on_phase, "verifying", "verify"):
            report = verify_directory(serving, progress=progress)
        with contextlib.suppress(PrewarmError):
            record_verification(report)
        if report.ok:
            return report
        first = report.problems[0]
        log.error("%s failed verification: %d problems, first: %s %s", serving, len(report.problems), first.kind, first.file)
        if not owned or attempt == 2:
            raise PrewarmError(
                f"the weights failed verification ({len(report.problems)} problems, first: {first.kind} {first.file}); "
                "they were not loaded",
                str(serving),
                hint="restore the files (or fetch/reshard again), then reload",
            )
        log.warning("rebuilding %s from %s", serving, source_dir)
        shutil.rmtree(serving)
    raise AssertionError("unreachable")
