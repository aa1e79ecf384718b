"""Who may use the optional TCP listener (``http = "HOST:PORT"``): the chat page and the same API
as the Unix socket, for a browser.

TCP has no peer credentials, so the rules are HTTP's: on a loopback address, the ``Host`` header
must name this listener (a web page elsewhere cannot reach it through DNS rebinding); a request
that carries an ``Origin`` must come from the page itself (no cross-site requests); with an
``api_key``, every request but the page's own files needs ``Authorization: Bearer KEY``, compared
in constant time. The control endpoint stays on the Unix socket.
"""

from __future__ import annotations

import hmac
import re
import socket
from dataclasses import dataclass

from prewarm.config import is_loopback

STATIC_NAME = r"[a-z0-9_-]+\.(js|css|svg)"  # the page's files under /static/
PUBLIC = re.compile(rf"/|/static/{STATIC_NAME}")  # the page, served to ask for the key


@dataclass(frozen=True)
class Refusal:
    status: int
    message: str


@dataclass(frozen=True)
class TcpAccess:
    host: str
    port: int
    api_key: str | None = None

    @property
    def display(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        return socket.create_server((self.host, self.port), family=family, backlog=1024)

    def allowed_hosts(self) -> set[str]:
        return {self.display, f"localhost:{self.port}", f"127.0.0.1:{self.port}", f"[::1]:{self.port}"}

    def refusal(self, path: str, headers: dict[str, str]) -> Refusal | None:
        """Why this request may not pass, or None; ``headers`` with lower-case names."""
        host = headers.get("host", "")
        if is_loopback(self.host) and host not in self.allowed_hosts():
            return Refusal(403, f"unexpected Host {host!r}: this listener answers to {self.display} only")
        origin = headers.get("origin")
        if origin is not None and origin != f"http://{host}":
            return Refusal(403, "cross-origin requests are refused")
        if path.startswith("/prewarm/") and path != "/prewarm/status":
            return Refusal(403, "the control endpoints are on the Unix socket only")
        if self.api_key and not PUBLIC.fullmatch(path):
            given = headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
                return Refusal(401, "an API key is needed: send Authorization: Bearer KEY")
        return None
