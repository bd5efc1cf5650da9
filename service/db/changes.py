"""Change signals: a serving generation counter, and wake-ups for idle workers.

* :func:`bump_serving` increments the ``serving`` counter inside the caller's transaction, so the
  new value becomes visible exactly when the change it announces does. API processes poll
  :func:`serving_generation` (one primary-key read) to know when their in-process endpoint map and
  immutable-read caches must be rebuilt.
* :func:`announce_work` tells idle workers that a job or an endpoint transition is waiting: on
  PostgreSQL a ``NOTIFY`` in the same transaction (delivered at commit to every listening worker
  process); workers in this process are woken through :data:`local_wakeups` once the caller commits.
  Polling stays the fallback everywhere (SQLite across processes, a lost listener connection).
"""

from __future__ import annotations

import threading

from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from service.db.tables import ChangeCounterTable

SERVING = "serving"
WORK_CHANNEL = "centroid_work"


def bump_serving(session: Session) -> None:
    """Increment the serving generation as part of the caller's (uncommitted) transaction."""
    session.execute(
        update(ChangeCounterTable)
        .where(ChangeCounterTable.name == SERVING)
        .values(value=ChangeCounterTable.value + 1)
        .execution_options(synchronize_session=False)
    )


def serving_generation(session: Session) -> int:
    value = session.scalar(select(ChangeCounterTable.value).where(ChangeCounterTable.name == SERVING))
    return int(value or 0)


class Wakeups:
    """Events of the workers living in this process; :meth:`notify` wakes all of them."""

    def __init__(self) -> None:
        self._events: set[threading.Event] = set()
        self._lock = threading.Lock()

    def register(self, event: threading.Event) -> None:
        with self._lock:
            self._events.add(event)

    def unregister(self, event: threading.Event) -> None:
        with self._lock:
            self._events.discard(event)

    def notify(self) -> None:
        with self._lock:
            events = list(self._events)
        for event in events:
            event.set()


local_wakeups = Wakeups()


def announce_work(session: Session) -> None:
    """Call before the commit that makes work claimable; call :func:`work_committed` after it."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text(f"NOTIFY {WORK_CHANNEL}"))


def work_committed() -> None:
    local_wakeups.notify()
