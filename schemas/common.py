"""Shapes shared by every domain: the error body and pagination."""

from __future__ import annotations

from typing import Annotated, Any, Generic, TypeVar

from fastapi import Query
from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")
MAX_OFFSET = 2**31 - 1

OffsetQuery = Annotated[int, Query(ge=0, le=MAX_OFFSET, description="Items to skip.")]
LimitQuery = Annotated[int, Query(ge=1, le=500, description="Page size.")]


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable error code.", examples=["not_found"])
    message: str = Field(description="What went wrong, for humans.", examples=["dataset 'ds-1' not found"])
    details: Any = Field(default=None, description="Structured context (offending fields, rows, ...).")
    request_id: str | None = Field(default=None, description="Id of the request, as in X-Request-ID.")


class ErrorResponse(BaseModel):
    """Every error response has this body."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "error": {
                        "code": "invalid_input",
                        "message": "column 'Murder' is not numeric: row 3 holds 'n/a'",
                        "details": {"column": "Murder", "row": 3},
                        "request_id": "9f1c2e...",
                    }
                }
            ]
        }
    )
    error: ErrorDetail


class Page(BaseModel, Generic[T]):
    """One page of a listing."""

    items: list[T] = Field(description="The resources on this page.")
    total: int = Field(description="How many resources match, over all pages.", examples=[42])
    offset: int = Field(description="Index of the first item of this page.", examples=[0])
    limit: int = Field(description="Page size asked for.", examples=[50])


class HealthStatus(BaseModel):
    status: str = Field(description="`ok` when healthy.", examples=["ok"])
    checks: dict[str, str] = Field(
        default_factory=dict, description="Result of each readiness check.", examples=[{"database": "ok"}]
    )


def error_responses(*status_codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries declaring the error body for the given statuses."""
    descriptions = {
        400: "Invalid input",
        401: "Missing or wrong API key",
        403: "API key lacks the required scope",
        404: "Not found",
        406: "Cannot produce the requested Accept type",
        409: "Conflict with the resource's current state",
        413: "Request body or row count over the limit",
        415: "Unsupported Content-Type",
        422: "Request does not match the schema",
        500: "Internal error",
        503: "Database or artifact store unavailable",
        507: "No space left in the artifact store",
    }
    return {code: {"model": ErrorResponse, "description": descriptions.get(code, "Error")} for code in status_codes}


#: The 409 of an operation that needs a backend or service the server may have no settings for.
NOT_CONFIGURED_RESPONSE: dict[str, Any] = {
    "model": ErrorResponse,
    "description": "Conflict with the current state: of the resource, or of the server when what the request needs "
    "(the `sagemaker` backend, S3) is not configured on it: code `not_configured`, the message names the missing "
    "settings (`GET /backends` lists what is configured).",
}


class BackendInfo(BaseModel):
    name: str = Field(examples=["local"])
    configured: bool = Field(description="Whether jobs and endpoints can use it now.")
    detail: str = Field(description="What is missing, or where it runs.")
    settings: dict[str, Any] = Field(default_factory=dict, description="Non-secret settings in effect.")
