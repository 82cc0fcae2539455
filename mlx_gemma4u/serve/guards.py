"""What every request passes before a route sees it, as plain ASGI middleware, outermost first:

    access log -> Host header check -> CORS (app.py, Starlette's) -> API key -> body size limit -> route

The Host check is what stops DNS rebinding (a web page whose own name now points at 127.0.0.1) from
reaching a server on this machine. CORS sits outside the key so that a browser's preflight, which
never carries the key, is answered. The key is compared in constant time. The body limit refuses a
declared length at once and counts a chunked body as it arrives, so an oversized body is never
held in memory.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import time
import urllib.parse
from collections.abc import Awaitable, Callable

from fastapi.responses import JSONResponse

ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]
access = logging.getLogger("mlx_gemma4u.serve.access")
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
OPEN_PATHS = {"/health", "/"}  # answered without the API key


def error_response(path: str, status: int, kind: str, message: str) -> JSONResponse:
    """An error in the shape of the API at `path` (Anthropic's for /v1/messages, else OpenAI's)."""
    if path == "/v1/messages":
        return JSONResponse({"type": "error", "error": {"type": kind, "message": message}}, status_code=status)
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}}, status_code=status)


def _header(scope: dict, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


class AccessLog:
    """One line per request: client, method, path, status, a reply's tokens in and out, seconds to
    the end of the response; and its count in the server's metrics."""

    def __init__(self, app: ASGIApp, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.monotonic(), [0]

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.request(scope["path"], status[0])
            client = scope.get("client") or ("-", 0)
            tokens = scope.get("state", {}).get("tokens")
            access.info(
                "%s:%s %s %s %s %s%.2f s",
                client[0],
                client[1],
                scope["method"],
                scope["path"],
                status[0] or "-",
                f"{tokens[0]} tokens in, {tokens[1]} out, " if tokens else "",
                time.monotonic() - start,
            )


class HostCheck:
    """Refuse a request whose Host header names none of `allowed` (None: any host)."""

    def __init__(self, app: ASGIApp, allowed: set[str] | None):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and self.allowed is not None:
            host = urllib.parse.urlsplit("//" + (_header(scope, b"host") or "")).hostname
            if host not in self.allowed:
                response = error_response(
                    scope["path"],
                    421,
                    "invalid_request_error",
                    "This server does not answer for that Host; start it with --allowed-hosts to name it.",
                )
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class ApiKey:
    """With a key: every path but /health and the chat page needs `Authorization: Bearer KEY` or
    `x-api-key: KEY` (the page asks for the key and sends it with its API calls)."""

    def __init__(self, app: ASGIApp, key: str | None):
        self.app, self.key = app, key.encode() if key else None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and self.key is not None and scope["path"] not in OPEN_PATHS:
            authorization = _header(scope, b"authorization") or ""
            given = [
                authorization[7:] if authorization.startswith("Bearer ") else "",
                _header(scope, b"x-api-key") or "",
            ]
            if not any(hmac.compare_digest(g.encode("latin-1"), self.key) for g in given):
                response = error_response(scope["path"], 401, "authentication_error", "Missing or wrong API key.")
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuse (413) a request body of more than `limit` bytes before it is held in memory."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _header(scope, b"content-length")
        if declared and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            size += len(message.get("body", b""))
            if size > self.limit:
                return await self._refuse(scope, receive, send)
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay() -> dict:
            return body.pop() if body else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: dict, receive: Callable, send: Callable) -> None:
        response = error_response(
            scope["path"],
            413,
            "invalid_request_error",
            f"The request body is larger than this server's limit of {self.limit / 1e6:g} MB (--max-request-mb).",
        )
        await response(scope, receive, send)


def allowed_hosts(bound: str, named: list[str]) -> frozenset[str] | None:
    """The Host names to answer: the bound address, localhost's names when it is loopback, and the
    named ones; None (any) for a wildcard bind with none named."""
    try:
        address = ipaddress.ip_address(bound)
    except ValueError:
        address = None
    wildcard = address is not None and address.is_unspecified
    if wildcard and not named:
        return None
    hosts = {h.lower() for h in named} | ({bound.lower()} if not wildcard else set())
    if bound == "localhost" or (address is not None and address.is_loopback):
        hosts |= LOOPBACK_NAMES
    return frozenset(hosts)
