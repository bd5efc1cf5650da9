"""The error hierarchy (:mod:`service.errors`) mapped to HTTP, in one place.

Domain code raises an :class:`AppError` subclass; :func:`install_error_handlers` turns it, and the
framework's own errors (validation, unknown route, body too large, database down), into the single
JSON shape ``{"error": {"code", "message", "details", "request_id"}}``.

Two kinds of failure are not the server's:

* a client that goes away before sending its whole body (or is cut off by the body timeout of
  ``service.http_limits``) is logged at INFO and counted as 499 (408 when timed out), without a
  traceback; nobody is left to read an answer;
* an ``OverflowError`` (a number beyond the range of a float or a 64-bit integer reaching
  arithmetic or the database) is a 400 ``invalid_input``, logged as a warning with where it
  happened, never a 500.

Every line logged here carries the request id, also for errors answered outside the middleware
that sets it (Starlette's ``ServerErrorMiddleware`` wraps everything).

**AWS SDK clients** (a boto3 ``sagemaker-runtime`` client, the SageMaker SDK): a request that is
SigV4-signed or carries ``amz-sdk-invocation-id`` (every AWS SDK sends it) is marked by the edge
middleware (``scope["state"]["aws_client"]``) and its errors are answered as SageMaker Runtime
answers them (:func:`aws_error_response`): the code in ``x-amzn-ErrorType``, ``Message`` in the body,
``ModelError`` (424, ``OriginalStatusCode``, ``OriginalMessage``) for a payload the model refuses,
``ValidationError`` (400) for an unknown endpoint; the body also holds Centroid's ``error`` object.
Every other client gets the one JSON shape above, unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import re
import traceback
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import iter_route_contexts
from sqlalchemy.exc import DataError, DBAPIError, OperationalError, StatementError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.routing import compile_path

from service.engine.errors import EngineInputError
from service.error_body import error_body
from service.errors import (
    ERROR_BY_STATUS,
    AppError,
    InvalidInput,
    RequestValidationFailed,
    ServiceUnavailable,
)
from service.request_context import (
    CLIENT_TIMED_OUT,
    current_request_id,
    reset_request_id,
    scope_request_id,
    set_request_id,
)

log = logging.getLogger("centroid.errors")
RETRY_AFTER_SECONDS = 5
#: Status recorded (access log, metrics) for a request whose client went away before sending its
#: whole body: nginx's "client closed request". Nothing is sent: the connection is gone.
CLIENT_CLOSED_REQUEST = 499
#: Status recorded when the server cut the request because its body did not arrive in time.
REQUEST_TIMEOUT = 408
#: ``scope["state"]`` key set (by ``service.middleware.EdgeMiddleware``) on a request from an AWS SDK.
AWS_CLIENT = "aws_client"
# SageMaker Runtime's operations (InvokeEndpoint, InvokeEndpointAsync, InvokeEndpointWithResponseStream).
_RUNTIME_PATH = re.compile(r"^/endpoints/[^/]+/(invocations|async-invocations|invocations-response-stream)$")


def _client_disconnect(exc: Exception) -> ClientDisconnect | None:
    """The client's disconnect behind ``exc``: raised by Starlette while reading the body, or wrapped
    by FastAPI into a 400 "error parsing the body" when it parses the body itself."""
    if isinstance(exc, ClientDisconnect):
        return exc
    if isinstance(exc, StarletteHTTPException) and isinstance(exc.__cause__, ClientDisconnect):
        return exc.__cause__
    return None


def _overflow(exc: Exception) -> OverflowError | None:
    """The ``OverflowError`` behind ``exc``: raised directly, or wrapped by SQLAlchemy when a driver
    cannot bind a value (SQLite: "Python int too large to convert to SQLite INTEGER")."""
    if isinstance(exc, OverflowError):
        return exc
    if isinstance(exc, StatementError) and isinstance(exc.orig, OverflowError):
        return exc.orig
    return None


def _where(exc: BaseException) -> str:
    """``file:line in function`` of the frame that raised ``exc`` (for a log line without a traceback)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "unknown"
    frame = frames[-1]
    return f"{frame.filename}:{frame.lineno} in {frame.name}"


