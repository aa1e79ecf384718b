"""A client for people: the daemon's public socket, waited for while it starts, answers streamed.

Everything goes over the public socket (HTTP/1.1 and the OpenAI API) with ``prewarm.client``'s
httpx client. Whether an engine serves is the daemon's own ``GET /health`` (200 while one does,
a blue-green reload included); ``GET /prewarm/status`` says what a start is waiting for.
Whatever goes wrong becomes a ``DaemonError`` naming the socket and the next step.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import json
import os
import pwd
import re
import stat
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from prewarm.client import connect
from prewarm.errors import ExitCode, PrewarmError
from prewarm.unixsock import check_path_length

STATUS_TIMEOUT_S = 30.0  # a socket systemd holds (socket activation) answers once the service is up
POLL_S = 0.25
_LOG = "see the daemon's log (`journalctl -u qwen-prewarm`, or the output of `prewarm daemon`)"
_CONFIG = "the daemon's config (/etc/prewarm/qwen-prewarm.toml for the service)"
_ERROR_LINE = re.compile(r"(Error|error|Exception)[:,] ")  # "ValueError: ...", pydantic's "Value error, ..."


@dataclass
class DaemonError(PrewarmError):
    """The daemon could not answer: not running, not this user's to use, failed, or it refused."""

    exit_code: ExitCode = ExitCode.ENGINE


@dataclass(frozen=True)
class Options:
    """What to ask for; None leaves the default of vLLM (and of the model's generation_config)."""

    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    seed: int | None = None  # vLLM's per-request sampling seed: the same seed, prompt and options, the same answer
    json_object: bool = False  # response_format {"type": "json_object"}: vLLM's guided decoding

    def body(self) -> dict[str, Any]:
        fields = {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens, "seed": self.seed}
        body: dict[str, Any] = {key: value for key, value in fields.items() if value is not None}
        if self.json_object:
            body["response_format"] = {"type": "json_object"}
        return body


@dataclass(frozen=True)
class Waiting:
    """What a daemon that cannot answer yet is doing: its state, and the phases done with their seconds."""

    state: str
    phases: tuple[tuple[str, float], ...]
    waited_s: float
    label: str = ""  # the running stage's progress, while preparing: what it does, bytes done of total
    done_bytes: int = 0
    total_bytes: int = 0


@dataclass(frozen=True)
class Timing:
    """How an answer came. Token counts are vLLM's usage, sent with every piece
    (``stream_options.continuous_usage_stats``), so a token that adds no text yet (part of a
    UTF-8 character) still counts when it arrives."""

    first_token_s: float | None  # from sending the request to the first token
    total_s: float
    prompt_tokens: int | None
    completion_tokens: int | None
    finish_reason: str | None
    decode_tokens: int = 0  # tokens after the first one...
    decode_s: float = 0.0  # ...and the seconds from the first token to the last

    @property
    def tokens_per_s(self) -> float | None:
        """Generation speed after the first token (the first one's time is queueing and prefill)."""
        return self.decode_tokens / self.decode_s if self.decode_tokens and self.decode_s > 0 else None


def daemon_status(socket: Path) -> dict[str, Any]:
    """``GET /prewarm/status``, as the daemon sends it."""
    with _session(socket) as http:
        return _status(http, socket)


def wait_until_ready(socket: Path, on_progress: Callable[[Waiting], None], poll_s: float = POLL_S) -> dict[str, Any]:
    """The daemon's status once an engine serves; ``on_progress`` after each look until then.
    A failed or stopping daemon is a ``DaemonError`` (the daemon would only queue the request)."""
    started = time.monotonic()
    with _session(socket) as http:
        while True:
            status = _status(http, socket)
            state = str(status["state"])
            if state == "failed":
                raise failure_error(socket, status)
            if state == "stopping":
                raise DaemonError("the daemon is stopping", str(socket), hint=_start_hint(socket))
            if http.get("/health", timeout=STATUS_TIMEOUT_S).status_code == 200:
                return status
            phases = tuple((str(p.get("name")), float(p.get("seconds") or 0)) for p in status.get("phases") or ())
            stage = status.get("progress") or {}
            label, done, total = (
                str(stage.get("label") or ""),
                int(stage.get("done_bytes") or 0),
                int(stage.get("total_bytes") or 0),
            )
            on_progress(Waiting(state, phases, time.monotonic() - started, label, done, total))
            time.sleep(poll_s)


