"""FastAPI dependencies: the process-wide resources a request handler may ask for."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from service.backends import BackendRegistry
from service.db.session import Database
from service.endpoints.cache import ModelCache
from service.settings import Settings
from service.storage import LocalArtifactStore


@dataclass
class AppState:
    """What the app holds for its lifetime; built once in :func:`service.main.create_app`."""

    settings: Settings
    database: Database
    store: LocalArtifactStore
    backends: BackendRegistry
    model_cache: ModelCache


def app_state(request: Request) -> AppState:
    return request.app.state.centroid  # type: ignore[no-any-return]


def db_session(state: AppState = Depends(app_state)) -> Iterator[Session]:
    """One session per request; anything uncommitted is rolled back at the end."""
    session = state.database.session()
    try:
        yield session
    finally:
        session.rollback()
        session.close()