def _as_app_error(exc: Exception) -> AppError:
    """Map any exception reaching the edge onto the hierarchy."""
    if isinstance(exc, AppError):
        return exc
    overflow = _overflow(exc)
    if overflow is not None:
        return InvalidInput(
            "a number in the request is too large to be used (beyond the range of a 64-bit float or integer)",
            details={"reason": str(overflow)},
        )
    if isinstance(exc, RequestValidationError):
        details = [
            {"loc": list(err.get("loc", ())), "msg": err.get("msg", ""), "type": err.get("type", "")}
            for err in exc.errors()
        ]
        return RequestValidationFailed("the request does not match the API schema", details=details)
    if isinstance(exc, StarletteHTTPException):
        cls = ERROR_BY_STATUS.get(exc.status_code, AppError)
        error = cls(str(exc.detail))
        if cls is AppError:
            error.status_code = exc.status_code
            error.code = "http_error"
        return error
    if isinstance(exc, EngineInputError):  # data the engine cannot use, e.g. values whose squares overflow
        return InvalidInput(str(exc))
    if isinstance(exc, DataError):  # e.g. PostgreSQL refusing a NUL character in a name or path parameter
        return InvalidInput("the request holds a value the database cannot store or compare (e.g. a NUL character)")
    if isinstance(exc, OperationalError | PoolTimeoutError) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    ):
        return ServiceUnavailable("the database is unavailable or busy; retry shortly")
    return AppError("internal server error")


async def handle_error(request: Request, exc: Exception) -> Response:
    """The one handler: every error leaves the service through here."""
    # Unhandled errors are answered outside the request-id middleware, which has reset the id by
    # then: take it from the scope, and set it again while logging so the log lines carry it.
    outside = current_request_id() is None
    request_id = scope_request_id(request.scope) if outside else current_request_id()
    token = set_request_id(request_id) if outside and request_id else None
    try:
        if _client_disconnect(exc) is not None:
            return _client_gone(request)
        return _error_response(request, exc, request_id, outside)
    finally:
        if token is not None:
            reset_request_id(token)
        if outside:  # Starlette re-raises it to the server after this answer: dealt with here
            _mark_logged(exc)


def _client_gone(request: Request) -> Response:
    """The client closed the connection (or was cut off) before sending its whole body: not a server
    error. The status only reaches the access log and the metrics; the response is never sent."""
    if request.scope.get("state", {}).get(CLIENT_TIMED_OUT):
        return Response(status_code=REQUEST_TIMEOUT)  # service.http_limits logged it and answered the client
    log.info(
        "client disconnected before sending the whole request body: %s %s",
        request.method,
        request.scope.get("path", ""),
        extra={"status": CLIENT_CLOSED_REQUEST},
    )
    return Response(status_code=CLIENT_CLOSED_REQUEST)


def _error_response(request: Request, exc: Exception, request_id: str | None, outside: bool) -> JSONResponse:
    error = _as_app_error(exc)
    method, path = request.method, request.scope.get("path", "")
    if error.status_code >= 500:
        log.error(
            "request failed: %s %s: %s",
            method,
            path,
            error.message,
            exc_info=exc if error is not exc else None,
        )
    elif _overflow(exc) is not None:
        log.warning("number out of range in %s %s (400): %s at %s", method, path, exc, _where(exc))
    headers = dict(getattr(exc, "headers", None) or {})
    if error.status_code == 405:
        allow = allowed_methods(request)
        if allow:  # replaces Starlette's, which names only the first matching route's methods
            headers = {key: value for key, value in headers.items() if key.lower() != "allow"}
            headers["allow"] = ", ".join(allow)
    if request_id and outside:
        headers["x-request-id"] = request_id
    if error.status_code == 503:
        headers.setdefault("retry-after", str(RETRY_AFTER_SECONDS))
    if request.scope.get("state", {}).get(AWS_CLIENT):
        return aws_error_response(path, error, request_id, headers)
    return JSONResponse(
        status_code=error.status_code,
        content=error_body(error.code, error.message, error.details, request_id),
        headers=headers,
    )


