"""GET /backends: which backends exist and whether each is configured (no secrets)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from service.deps import AppState, app_state

router = APIRouter(tags=["operations"])


class BackendInfo(BaseModel):
    name: str = Field(examples=["local"])
    configured: bool = Field(description="Whether jobs and endpoints can use it now.")
    detail: str = Field(description="What is missing, or where it runs.")
    settings: dict[str, Any] = Field(default_factory=dict, description="Non-secret settings in effect.")


@router.get("/backends", response_model=list[BackendInfo], summary="Available training/serving backends")
async def list_backends(state: AppState = Depends(app_state)) -> Any:
    statuses = [await run_in_threadpool(backend.status) for backend in state.backends]
    return [BackendInfo(name=s.name, configured=s.configured, detail=s.detail, settings=s.settings) for s in statuses]
