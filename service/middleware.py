"""The edge of every request, as one pure ASGI middleware that costs microseconds.

In one pass over the request headers it:

* assigns the request id (``X-Request-ID`` if sane, else a new one) and echoes it;
* checks the API key (before any of the body is read): 401/403;
* refuses compressed bodies (415) and bodies over the size limit (413: a declared
  ``Content-Length`` before reading, a longer streamed body while reading); CSV uploads to
  ``POST /datasets`` (streamed to disk) have their own, larger limit;
* after the response, writes one access log line (method, path, status, duration, request id)
  and counts the request in the metrics by route template.

Everything is plain ASGI (no ``BaseHTTPMiddleware``, no Request objects): it sits on the hot
paths (invocations, predictions, assignments, health) and must not cost more than the work.
"""

from __future__ import annotations

import itertools
import os
import time

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.auth import Authenticator
from service.error_body import error_body
from service.errors import Forbidden, Unauthorized
from service.logging_setup import AccessLog
from service.metrics import Metrics
from service.request_context import reset_request_id, set_request_id

REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID = REQUEST_ID_HEADER.encode()
_MAX_REQUEST_ID = 128
_NOSNIFF = (b"x-content-type-options", b"nosniff")  # no response is to be sniffed into another type
TOO_LARGE_MESSAGE = "the request body is larger than the configured limit"


class RequestIds:
    """Unique request ids without a system call per request: 32 hex digits, a random per-process
    prefix (64 bits keep processes and restarts apart) and a counter."""

    def __init__(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count(1)

    def new(self) -> str:
        return f"{self._prefix}{next(self._counter):016x}"


def _sane_request_id(value: bytes) -> str | None:
    text = value.decode("latin-1").strip()
    return text if 0 < len(text) <= _MAX_REQUEST_ID and text.isprintable() else None


class EdgeMiddleware:
    """Request id, API key, body limits, access log and metrics (see the module docstring)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: Metrics,
        authenticator: Authenticator,
        max_bytes: int,
        max_csv_bytes: int | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.authenticator = authenticator
        self.max_bytes = max_bytes
        self.max_csv_bytes = max_bytes if max_csv_bytes is None else max_csv_bytes
        self.ids = RequestIds()
        self.access_log = AccessLog()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id: str | None = None
        authorization: str | None = None
        declared = 0
        has_body = False
        encodings: list[str] = []
        csv_upload = False
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                has_body = has_body or declared > 0
            elif name == b"authorization":
                authorization = value.decode("latin-1")
            elif name == _REQUEST_ID:
                request_id = _sane_request_id(value)
            elif name == b"transfer-encoding":
                has_body = True
            elif name == b"content-encoding":
                encodings.extend(token.strip().lower() for token in value.decode("latin-1").split(","))
            elif name == b"content-type":
                csv_upload = _is_csv_upload(scope, value)
        limit = self.max_csv_bytes if csv_upload else self.max_bytes
        request_id = request_id or self.ids.new()
        token = set_request_id(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500
        encoded_id = request_id.encode("latin-1")

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (_REQUEST_ID, encoded_id), _NOSNIFF]
            await send(message)

        try:
            rejection = self._rejection(scope, authorization, declared, has_body, encodings, limit)
            if rejection is not None:
                await rejection(scope, receive, send_with_id)
            else:
                await self.app(scope, self._limited(receive, limit), send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.observe_request(scope["method"], route, status, elapsed)
            self.access_log.write(scope["method"], scope["path"], status, elapsed)
            reset_request_id(token)

    def _rejection(
        self,
        scope: Scope,
        authorization: str | None,
        declared: int,
        has_body: bool,
        encodings: list[str],
        limit: int,
    ) -> JSONResponse | None:
        """The response refusing this request before its body is read, if it must be refused."""
        if self.authenticator.enabled:
            try:
                entry = self.authenticator.check(scope["method"], scope["path"], authorization)
            except (Unauthorized, Forbidden) as error:
                extra = {"www-authenticate": "Bearer"} if isinstance(error, Unauthorized) else {}
                return JSONResponse(error_body(error.code, error.message), status_code=error.status_code, headers=extra)
            if entry is not None:
                scope["state"]["api_key"] = entry.name
        # Centroid never decompresses a request body: a gzip upload would reach the parsers as
        # binary, and decompressing would let a few kilobytes expand past the size limit.
        # Compressed *files* (a model.tar.gz as a multipart part) are not affected.
        unsupported = [token for token in encodings if token not in ("", "identity")]
        if has_body and unsupported:
            body = error_body(
                "unsupported_media_type",
                f"Content-Encoding {', '.join(unsupported)!r} is not supported: send the request body uncompressed",
                {"content_encoding": unsupported},
            )
            headers = {"accept-encoding": "identity", "connection": "close"}
            return JSONResponse(body, status_code=415, headers=headers)
        if declared > limit:
            body = error_body("payload_too_large", TOO_LARGE_MESSAGE, {"limit_bytes": limit})
            return JSONResponse(body, status_code=413, headers={"connection": "close"})
        return None

    def _limited(self, receive: Receive, limit: int) -> Receive:
        """``receive`` that stops a streamed body once it exceeds the limit (the handler sees 413)."""
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise HTTPException(status_code=413, detail=TOO_LARGE_MESSAGE)
            return message

        return limited_receive


_CSV_UPLOAD_TYPES = (b"multipart/form-data", b"text/csv")


def _is_csv_upload(scope: Scope, content_type: bytes) -> bool:
    """A CSV upload to ``POST /datasets``, which streams to disk and has its own size limit."""
    if scope["method"] != "POST" or scope["path"].rstrip("/") != "/datasets":
        return False
    media = content_type.split(b";", 1)[0].strip().lower()
    return media in _CSV_UPLOAD_TYPES
