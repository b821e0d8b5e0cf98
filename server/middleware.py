"""HTTP hygiene around every route, as pure ASGI middleware: HEAD answered as GET without a body,
a trailing slash redirected to a relative path (never echoing the Host header), over-long URLs
refused with 414, security headers on every response, long cache lives for versioned static
files; and request bodies bounded, the write token checked before a body is read."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qs

from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Longest path plus query string a request may have; beyond, 414 URI Too Long.
MAX_URL_LENGTH = 8192
# What the pages may load: their own scripts only (no inline script), styles inline as plotly
# sets them, nothing framed.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; object-src 'none'; "
    "base-uri 'self'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "referrer-policy": "same-origin",
}
VERSIONED_CACHE = "public, max-age=31536000, immutable"


class HttpHygiene:
    def __init__(self, app: ASGIApp, error_response, hosts: frozenset[str] | None) -> None:
        self.app = app
        self.error_response = error_response
        """(scope, status, message) → an ASGI response in the documented error shape"""
        self.hosts = hosts
        """the Host names answered; None: any"""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw_path = scope.get("raw_path") or scope["path"].encode()
        query = scope.get("query_string", b"")
        head = scope["method"] == "HEAD"
        if head:
            scope = {**scope, "method": "GET"}
        send = _with_headers(send, scope, query.decode("latin-1"), drop_body=head)
        host = _host_name(Headers(scope=scope).get("host", ""))
        if self.hosts is not None and host not in self.hosts:
            message = f"this server does not answer to the host {host[:100]!r}"
            await self.error_response(scope, 400, message)(scope, receive, send)
        elif len(raw_path) + len(query) > MAX_URL_LENGTH:
            message = f"the URL is longer than {MAX_URL_LENGTH} characters"
            await self.error_response(scope, 414, message)(scope, receive, send)
        elif raw_path != b"/" and raw_path.endswith(b"/"):
            # One leading slash only: browsers read `//host` and `/\host` as another origin.
            local = b"/" + raw_path.rstrip(b"/").lstrip(b"/\\")
            await _redirect(local + (b"?" + query if query else b""), send)
        else:
            await self.app(scope, receive, send)


def _host_name(header: str) -> str:
    """The Host header's name, without its port, in lower case (`[::1]:80` → `::1`)."""
    if header.startswith("["):
        return header[1 : header.find("]")].lower()
    return header.rpartition(":")[0].lower() if ":" in header else header.lower()


def _with_headers(send: Send, scope: Scope, query: str, drop_body: bool) -> Send:
    versioned = scope["path"].startswith("/static/") and "v" in parse_qs(query)

    async def send_with_headers(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = MutableHeaders(scope=message)
            for name, value in SECURITY_HEADERS.items():
                headers.setdefault(name, value)
            if versioned and message["status"] == 200:
                headers["cache-control"] = VERSIONED_CACHE
        elif message["type"] == "http.response.body" and drop_body:
            message = {**message, "body": b""}
        await send(message)

    return send_with_headers


async def _redirect(location: bytes, send: Send) -> None:
    """A 307 to a path on this server: relative, so a forged Host header is never echoed."""
    await send(
        {
            "type": "http.response.start",
            "status": 307,
            "headers": [(b"location", location or b"/"), (b"content-length", b"0")],
        }
    )
    await send({"type": "http.response.body", "body": b""})


@dataclass(frozen=True)
class BodyLimit:
    """The largest body a route takes, and whether it needs the write token."""

    method: str
    path: str
    """the route's path template, parameters in braces"""
    max_bytes: int
    needs_token: bool = False

    def matches(self, method: str, path: str) -> bool:
        pattern = re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(self.path))
        return method == self.method and re.fullmatch(pattern, path) is not None


# A body sent to any other route is read up to this size (they ignore it).
OTHER_BODY_BYTES = 1024


class RequestBodies:
    """Each body bounded before it is read whole (413), and the write token checked before a
    write route's body is read at all (401/403), so no one without it can make the server parse
    anything. The body read is handed on to the app as it came."""

    def __init__(
        self,
        app: ASGIApp,
        limits: list[BodyLimit],
        check_token: Callable[[str | None], None],
        error_response,
    ) -> None:
        self.app = app
        self.limits = limits
        self.check_token = check_token
        """raises HTTPException (401, 403) unless the Authorization header given is the token"""
        self.error_response = error_response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = next(
            (rule for rule in self.limits if rule.matches(scope["method"], scope["path"])),
            BodyLimit(scope["method"], scope["path"], OTHER_BODY_BYTES),
        )
        headers = Headers(scope=scope)
        if limit.needs_token:
            try:
                self.check_token(headers.get("authorization"))
            except HTTPException as refused:
                response = self.error_response(scope, refused.status_code, refused.detail)
                response.headers.update(refused.headers or {})
                await response(scope, receive, send)
                return
        too_large = f"the request body is over {limit.max_bytes:,} bytes, this route's limit"
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit.max_bytes:
            await self.error_response(scope, 413, too_large)(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit.max_bytes:
                await self.error_response(scope, 413, too_large)(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)
