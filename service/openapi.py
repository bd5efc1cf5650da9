"""The OpenAPI document: FastAPI's, made to describe every response the app really sends."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service.auth import document_security

ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
BODY_ERRORS = {
    "400": "The body cannot be decoded or parsed",
    "413": "Request body larger than the configured limit",
    "415": "Unsupported Content-Type, or a compressed body (Content-Encoding is not supported)",
    "422": "Request does not match the schema",
}
ALWAYS = {"500": "Internal error", "503": "Database unavailable"}


def build_openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for operation in _operations(schema):
            _errors_are_json(operation)
            _declare_generic_errors(operation)
        app.openapi_schema = document_security(schema)
    return app.openapi_schema


def _operations(schema: dict[str, Any]) -> list[dict[str, Any]]:
    return [operation for path_item in schema.get("paths", {}).values() for operation in path_item.values()]


def _errors_are_json(operation: dict[str, Any]) -> None:
    """Errors are always JSON, even on operations whose success is CSV or a file."""
    for status, response in operation.get("responses", {}).items():
        if status.startswith(("4", "5")) and "content" in response:
            response["content"] = {"application/json": {"schema": ERROR_REF}}


def _declare_generic_errors(operation: dict[str, Any]) -> None:
    """Errors any operation can meet: a bad body (when it takes one), an outage, a bug."""
    responses = operation.setdefault("responses", {})
    generic = {**ALWAYS, **(BODY_ERRORS if "requestBody" in operation else {})}
    for status, description in generic.items():
        responses.setdefault(
            status, {"description": description, "content": {"application/json": {"schema": ERROR_REF}}}
        )
