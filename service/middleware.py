"""The edge of every request, as one pure ASGI middleware that costs microseconds.

In one pass over the request headers it:

* assigns the request id (``X-Request-ID`` if sane, else a new one) and echoes it;
* checks the API key (before any of the body is read): 401/403. A SigV4-signed request (an AWS SDK
  using the key as its credentials, see :mod:`service.auth`) has its key, date and scope checked
  before the body is read too; when its signature covers the body, the body (within the size
  limit, and never more than ``max_bytes``) is read here and the signature verified before the
  application sees the request, which then gets the body as it was received;
* marks requests from AWS SDKs (SigV4-signed, or carrying ``amz-sdk-invocation-id``) so that their
  errors are answered in SageMaker Runtime's shape (:func:`service.http_errors.aws_error_response`);
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
from urllib.parse import quote

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.auth import SIGV4_SCHEME, Authenticator, SignedRequest
from service.error_body import error_body
from service.errors import Forbidden, PayloadTooLarge, Unauthorized, UnsupportedMediaType
from service.http_errors import AWS_CLIENT, CLIENT_CLOSED_REQUEST, REQUEST_TIMEOUT, aws_error_response
from service.logging_setup import AccessLog
from service.media_types import media_type
from service.metrics import Metrics
from service.request_context import CLIENT_TIMED_OUT, reset_request_id, set_request_id

REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID = REQUEST_ID_HEADER.encode()
_MAX_REQUEST_ID = 128
_NOSNIFF = (b"x-content-type-options", b"nosniff")  # no response is to be sniffed into another type
_AWS_SDK = b"amz-sdk-invocation-id"  # every AWS SDK sends it (botocore on every request)
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
        aws_client = False
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
            elif name == _AWS_SDK:
                aws_client = True
        limit = self.max_csv_bytes if csv_upload else self.max_bytes
        request_id = request_id or self.ids.new()
        token = set_request_id(request_id)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        signed = authorization is not None and authorization.startswith(SIGV4_SCHEME)
        if signed or aws_client:
            state[AWS_CLIENT] = True
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
            if signed and self.authenticator.enabled:
                gone = await self._signed(
                    scope, receive, send_with_id, authorization or "", declared, has_body, encodings
                )
                if gone is not None:
                    status = gone
            else:
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
                if scope["state"].get(AWS_CLIENT):
                    return aws_error_response(scope["path"], error, None)
                return JSONResponse(error_body(error.code, error.message), status_code=error.status_code, headers=extra)
            if entry is not None:
                scope["state"]["api_key"] = entry.name
        if not encodings and declared <= limit:  # the common case, without a call
            return None
        return self._body_rejection(scope, declared, has_body, encodings, limit)

    def _body_rejection(
        self, scope: Scope, declared: int, has_body: bool, encodings: list[str], limit: int
    ) -> JSONResponse | None:
        """Refusals that depend on the body's headers: its encoding and declared size."""
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
            if scope["state"].get(AWS_CLIENT):
                refused = UnsupportedMediaType(body["error"]["message"], details=body["error"]["details"])
                return aws_error_response(scope["path"], refused, None, headers)
            return JSONResponse(body, status_code=415, headers=headers)
        if declared > limit:
            if scope["state"].get(AWS_CLIENT):
                too_large = PayloadTooLarge(TOO_LARGE_MESSAGE, details={"limit_bytes": limit})
                return aws_error_response(scope["path"], too_large, None, {"connection": "close"})
            body = error_body("payload_too_large", TOO_LARGE_MESSAGE, {"limit_bytes": limit})
            return JSONResponse(body, status_code=413, headers={"connection": "close"})
        return None

    async def _signed(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        authorization: str,
        declared: int,
        has_body: bool,
        encodings: list[str],
    ) -> int | None:
        """A SigV4-signed request (API keys configured): checked, its body read and its signature
        verified, then handed on (see the module docstring). Returns the status to record when
        nothing could be sent (the client went away while sending the body)."""
        path = scope["path"]
        try:
            pending = self.authenticator.check_signed(scope["method"], path, authorization, scope["headers"])
        except (Unauthorized, Forbidden) as error:
            await aws_error_response(path, error, None)(scope, receive, send)
            return None
        # A body the signature covers is held in memory to be hashed: never more than max_bytes.
        limit = self.max_bytes
        rejection = self._body_rejection(scope, declared, has_body, encodings, limit)
        if rejection is not None:
            await rejection(scope, receive, send)
            return None
        if pending is None:  # an open path
            await self.app(scope, self._limited(receive, limit), send)
            return None
        body = b""
        if has_body and pending.needs_body:
            chunks: list[bytes] = []
            size = 0
            while True:
                message = await receive()
                if message["type"] != "http.request":  # the client went away (or was cut off)
                    return REQUEST_TIMEOUT if scope["state"].get(CLIENT_TIMED_OUT) else CLIENT_CLOSED_REQUEST
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    too_large = PayloadTooLarge(TOO_LARGE_MESSAGE, details={"limit_bytes": limit})
                    await aws_error_response(path, too_large, None, {"connection": "close"})(scope, receive, send)
                    return None
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
            body = b"".join(chunks)
        try:
            _verify(pending, scope, body)
        except Unauthorized as error:
            await aws_error_response(path, error, None)(scope, receive, send)
            return None
        scope["state"]["api_key"] = pending.entry.name
        read = has_body and pending.needs_body
        await self.app(scope, _replay(body, receive) if read else self._limited(receive, limit), send)
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


def _verify(pending: SignedRequest, scope: Scope, body: bytes) -> None:
    raw_path = scope.get("raw_path")
    path = raw_path.decode("latin-1") if raw_path else quote(scope["path"])
    query = scope.get("query_string", b"").decode("latin-1")
    pending.verify(scope["method"], path, query, scope["headers"], body)


def _replay(body: bytes, receive: Receive) -> Receive:
    """``receive`` that hands on the body already read (as one message), then continues with the client."""
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        if pending:
            return pending.pop()
        return await receive()

    return replay


_CSV_UPLOAD_TYPES = ("multipart/form-data", "text/csv")


def _is_csv_upload(scope: Scope, content_type: bytes) -> bool:
    """A CSV upload to ``POST /datasets``, which streams to disk and has its own size limit."""
    if scope["method"] != "POST" or scope["path"].rstrip("/") != "/datasets":
        return False
    return media_type(content_type) in _CSV_UPLOAD_TYPES
