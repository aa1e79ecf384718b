"""A small Hugging Face hub on loopback, speaking the protocol huggingface_hub uses.

Endpoints: ``GET /api/models/{repo}[/revision/{rev}]`` (model info, with ``blobs=True`` sizes,
LFS sha256 and git blob ids) and ``GET|HEAD /{repo}/resolve/{rev}/{path}`` (the file, with
``ETag``, ``X-Repo-Commit``, ``Content-Length`` and byte ``Range`` support). Errors carry the
``X-Error-Code`` header the client maps to its exceptions. Knobs let a test cut a connection,
corrupt a file, slow a download, or gate a repo behind a token.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin")


Content = bytes | Path  # a file's bytes, or a path to read them from (for large files)


def _size(content: Content) -> int:
    return len(content) if isinstance(content, bytes) else content.stat().st_size


def _chunks(content: Content, start: int, block: int = 4 << 20) -> Iterator[bytes]:
    if isinstance(content, bytes):
        for i in range(start, len(content), block):
            yield content[i : i + block]
        return
    with open(content, "rb") as f:
        f.seek(start)
        yield from iter(lambda: f.read(block), b"")


@functools.cache
def _digests(content: Content) -> tuple[str, str]:
    """(sha256, git blob id) of a file's content; computed once per content."""
    sha, blob = hashlib.sha256(), hashlib.sha1(b"blob %d\0" % _size(content), usedforsecurity=False)
    for chunk in _chunks(content, 0):
        sha.update(chunk)
        blob.update(chunk)
    return sha.hexdigest(), blob.hexdigest()


def _listing(files: dict[str, Content]) -> list[dict[str, Any]]:
    """The hub's tree entries for a commit's files: git blob id, size, and LFS sha256 for weights."""
    entries = []
    for name, content in sorted(files.items()):
        sha256, blob_id = _digests(content)
        entry: dict[str, Any] = {"type": "file", "path": name, "size": _size(content), "oid": blob_id}
        if name.endswith(LFS_SUFFIXES):
            entry["lfs"] = {"oid": sha256, "size": _size(content), "pointerSize": 134}
        entries.append(entry)
    return entries


