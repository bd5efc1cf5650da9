"""The one JSON shape of every error answer, ``{"error": {"code", "message", "details",
"request_id"}}``: built here, with no web framework, so a stream that fails half-way (written by
:mod:`service.streaming`) ends with the same body an HTTP error handler sends."""

from __future__ import annotations

from typing import Any

from pydantic_core import to_jsonable_python

from service.request_context import current_request_id


def error_body(code: str, message: str, details: Any = None, request_id: str | None = None) -> dict[str, Any]:
    return {
        "error": {
            "code": code,
            "message": message,
            "details": to_jsonable_python(details, fallback=str),
            "request_id": request_id or current_request_id(),
        }
    }
