"""ASGI middleware: request ids and access logs, and the request body size limit."""

from __future__ import annotations

import logging
import time
import uuid

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_body
from service.metrics import Metrics
from service.request_context import reset_request_id, set_request_id

REQUEST_ID_HEADER = "x-request-id"
_MAX_REQUEST_ID = 128
TOO_LARGE_MESSAGE = "the request body is larger than the configured limit"


def _incoming_request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", []):
        if name == REQUEST_ID_HEADER.encode():
            text = value.decode("latin-1").strip()
            if 0 < len(text) <= _MAX_REQUEST_ID and text.isprintable():
                return text
    return uuid.uuid4().hex


class RequestLogMiddleware:
    """Assign a request id (from ``X-Request-ID`` or new), echo it, log method/path/status/duration,
    and count the request in the metrics by route template (not raw path, which would explode)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        self.log = logging.getLogger("centroid.access")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _incoming_request_id(scope)
        token = set_request_id(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((REQUEST_ID_HEADER.encode(), request_id.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.observe_request(scope["method"], route, status, elapsed)
            self.log.info(
                "%s %s %s",
                scope["method"],
                scope["path"],
                status,
                extra={
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 2),
                },
            )
            reset_request_id(token)


class BodySizeLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with a 413 in the usual error shape.

    A declared Content-Length over the limit is refused before the body is read; a body that
    turns out longer while streaming stops the handler mid-read (it raises from ``receive``).
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if _declared_length(scope) > self.max_bytes:
            body = error_body("payload_too_large", TOO_LARGE_MESSAGE, {"limit_bytes": self.max_bytes})
            await JSONResponse(body, status_code=413, headers={"connection": "close"})(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(status_code=413, detail=TOO_LARGE_MESSAGE)
            return message

        await self.app(scope, limited_receive, send)


class ContentEncodingMiddleware:
    """Refuse compressed request bodies (``Content-Encoding`` other than ``identity``) with 415.

    Centroid never decompresses a request body: a gzip-encoded upload would otherwise reach the
    CSV/JSON parsers as binary and fail with a confusing error, and decompressing would let a few
    kilobytes expand to gigabytes past the body size limit. Compressed *files* (a model.tar.gz sent
    as a multipart part) are not affected.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _has_body(scope):
            encodings = [
                token.strip().lower()
                for name, value in scope.get("headers", [])
                if name == b"content-encoding"
                for token in value.decode("latin-1").split(",")
            ]
            unsupported = [token for token in encodings if token not in ("", "identity")]
            if unsupported:
                body = error_body(
                    "unsupported_media_type",
                    f"Content-Encoding {', '.join(unsupported)!r} is not supported: send the request body uncompressed",
                    {"content_encoding": unsupported},
                )
                headers = {"accept-encoding": "identity", "connection": "close"}
                await JSONResponse(body, status_code=415, headers=headers)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _has_body(scope: Scope) -> bool:
    headers = dict(scope.get("headers", []))
    return b"transfer-encoding" in headers or headers.get(b"content-length", b"0").strip() not in (b"0", b"")


def _declared_length(scope: Scope) -> int:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0
