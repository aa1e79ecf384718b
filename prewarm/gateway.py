"""The public socket: HTTP/1.1 (aiohttp) in front of the hot engine.

``/v1/...`` (and tokenize/detokenize) go to the current engine, the bytes forwarded as they come,
SSE streams included, never re-encoded; no other engine endpoint is reachable. While no engine is
ready, requests wait in a bounded queue for a bounded time, then get 503 with ``Retry-After``.
``/health``, ``/prewarm/status`` and ``POST /prewarm/reload`` are the daemon's own.
"""

from __future__ import annotations

import logging
import re
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from prewarm.peer import AccessPolicy, peer_of
from prewarm.tcpaccess import STATIC_NAME, TcpAccess

if TYPE_CHECKING:
    from prewarm.daemon import Daemon

log = logging.getLogger(__name__)
WEB = Path(__file__).parent / "web"  # the chat page: static files, no build step, nothing from a CDN
_PAGE_HEADERS = {
    # Model text is inserted as text; this is the second line of defence should that ever fail.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
# The OpenAI API and tokenize/detokenize; nothing else of the engine's (sleep, wake, LoRA and
# weight loading, profiling, whatever vLLM adds later) is reachable through prewarm.
FORWARDED = re.compile(
    r"/v1/(models(/[^/]+)?|completions|chat/completions|embeddings|responses(/[^/]+(/cancel)?)?)|/tokenize|/detokenize"
)
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}


class Unavailable(Exception):
    """No engine to send the request to: the daemon's state says why."""


def _json_error(status: int, message: str, **extra: Any) -> web.Response:
    headers = {"Retry-After": "5"} if status == 503 else {}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="prewarm"'
    body = {"error": {"message": message, "type": "prewarm", "code": status, **extra}}
    return web.json_response(body, status=status, headers=headers)


class Gateway:
    def __init__(self, daemon: Daemon, policy: AccessPolicy, grace_s: float, tcp: TcpAccess | None = None) -> None:
        self.daemon = daemon
        self.policy = policy
        self.tcp = tcp
        self.app = web.Application(middlewares=[self._check_peer], client_max_size=64 * 2**20)
        self.app.router.add_get("/health", self.health)
        self.app.router.add_get("/prewarm/status", self.status)
        self.app.router.add_post("/prewarm/reload", self.reload)
        self.app.router.add_get("/", self.page)
        self.app.router.add_get("/static/{name}", self.static)
        self.app.router.add_route("*", "/{tail:.*}", self.forward)
        self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False, shutdown_timeout=grace_s)
        self.refused = 0

    async def start(self, *listeners: socket.socket) -> None:
        await self.runner.setup()
        for listener in listeners:
            await web.SockSite(self.runner, listener).start()

    async def stop(self) -> None:
        await self.runner.cleanup()

    @web.middleware
    async def _check_peer(self, request: web.Request, handler: Any) -> web.StreamResponse:
        sock = request.transport.get_extra_info("socket") if request.transport else None
        if sock is not None and sock.family != socket.AF_UNIX:
            return await self._check_tcp(request, handler)
        peer = peer_of(sock) if sock is not None else None
        if peer is None or not self.policy.allows(peer):
            self.refused += 1
            who = (peer.uid, peer.gid, peer.pid) if peer else ("?", "?", "?")
            log.warning("refused a client on the public socket: uid %s gid %s pid %s", *who)
            return _json_error(403, "this user may not use the model socket")
        request["peer"] = peer
        result: web.StreamResponse = await handler(request)
        return result

    async def _check_tcp(self, request: web.Request, handler: Any) -> web.StreamResponse:
        headers = {k.lower(): v for k, v in request.headers.items()}
        refused = self.tcp.refusal(request.path, headers) if self.tcp else None
        if self.tcp is None or refused is not None:
            self.refused += 1
            why = refused.message if refused else "no TCP listener is configured"
            log.warning("refused a request on %s from %s: %s", self.tcp.display if self.tcp else "?", request.remote, why)
            return _json_error(refused.status if refused else 403, why)
        result: web.StreamResponse = await handler(request)
        return result

    async def page(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(WEB / "index.html", headers=_PAGE_HEADERS)

    async def static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if not re.fullmatch(STATIC_NAME, name) or not (WEB / name).is_file():
            return _json_error(404, f"no file {name}")
        return web.FileResponse(WEB / name, headers=_PAGE_HEADERS)

    async def health(self, request: web.Request) -> web.Response:
        if self.daemon.ready_engine() is not None:
            return web.json_response({"status": "ok", "state": self.daemon.state})
        return _json_error(503, f"not ready: {self.daemon.state}", state=self.daemon.state)

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(self.daemon.status())

    async def reload(self, request: web.Request) -> web.Response:
        if not self.policy.may_control(request["peer"]):  # the TCP listener never routes here
            log.warning("refused a reload from uid %d (only root and the daemon's user may)", request["peer"].uid)
            return _json_error(403, "only root and the daemon's own user may reload")
        self.daemon.request_reload("POST /prewarm/reload")
        return web.json_response({"reloading": True, "state": self.daemon.state}, status=202)

    async def forward(self, request: web.Request) -> web.StreamResponse:
        if not FORWARDED.fullmatch(request.path):
            return _json_error(404, f"no route {request.path}: the socket serves the OpenAI /v1 API, /health and /prewarm/...")
        body = await request.read()
        try:
            engine = await self.daemon.acquire_engine()
        except Unavailable as why:
            return _json_error(503, str(why), state=self.daemon.state)
        engine.in_flight += 1
        try:
            return await self._relay(request, body, engine.session())
        finally:
            engine.in_flight -= 1
            self.daemon.request_done()

    async def _relay(self, request: web.Request, body: bytes, session: aiohttp.ClientSession) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        response: web.StreamResponse | None = None
        try:
            async with session.request(request.method, "http://engine" + request.path_qs, headers=headers, data=body) as up:
                response = web.StreamResponse(status=up.status, reason=up.reason)
                response.headers.update({k: v for k, v in up.headers.items() if k.lower() not in _HOP_BY_HOP})
                if up.content_length is not None:
                    response.content_length = up.content_length
                await response.prepare(request)
                async for chunk in up.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response
        except (TimeoutError, aiohttp.ClientError) as exc:
            if response is None:
                return _json_error(502, f"the engine dropped the request: {type(exc).__name__}")
            raise