def served_name(socket: Path, status: dict[str, Any]) -> str:
    name = (status.get("model") or {}).get("served_name")
    if not name:
        raise DaemonError("the daemon's status names no served model", str(socket), hint=_LOG)
    return str(name)


def failure_error(socket: Path, status: dict[str, Any]) -> DaemonError:
    """A daemon in state failed, with its reason (and the engine's last line when that says more)."""
    failure = status.get("failure") or {}
    reason = str(failure.get("reason") or "no reason given")
    lines = [str(line).strip() for line in failure.get("last_lines") or () if str(line).strip()]
    errors = [line for line in lines if _ERROR_LINE.search(line)] or lines  # a traceback's message, not a URL after it
    detail = f" (the engine said: {errors[-1][:200]})" if errors and errors[-1] not in reason else ""
    hint = f"{_LOG}; fix the cause, then reload it: `sudo systemctl reload qwen-prewarm` (or send the daemon SIGHUP)"
    return DaemonError(f"the daemon failed: {reason}{detail}", str(socket), hint=hint)


def stream_chat(
    socket: Path, messages: Sequence[dict[str, str]], options: Options, model: str
) -> Generator[str | Timing, None, None]:
    """``POST /v1/chat/completions`` streamed: the answer's text piece by piece, then its ``Timing``."""
    usage_every_piece = {"include_usage": True, "continuous_usage_stats": True}
    body = {"model": model, "messages": list(messages), "stream": True, "stream_options": usage_every_piece}
    sent = time.monotonic()
    first: tuple[float, int] | None = None  # (when, tokens so far) at the first token, and at the last
    last = (sent, 0)
    finish: str | None = None
    usage: dict[str, Any] = {}
    with _session(socket) as http, http.stream("POST", "/v1/chat/completions", json=body | options.body()) as response:
        if response.status_code != 200:
            response.read()
            _check(response, socket)
        for chunk in _events(response, socket):
            now = time.monotonic()
            texts = [(c.get("delta") or {}).get("content") or "" for c in chunk.get("choices") or ()]
            finish = next((c["finish_reason"] for c in chunk.get("choices") or () if c.get("finish_reason")), finish)
            usage = chunk.get("usage") or usage
            tokens = int(usage.get("completion_tokens") or 0) if chunk.get("usage") else last[1] + any(texts)
            if tokens > last[1]:
                last = (now, tokens)
                first = first or last
            yield from (text for text in texts if text)
    yield Timing(
        first_token_s=None if first is None else first[0] - sent,
        total_s=time.monotonic() - sent,
        prompt_tokens=usage.get("prompt_tokens"),
        completion_tokens=usage.get("completion_tokens", last[1]),
        finish_reason=finish,
        decode_tokens=0 if first is None else last[1] - first[1],
        decode_s=0.0 if first is None else last[0] - first[0],
    )


def check_json_answer(socket: Path, text: str, timing: Timing) -> None:
    """An answer asked for as a JSON object must be one (vLLM's grammar makes it so, unless cut short)."""
    if timing.finish_reason == "length":
        raise DaemonError(
            f"the answer was cut off at {timing.completion_tokens} tokens, before its JSON object was complete",
            str(socket),
            hint="ask again with a larger --max-tokens",
            exit_code=ExitCode.CHECK_FAILED,
        )
    try:
        json.loads(text)
    except ValueError as exc:
        raise DaemonError(
            f"the answer is not JSON ({exc})",
            str(socket),
            hint="the engine ignored response_format: " + _LOG,
            exit_code=ExitCode.CHECK_FAILED,
        ) from None


def _events(response: httpx.Response, socket: Path) -> Iterator[dict[str, Any]]:
    """Server-sent events (``data: {...}`` lines, ``data: [DONE]`` at the end) as JSON objects."""
    for line in response.iter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            chunk = json.loads(data)
        except ValueError:
            raise DaemonError("the answer's stream sent a line that is not JSON", str(socket), hint=_LOG) from None
        if isinstance(chunk, dict) and "error" in chunk:  # vLLM reports a failure mid-stream this way
            message = (chunk["error"] or {}).get("message") if isinstance(chunk["error"], dict) else chunk["error"]
            raise DaemonError(f"the engine stopped the answer: {message}", str(socket), hint=_LOG)
        if isinstance(chunk, dict):
            yield chunk


@contextlib.contextmanager
def _session(socket: Path) -> Iterator[httpx.Client]:
    check_path_length(socket)
    try:
        with connect(socket, handoff=False) as http:
            yield http
    except httpx.TransportError as exc:
        raise _unreachable(socket, exc) from None