def allowed_methods(request: Request) -> list[str]:
    """The methods served at the request's path, for the ``Allow`` header of a 405 (RFC 9110).

    Starlette answers a method mismatch with the methods of the *first* route whose path matches,
    and each method of a path is a route of its own here, so that list would be incomplete: this
    one unites every route of the path. Where a concrete path and a templated one both match
    (``/datasets/s3`` and ``/datasets/{dataset_id}``), the concrete one is the path, as OpenAPI
    matches URLs."""
    path = request.scope.get("path", "")
    root_path = request.scope.get("root_path", "")
    if root_path and path.startswith(root_path):
        path = path[len(root_path) :]
    by_template: dict[str, set[str]] = {}
    for route in iter_route_contexts(request.app.routes):
        if route.path and route.methods and compile_path(route.path)[0].match(path):
            by_template.setdefault(route.path, set()).update(route.methods)
    if not by_template:
        return []
    fewest = min(template.count("{") for template in by_template)
    return sorted({m for t, methods in by_template.items() if t.count("{") == fewest for m in methods})


def sagemaker_error(path: str, error: AppError) -> tuple[int, str, dict[str, Any]]:
    """The status, AWS error code and modelled fields SageMaker Runtime answers ``error`` with."""
    aws_code: str | None = getattr(error, "aws_code", None)
    status = error.status_code
    if aws_code is not None:  # a refused signature (service.auth.SignatureRefused)
        return 403, aws_code, {}
    if status == 401:
        return 403, "MissingAuthenticationTokenException", {}
    if status == 403:
        return 403, "AccessDeniedException", {}
    if status == 503:
        return 503, "ServiceUnavailable", {}
    if status >= 500:
        return 500, "InternalFailure", {}
    if _RUNTIME_PATH.match(path):
        if status in (404, 409):  # no such endpoint, or not InService
            return 400, "ValidationError", {}
        # What the model (the container, in SageMaker) refused: the payload, its type, what to answer.
        return (
            424,
            "ModelError",
            {
                "Message": f'Received client error ({status}) from model with message "{error.message}".',
                "OriginalStatusCode": status,
                "OriginalMessage": error.message,
            },
        )
    return status, "ValidationError", {}


def aws_error_response(
    path: str, error: AppError, request_id: str | None, headers: dict[str, str] | None = None
) -> JSONResponse:
    """``error`` in the shape botocore's rest-json parser reads (see :func:`sagemaker_error`): the code
    in ``x-amzn-ErrorType``, ``Message`` and the modelled fields in the body, the request id in
    ``x-amzn-RequestId``; Centroid's own ``error`` object rides along in the body."""
    status, code, fields = sagemaker_error(path, error)
    request_id = request_id or current_request_id()
    answer = {key: value for key, value in (headers or {}).items() if key.lower() != "www-authenticate"}
    answer["x-amzn-errortype"] = code
    if request_id:
        answer["x-amzn-requestid"] = request_id
    body = {"Message": error.message, **fields, **error_body(error.code, error.message, error.details, request_id)}
    return JSONResponse(body, status_code=status, headers=answer)


_LOGGED = "_centroid_logged"


def _mark_logged(exc: BaseException) -> None:
    """Remember that :func:`handle_error` answered ``exc`` (and logged it, with the request id, if it
    was a server error)."""
    with contextlib.suppress(AttributeError):  # a type without a __dict__: uvicorn logs it once more
        setattr(exc, _LOGGED, True)


class _AlreadyLogged(logging.Filter):
    """Drops uvicorn's "Exception in ASGI application" line for an exception :func:`handle_error`
    already answered (and, for a 500, logged with its traceback and request id). Starlette's
    ``ServerErrorMiddleware`` re-raises after answering, so the server would log it again, without
    the request id."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not getattr(exc, _LOGGED, False)


def install_error_handlers(app: FastAPI) -> None:
    # Every type but ``Exception`` is answered inside the middleware stack (request id set, the
    # answer's status counted); ``Exception`` is Starlette's last resort, outside it.
    for exc_type in (
        AppError,
        RequestValidationError,
        StarletteHTTPException,
        StatementError,  # DBAPIError and the errors a driver raised while binding a value
        PoolTimeoutError,
        EngineInputError,
        OverflowError,
        ClientDisconnect,
        Exception,
    ):
        app.add_exception_handler(exc_type, handle_error)
    server_log = logging.getLogger("uvicorn.error")
    if not any(isinstance(existing, _AlreadyLogged) for existing in server_log.filters):
        server_log.addFilter(_AlreadyLogged())
