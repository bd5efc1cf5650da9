"""One error hierarchy, mapped to HTTP in one place.

Domain code raises an :class:`AppError` subclass; :func:`install_error_handlers` turns it, and the
framework's own errors (validation, unknown route, body too large, database down), into the single
JSON shape ``{"error": {"code", "message", "details", "request_id"}}``.
"""

from __future__ import annotations

import errno
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.engine.errors import EngineInputError
from service.request_context import current_request_id

log = logging.getLogger("centroid.errors")
RETRY_AFTER_SECONDS = 5


class AppError(Exception):
    """Base of every error Centroid reports to clients."""

    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, *, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidInput(AppError):
    """The request is well-formed but its content cannot be used."""

    status_code = 400
    code = "invalid_input"


class Unauthorized(AppError):
    status_code = 401
    code = "unauthorized"


class Forbidden(AppError):
    status_code = 403
    code = "forbidden"


class NotFound(AppError):
    status_code = 404
    code = "not_found"


class NotAcceptable(AppError):
    status_code = 406
    code = "not_acceptable"


class Conflict(AppError):
    """The resource's current state forbids the operation (name taken, still in use, ...)."""

    status_code = 409
    code = "conflict"


class PayloadTooLarge(AppError):
    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaType(AppError):
    status_code = 415
    code = "unsupported_media_type"


class RequestValidationFailed(AppError):
    """The request does not match the documented schema."""

    status_code = 422
    code = "validation_error"


class ServiceUnavailable(AppError):
    status_code = 503
    code = "service_unavailable"


class InsufficientStorage(AppError):
    status_code = 507
    code = "insufficient_storage"


_HTTP_STATUS_TO_ERROR: dict[int, type[AppError]] = {
    cls.status_code: cls
    for cls in (
        InvalidInput,
        Unauthorized,
        Forbidden,
        NotFound,
        NotAcceptable,
        Conflict,
        PayloadTooLarge,
        UnsupportedMediaType,
        RequestValidationFailed,
        ServiceUnavailable,
    )
}


def storage_error(exc: OSError, what: str) -> AppError:
    """Translate an OS error from the artifact directory into a client-facing error."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientStorage(f"no space left in the artifact store while writing {what}")
    return ServiceUnavailable(f"the artifact store failed while writing {what}: {exc.strerror or exc}")


def error_body(code: str, message: str, details: Any = None, request_id: str | None = None) -> dict[str, Any]:
    return {
        "error": {
            "code": code,
            "message": message,
            "details": jsonable_encoder(details),
            "request_id": request_id or current_request_id(),
        }
    }


def _as_app_error(exc: Exception) -> AppError:
    """Map any exception reaching the edge onto the hierarchy."""
    if isinstance(exc, AppError):
        return exc
    if isinstance(exc, RequestValidationError):
        details = [
            {"loc": list(err.get("loc", ())), "msg": err.get("msg", ""), "type": err.get("type", "")}
            for err in exc.errors()
        ]
        return RequestValidationFailed("the request does not match the API schema", details=details)
    if isinstance(exc, StarletteHTTPException):
        cls = _HTTP_STATUS_TO_ERROR.get(exc.status_code, AppError)
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


async def handle_error(request: Request, exc: Exception) -> JSONResponse:
    """The one handler: every error leaves the service through here."""
    error = _as_app_error(exc)
    if error.status_code >= 500:
        log.error("request failed: %s", error.message, exc_info=exc if error is not exc else None)
    headers = dict(getattr(exc, "headers", None) or {})
    # Unhandled errors are answered outside the request-id middleware: take the id from the scope.
    request_id = current_request_id() or request.scope.get("state", {}).get("request_id")
    if request_id and not current_request_id():
        headers["x-request-id"] = request_id
    if error.status_code == 503:
        headers.setdefault("retry-after", str(RETRY_AFTER_SECONDS))
    return JSONResponse(
        status_code=error.status_code,
        content=error_body(error.code, error.message, error.details, request_id),
        headers=headers,
    )


def install_error_handlers(app: FastAPI) -> None:
    for exc_type in (
        AppError,
        RequestValidationError,
        StarletteHTTPException,
        DBAPIError,
        PoolTimeoutError,
        EngineInputError,
        Exception,
    ):
        app.add_exception_handler(exc_type, handle_error)
