"""HTTP hygiene around every route, as pure ASGI middleware: HEAD answered as GET without a body,
a trailing slash redirected to a relative path (never echoing the Host header), over-long URLs
refused with 414, security headers on every response, and long cache lives for versioned static
files."""

from __future__ import annotations

from urllib.parse import parse_qs

from starlette.datastructures import MutableHeaders
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
    def __init__(self, app: ASGIApp, error_response) -> None:
        self.app = app
        self.error_response = error_response
        """(scope, status, message) → an ASGI response in the documented error shape"""

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
        if len(raw_path) + len(query) > MAX_URL_LENGTH:
            message = f"the URL is longer than {MAX_URL_LENGTH} characters"
            await self.error_response(scope, 414, message)(scope, receive, send)
        elif raw_path != b"/" and raw_path.endswith(b"/"):
            # One leading slash only: browsers read `//host` and `/\host` as another origin.
            local = b"/" + raw_path.rstrip(b"/").lstrip(b"/\\")
            await _redirect(local + (b"?" + query if query else b""), send)
        else:
            await self.app(scope, receive, send)


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