@dataclass
class Repo:
    commits: dict[str, dict[str, Content]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    gated_token: str | None = None  # if set, only this bearer token may read


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased


class Hub:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.cut_after: dict[str, int] = {}  # file name -> bytes to send before dropping the connection (once)
        self.corrupt: set[str] = set()  # file names served with one byte flipped
        self.bytes_per_second: dict[str, int] = {}
        self.ignore_range = False  # answer 200 with the whole file, as some CDNs do
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> Hub:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def add_commit(
        self, repo_id: str, directory: Path, commit: str, refs: tuple[str, ...] = ("main",), by_path: bool = False
    ) -> None:
        """Serve ``directory``'s files as ``commit``: their bytes now, or (``by_path``) read when asked."""
        files: dict[str, Content] = {
            p.relative_to(directory).as_posix(): p if by_path else p.read_bytes()
            for p in sorted(directory.rglob("*"))
            if p.is_file()
        }
        repo = self.repos.setdefault(repo_id, Repo())
        repo.commits[commit] = files
        for ref in refs:
            repo.refs[ref] = commit

    def file_requests(self, name: str) -> list[Request]:
        return [r for r in self.requests if r.method == "GET" and r.path.endswith("/" + name)]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self._route(head=True)

            def do_GET(self) -> None:
                self._route(head=False)

            def _route(self, head: bool) -> None:
                path = unquote(urlsplit(self.path).path)
                with hub.lock:
                    hub.requests.append(Request(self.command, path, {k.lower(): v for k, v in self.headers.items()}))
                info = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path)
                tree = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)", path)
                resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if tree:
                    self._tree(tree.group(1), tree.group(2))
                elif info:
                    self._model_info(info.group(1), info.group(2) or "main")
                elif resolve:
                    self._file(resolve.group(1), resolve.group(2), resolve.group(3), head)
                else:
                    self._error(404, "EntryNotFound", "no such endpoint")

            def _repo_commit(self, repo_id: str, revision: str) -> tuple[Repo, str] | None:
                repo = hub.repos.get(repo_id)
                if repo is None:
                    self._error(401, "RepoNotFound", "Repository not found")
                    return None
                if repo.gated_token and self.headers.get("Authorization") != f"Bearer {repo.gated_token}":
                    self._error(401, "GatedRepo", "Access to model is restricted")
                    return None
                commit = repo.refs.get(revision, revision if revision in repo.commits else None)
                if commit is None:
                    self._error(404, "RevisionNotFound", "Invalid rev id")
                    return None
                return repo, commit

            def _model_info(self, repo_id: str, revision: str) -> None:
                found = self._repo_commit(repo_id, revision)
                if found is None:
                    return
                repo, commit = found
                siblings = [
                    {"rfilename": f["path"], "size": f["size"], "blobId": f["oid"]}
                    | ({"lfs": {"sha256": f["lfs"]["oid"], "size": f["size"], "pointerSize": 134}} if "lfs" in f else {})
                    for f in _listing(repo.commits[commit])
                ]
                body = json.dumps(
                    {
                        "_id": repo_id,
                        "id": repo_id,
                        "modelId": repo_id,
                        "sha": commit,
                        "private": False,
                        "gated": "manual" if repo.gated_token else False,
                        "disabled": False,
                        "downloads": 0,
                        "likes": 0,
                        "tags": [],
                        "siblings": siblings,
                        "lastModified": "2026-11-28T00:00:00.000Z",
                    }
                ).encode()
                self._send(200, {"Content-Type": "application/json", "X-Repo-Commit": commit}, iter([body]), len(body), False)

            def _tree(self, repo_id: str, revision: str) -> None:
                """The recursive file listing snapshot_download asks for (one page)."""
                found = self._repo_commit(repo_id, revision)
                if found is None:
                    return
                repo, commit = found
                entries = _listing(repo.commits[commit])
                body = json.dumps(entries).encode()
                self._send(200, {"Content-Type": "application/json"}, iter([body]), len(body), False)

            def _file(self, repo_id: str, revision: str, name: str, head: bool) -> None:
                found = self._repo_commit(repo_id, revision)
                if found is None:
                    return
                repo, commit = found
                content = repo.commits[commit].get(name)
                if content is None:
                    self._error(404, "EntryNotFound", "Entry not found")
                    return
                sha256, blob_id = _digests(content)
                headers = {
                    "ETag": f'"{sha256 if name.endswith(LFS_SUFFIXES) else blob_id}"',
                    "X-Repo-Commit": commit,
                    "Accept-Ranges": "bytes",
                    "Content-Type": "application/octet-stream",
                }
                size, start = _size(content), 0
                ranged = None if hub.ignore_range else re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
                if ranged:
                    start = int(ranged.group(1))
                    headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
                self._send(206 if ranged else 200, headers, _chunks(content, start), size - start, head, name)

            def _error(self, status: int, code: str, message: str) -> None:
                body = json.dumps({"error": message}).encode()
                headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}
                self._send(status, headers, iter([body]), len(body), False)

            def _send(
                self, status: int, headers: dict[str, str], body: Iterable[bytes], length: int, head: bool, name: str = ""
            ) -> None:
                self.send_response(status)
                for key, value in {**headers, "Content-Length": str(length)}.items():
                    self.send_header(key, value)
                self.end_headers()
                if head:
                    return
                with hub.lock:
                    budget = hub.cut_after.pop(name, None)  # bytes to send before dropping the connection
                flip = name in hub.corrupt
                rate = hub.bytes_per_second.get(name)
                try:
                    for chunk in body:
                        if flip:
                            chunk, flip = bytes([chunk[0] ^ 0xFF]) + chunk[1:], False
                        if budget is not None:
                            chunk, budget = chunk[:budget], budget - min(budget, len(chunk))
                        self._write(chunk, rate)
                        if budget == 0:
                            self.close_connection = True
                            self.connection.shutdown(2)
                            return
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

            def _write(self, data: bytes, rate: int | None) -> None:
                step = max(1, rate // 20) if rate else len(data) or 1
                for i in range(0, len(data), step):
                    self.wfile.write(data[i : i + step])
                    if rate:
                        self.wfile.flush()
                        time.sleep(step / rate)
                self.wfile.flush()

        return Handler
