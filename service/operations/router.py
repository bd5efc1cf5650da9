"""Operations routes beside health and metrics: ``GET /backends``, which backends exist and whether
each is configured (no secrets)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool

from schemas.common import BackendInfo
from service.deps import AppState, app_state

router = APIRouter(tags=["operations"])


@router.get("/backends", response_model=list[BackendInfo], summary="Available training/serving backends")
async def list_backends(state: AppState = Depends(app_state)) -> list[BackendInfo]:
    statuses = [await run_in_threadpool(backend.status) for backend in state.backends]
    return [BackendInfo(name=s.name, configured=s.configured, detail=s.detail, settings=s.settings) for s in statuses]
