"""Download the missing files into DIR, each checked against the hub before it is put in place.

Built on huggingface_hub's ``hf_hub_url`` and ``http_get`` for the bytes and ``build_hf_headers``
for the token rather than ``snapshot_download``, because since v1.18 a failed download's partial
file is deleted: here it is kept under ``.prewarm-partial/`` and the next run continues it with an
HTTP Range request. The bytes are hashed as they arrive (LFS sha256 or git blob id) and a file is
renamed into place only once it matches. The downloads run on daemon threads, which an interrupt
cancels instead of waiting for.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

from prewarm.fetch_hub import HubError, RemoteFile, transport_errors
from prewarm.fetch_place import PARTIAL_DIR, Place, install, open_existing, open_partial, partial_name, partial_size
from prewarm.fetch_record import Entry, load_record, same
from prewarm.fsutil import check_free_space, os_error, write_all
from prewarm.progress import Progress

DOWNLOAD_THREADS = 4  # files at once, hashing as they arrive (snapshot_download uses 8 by default)
_BLOCK = 16 * 2**20
_RESUME_HINT = "run the same command again: it resumes where it stopped"


class _Cancelled(BaseException):
    """Raised in a download thread once the run is interrupted. Not an Exception, so the
    ``except Exception`` paths of huggingface_hub's retries (and ours) let it through."""


def download_missing(
    repo_id: str, commit: str, place: Place, files: Sequence[RemoteFile], progress: Progress
) -> tuple[dict[str, os.stat_result], list[str], int]:
    """(the stat of every file, the names downloaded, the bytes downloaded)."""
    record = load_record(place.directory, warn=False)  # any damage was reported by local_snapshot
    known = record.files if record else {}
    stats = {f.name: st for f in files if (st := _already_have(place, f, known.get(f.name))) is not None}
    todo = [f for f in files if f.name not in stats]
    remaining = sum(f.size - min(partial_size(place, f.name), f.size) for f in todo)
    check_free_space(place.directory, remaining)
    progress.start("downloading", remaining)
    stats |= _download_all(place, todo, lambda p, f, cancel: _download_one(repo_id, commit, p, f, progress, cancel), progress)
    progress.finish()
    with contextlib.suppress(OSError):  # left in place while it holds a partial download
        os.rmdir(PARTIAL_DIR, dir_fd=place.fd)
    return stats, [f.name for f in todo], remaining


def _download_all(
    place: Place,
    todo: Sequence[RemoteFile],
    download: Callable[[Place, RemoteFile, threading.Event], os.stat_result],
    progress: Progress,
) -> dict[str, os.stat_result]:
    """Run the downloads on DOWNLOAD_THREADS daemon threads and wait for all; the first error is
    raised once the others are done. On Ctrl-C or SIGTERM (raised here, in the main thread), or a
    cancel raised by ``progress`` (how the daemon calls off a stage), the threads are told to stop
    and not waited for: one may sit in a socket read for as long as the
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
            while True:
                try:
                    name, outcome = done.get(timeout=0.2)
                    break
                except queue.Empty:
                    # A stage run off the main thread (the daemon's) is called off through its
                    # progress, which raises once cancelled: a worker may sit in one read for long.
                    progress.advance(0)
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
    place: Place,
    pending: queue.SimpleQueue[RemoteFile],
    done: queue.SimpleQueue[tuple[str, os.stat_result | BaseException]],
    download: Callable[[Place, RemoteFile, threading.Event], os.stat_result],
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


def _already_have(place: Place, remote: RemoteFile, entry: Entry | None) -> os.stat_result | None:
    """The file's stat when it is here and matches the hub: by the record (cheap) or by hashing it."""
    fd = open_existing(place.fd, remote.name)
    if fd is None:
        return None
    try:
        st = os.fstat(fd)
        if entry is not None and (entry.sha256, entry.blob_id) == (remote.sha256, remote.blob_id) and same(st, entry):
            return st
        return st if _matches(fd, st.st_size, remote) is None else None
    finally:
        os.close(fd)


def _download_one(
    repo_id: str, commit: str, place: Place, remote: RemoteFile, progress: Progress, cancel: threading.Event
) -> os.stat_result:
    partial, target = partial_name(remote.name), place.directory / remote.name
    try:
        fd = open_partial(place, partial)
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
    install(place, partial, remote.name)
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
    except transport_errors() as exc:
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


# -- checking the bytes against the hub ------------------------------------------------------------


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
        write_all(self.fd, data)
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
