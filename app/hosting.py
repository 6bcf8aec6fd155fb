"""Who may talk to the server: a Host allow-list, same-origin browsers only, bounded request bodies.

* **Host.** A web page can point a domain of its own at 127.0.0.1 (DNS rebinding) and then drive
  the local app as if it were the same site; the ``Host`` header still names that domain. So only
  loopback names, IP literals (rebinding needs a name), the host the app was started with, the
  Space's own domain (``SPACE_HOST``) and ``VL2_ALLOWED_HOSTS`` are served.
* **Origin.** Gradio's CORS answers any ``http://localhost:*`` page (and any page at all once the
  Host is not a loopback name). A browser request from another origin is refused here; clients
  that are not browsers send no ``Origin`` and are not affected. ``VL2_ALLOWED_ORIGINS`` adds more.
* **Body size.** A JSON body is parsed whole before any of our checks run; it is capped at 4 MB.
  An upload may carry one message's files (Gradio's ``max_file_size`` bounds each file, not their
  number).
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

from starlette.middleware import Middleware

from model.environment import read

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
ALL_INTERFACES = ("0.0.0.0", "::", "")
MAX_JSON_BODY_BYTES = 4 * 2**20
UPLOAD_PATH = "/gradio_api/upload"


def default_host() -> str:
    """``GRADIO_SERVER_NAME`` when set (Spaces set 0.0.0.0), else loopback only."""
    return os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1"


def _split_list(value: str | None) -> list[str]:
    return [item.strip().lower() for item in (value or "").split(",") if item.strip()]


def _host_only(host_header: str) -> str:
    """``example.com:7860`` → ``example.com``; ``[::1]:7860`` → ``::1``."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class AccessPolicy:
    hosts: tuple[str, ...]  # exact names, or "*.domain" for its sub-domains, or "*" for any
    origins: tuple[str, ...] = ()  # extra origins ("https://example.com"), besides the same origin
    max_body_bytes: int = MAX_JSON_BODY_BYTES
    max_upload_bytes: int = 8 * 50 * 2**20  # one message's images at the largest upload size

    @classmethod
    def for_launch(
        cls,
        host: str,
        *,
        share: bool = False,
        max_upload_bytes: int | None = None,
        environ: MutableMapping[str, str] | None = None,
    ) -> AccessPolicy:
        """The policy for serving on ``host``, from the environment (Spaces' ``SPACE_HOST``, ``VL2_ALLOWED_*``)."""
        environ = os.environ if environ is None else environ
        hosts = list(LOOPBACK_NAMES)
        if host.lower() not in ALL_INTERFACES:
            hosts.append(host.lower())
        else:  # reachable by this machine's own name on the network
            hosts += [socket.gethostname().lower(), socket.getfqdn().lower()]
        if environ.get("SPACE_HOST"):
            hosts.append(environ["SPACE_HOST"].lower())
        if share:
            hosts.append("*.gradio.live")
        hosts += _split_list(read("VL2_ALLOWED_HOSTS", environ=environ))
        origins = tuple(o.rstrip("/") for o in _split_list(read("VL2_ALLOWED_ORIGINS", environ=environ)))
        policy = cls(tuple(dict.fromkeys(hosts)), origins)
        return policy if max_upload_bytes is None else replace(policy, max_upload_bytes=max_upload_bytes)

    def body_limit(self, path: str) -> int:
        """Uploads (multipart) may carry one message's files; everything else is JSON."""
        return self.max_upload_bytes if path.endswith(UPLOAD_PATH) else self.max_body_bytes

    def host_allowed(self, host_header: str) -> bool:
        host = _host_only(host_header)
        if not host:
            return False
        if _is_ip(host):
            return True
        for allowed in self.hosts:
            if allowed == "*" or host == allowed:
                return True
            if allowed.startswith("*.") and host.endswith(allowed[1:]):
                return True
        return False

    def origin_allowed(self, origin: str, host_header: str) -> bool:
        origin = origin.strip().lower().rstrip("/")
        if origin in self.origins or "*" in self.origins:
            return True
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return False  # "null" (sandboxed frames, local files) and anything else odd
        # Same origin: the page was served by this very host and port (a port left out is the
        # scheme's default, on both sides).
        default = 443 if parts.scheme == "https" else 80
        served = urlsplit(f"{parts.scheme}://{host_header.strip().lower()}")
        try:
            return (parts.hostname, parts.port or default) == (served.hostname, served.port or default)
        except ValueError:  # a malformed port
            return False


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


async def _refuse(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class AccessGuard:
    """ASGI middleware enforcing an :class:`AccessPolicy` (add it with ``launch(app_kwargs=...)``)."""

    def __init__(self, app: ASGIApp, policy: AccessPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        host = headers.get("host", "")
        if not self.policy.host_allowed(host):
            if scope["type"] == "http":
                await _refuse(
                    send,
                    400,
                    f"Host {host!r} is not served here. Open the app by an allowed name, or start it with "
                    "VL2_ALLOWED_HOSTS=<that name>.",
                )
            return
        origin = headers.get("origin")
        if origin is not None and not self.policy.origin_allowed(origin, host):
            if scope["type"] == "http":
                await _refuse(send, 403, "Cross-origin requests are not accepted (see VL2_ALLOWED_ORIGINS).")
            return
        if scope["type"] == "http":
            await self._bounded(scope, headers, receive, send)
            return
        await self.app(scope, receive, send)

    async def _bounded(self, scope: Scope, headers: dict[str, str], receive: Receive, send: Send) -> None:
        """Run the request with its body capped: a declared length at once, a chunked body as it arrives."""
        limit = self.policy.body_limit(scope.get("path", ""))
        message = f"The request body is above the {limit / 2**20:.0f} MB this route accepts."
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await _refuse(send, 413, message)
            return
        seen, over = 0, False

        async def capped_receive() -> Message:
            nonlocal seen, over
            received = await receive()
            if received["type"] == "http.request":
                seen += len(received.get("body", b""))
                if seen > limit:
                    over = True
                    return {"type": "http.disconnect"}  # the app stops reading and answers
            return received

        async def answer(sent: Message) -> None:
            if not over:
                await send(sent)
            elif sent["type"] == "http.response.start":  # whatever the app says, the client reads why
                await _refuse(send, 413, message)

        await self.app(scope, capped_receive, answer)


def middleware(policy: AccessPolicy) -> list[Middleware]:
    """``launch(app_kwargs={"middleware": middleware(policy)})``."""
    return [Middleware(AccessGuard, policy=policy)]
