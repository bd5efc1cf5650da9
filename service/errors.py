"""One error hierarchy for the whole service, free of any framework.

Domain code, the engine's callers, storage and the workers raise an :class:`AppError` subclass;
each carries the HTTP status and the stable ``code`` clients see. The web layer maps them (and the
framework's own errors) to responses in one place: :mod:`service.http_errors`.
"""

from __future__ import annotations

import errno
from typing import Any


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


class NotConfigured(Conflict):
    """The request needs a backend (SageMaker) or a service (S3) this server has no settings for: a
    conflict with the server's state, not a fault in the request (400) nor an outage (503: retrying
    does not help until an operator configures it). 409 with code ``not_configured``; the message
    names the missing settings. Documented on the operations that can meet it."""

    code = "not_configured"


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


ERROR_BY_STATUS: dict[int, type[AppError]] = {
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