def _status(http: httpx.Client, socket: Path) -> dict[str, Any]:
    response = http.get("/prewarm/status", timeout=STATUS_TIMEOUT_S)
    _check(response, socket)
    try:
        status = response.json()
    except ValueError:
        status = None
    if not isinstance(status, dict) or not isinstance(status.get("state"), str):
        hint = "is this the daemon's public socket (not its .handoff socket, nor another server's)?"
        raise DaemonError("what answers on this socket is not a prewarm daemon", str(socket), hint=hint)
    return status


def _check(response: httpx.Response, socket: Path) -> None:
    """An answer that is not a success, as a ``DaemonError`` with the daemon's (or vLLM's) message."""
    if response.is_success:
        return
    if response.status_code == 403:
        hint = (
            f"the daemon admits root, its own user, the users in allowed_users and members of allowed_groups or "
            f"socket_group: ask its administrator to add {_user()} to one of them in {_CONFIG}, then restart it"
        )
        raise DaemonError(
            f"this user ({_user()}) is not allowed to use the daemon", str(socket), hint=hint, exit_code=ExitCode.IO
        )
    try:
        error = response.json().get("error") or {}
        message = error.get("message") if isinstance(error, dict) else str(error)
    except (ValueError, AttributeError):
        message = None
    what = f"the daemon answered {response.status_code} {response.reason_phrase}: {message or response.text[:200]}"
    if response.status_code == 400:  # vLLM's word on the request: a max_tokens beyond the context...
        raise DaemonError(what, str(socket), hint="change the options named above", exit_code=ExitCode.USAGE)
    raise DaemonError(what, str(socket), hint=f"{_LOG}; `prewarm status` shows its state")


def _unreachable(socket: Path, exc: httpx.TransportError) -> DaemonError:
    cause = _os_error(exc)
    code = cause.errno if cause is not None else None
    path = str(socket)
    if isinstance(exc, httpx.TimeoutException):
        return DaemonError(f"the daemon did not answer in time ({type(exc).__name__})", path, hint=_LOG)
    if code in (errno.ENOENT, errno.ENOTDIR):
        return DaemonError(
            "the daemon is not running: there is no socket here", path, hint=_start_hint(socket), exit_code=ExitCode.IO
        )
    if code == errno.ECONNREFUSED:
        why = "the daemon is not running: nothing listens on this socket (a daemon that stopped or died left it)"
        return DaemonError(why, path, hint=_start_hint(socket), exit_code=ExitCode.IO)
    if code in (errno.EACCES, errno.EPERM):
        return DaemonError(
            f"this user ({_user()}) is not allowed to connect to the daemon's socket",
            path,
            hint=_socket_access_hint(socket),
            exit_code=ExitCode.IO,
        )
    if isinstance(exc, httpx.ConnectError):
        reason = (cause.strerror if cause is not None else None) or str(exc)
        return DaemonError(f"cannot connect to the daemon: {reason}", path, hint=_start_hint(socket), exit_code=ExitCode.IO)
    return DaemonError(
        f"the connection to the daemon was cut ({type(exc).__name__}: {exc})", path, hint=f"did it stop or restart? {_LOG}"
    )


def _os_error(exc: BaseException) -> OSError | None:
    seen: BaseException | None = exc
    while seen is not None:  # httpx wraps httpcore's error, which wraps the OSError of connect(2)
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _start_hint(socket: Path) -> str:
    return (
        f"start it: `sudo systemctl start qwen-prewarm`, or `prewarm daemon --model MODEL --socket {socket}`; "
        "if it listens elsewhere, pass --socket PATH (or set PREWARM_SOCKET)"
    )


def _socket_access_hint(socket: Path) -> str:
    """Who may open the socket file (unix(7): connecting needs write permission on it)."""
    try:
        st = os.stat(socket)
        group = grp.getgrgid(st.st_gid).gr_name
        mode = f"{stat.S_IMODE(st.st_mode):04o}"
    except (OSError, KeyError):
        return f"the daemon's socket_group setting names the group that may connect: ask to be added to it ({_CONFIG})"
    return (
        f"the socket is mode {mode}, group {group} (the daemon's socket_group setting): ask an administrator to add you "
        f"to that group (`sudo usermod -aG {group} {_user()}`, then log in again)"
    )


def _user() -> str:
    uid = os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"
