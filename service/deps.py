"""FastAPI dependencies: the process-wide resources a request handler may ask for."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

from fastapi import Depends, Request
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from service.endpoints.serving import ServingService
from service.event_streams import StreamSlots
from service.http_cache import RenderedCache
from service.state import CoreState

log = logging.getLogger("centroid.db")


@dataclass
class AppState(CoreState):
    """What the app holds for its lifetime (the workers' :class:`CoreState` and what serving HTTP
    needs); built once in :func:`service.main.create_app`."""

    serving: ServingService
    rendered_reads: RenderedCache
    event_slots: StreamSlots | None = field(default=None)

    @property
    def event_streams(self) -> StreamSlots:
        """The process's budget of open event streams (``CENTROID_MAX_EVENT_STREAMS``)."""
        if self.event_slots is None:
            self.event_slots = StreamSlots(self.settings.max_event_streams)
        return self.event_slots


def app_state(request: Request) -> AppState:
    return request.app.state.centroid  # type: ignore[no-any-return]


def db_session(state: AppState = Depends(app_state)) -> Iterator[Session]:
    """One session per request; anything uncommitted is rolled back at the end."""
    session = state.database.session()
    try:
        yield session
    finally:
        try:
            session.rollback()
        except SQLAlchemyError:
            # The connection died (database restarted or unreachable): nothing uncommitted survives
            # that anyway. Raising here, after the response has started, would reset the client's
            # connection instead of delivering the response (or the handler's 503).
            log.warning("rollback at the end of a request failed; the database connection is gone")
        session.close()
