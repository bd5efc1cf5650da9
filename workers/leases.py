"""Holding a lease while work runs in the worker's process: one heartbeat loop for training jobs
and sweeps.

The loop runs in a thread beside the work. It reads the row's stop flag every
:data:`STOP_POLL_SECONDS` (at once when poked: a stop made in this process or announced by
PostgreSQL NOTIFY), extends the lease (writing progress) every lease/3, at most every 5 s, and
marks the lease lost when the row is no longer this worker's, after which the work stops.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from service.db.session import Database

log = logging.getLogger("centroid.worker")
STOP_POLL_SECONDS = 0.5  # how often a running item's stop flag is read (besides wake-ups)


class LeaseWatch(Protocol):
    """What the heartbeat shares with the work it guards."""

    name: str
    stop_requested: bool
    lease_lost: bool
    finished: threading.Event
    poke: threading.Event


class StoppableRows(Protocol):
    def stop_requested(self, name: str) -> bool: ...

    def heartbeat(self, key: str, worker_id: str, lease_seconds: float, values: dict[str, Any]) -> bool: ...


def hold_lease(
    database: Database,
    rows: Callable[[Session], StoppableRows],
    watch: LeaseWatch,
    worker_id: str,
    lease_seconds: float,
    progress: Callable[[], dict[str, Any]],
    presence: Callable[[], None] = lambda: None,
) -> None:
    """Heartbeat ``watch.name``'s row until ``watch.finished`` is set or the lease is lost."""
    interval = max(min(lease_seconds / 3, 5.0), 0.05)
    stop_poll = min(interval, STOP_POLL_SECONDS)
    next_lease = time.monotonic() + interval
    while True:
        watch.poke.wait(stop_poll)
        watch.poke.clear()
        if watch.finished.is_set():
            return
        try:
            with database.session() as session:
                repository = rows(session)
                watch.stop_requested = watch.stop_requested or repository.stop_requested(watch.name)
                if time.monotonic() < next_lease:
                    continue
                owned = repository.heartbeat(watch.name, worker_id, lease_seconds, progress())
            next_lease = time.monotonic() + interval
            presence()
        except SQLAlchemyError as exc:
            log.warning("heartbeat failed (will retry): %s", type(exc).__name__)
            continue
        if not owned:
            watch.lease_lost = True
            return
