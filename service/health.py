"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError

from schemas.common import HealthStatus
from service.deps import AppState, app_state

router = APIRouter(tags=["operations"])


ALIVE_BODY = HealthStatus(status="ok").model_dump_json().encode()


@router.get("/healthz", response_model=HealthStatus, summary="Is the process alive?")
async def healthz() -> Response:
    """Answered on the event loop from a pre-rendered body: liveness costs nothing."""
    return Response(ALIVE_BODY, media_type="application/json")


@router.get(
    "/readyz",
    response_model=HealthStatus,
    summary="Can the service do work? (database reachable, artifact directory writable)",
    responses={503: {"model": HealthStatus, "description": "A dependency is down"}},
)
def readyz(state: AppState = Depends(app_state)) -> JSONResponse:
    checks = {"database": "ok", "artifact_store": "ok"}
    try:
        state.database.ping()
    except SQLAlchemyError as exc:
        checks["database"] = f"unavailable: {type(exc).__name__}"
    if not state.store.is_writable():
        checks["artifact_store"] = "not writable"
    healthy = all(value == "ok" for value in checks.values())
    body = HealthStatus(status="ok" if healthy else "unavailable", checks=checks)
    return JSONResponse(status_code=200 if healthy else 503, content=body.model_dump())


class PrometheusResponse(Response):
    media_type = "text/plain"


@router.get(
    "/metrics",
    response_class=PrometheusResponse,
    summary="Prometheus metrics",
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def metrics(state: AppState = Depends(app_state)) -> Response:
    """Requests and latency by route and status, invocations and rows predicted (summed over every
    process of `centroid serve --workers N`), jobs and endpoints by status, training durations,
    worker heartbeat and last-poll ages."""
    body = await run_in_threadpool(state.metrics.render)
    return Response(content=body, media_type=state.metrics.content_type)
