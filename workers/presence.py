"""A worker's presence: its row in ``workers``, heartbeated by every loop (and a running job's
lease thread), and the deletion of dead workers' rows (those whose heartbeat is older than
``resolved_worker_expiry_seconds``: workers that died without unregistering)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from sqlalchemy.exc import SQLAlchemyError

from service.db.session import Database
from workers.repository import WorkerRepository

log = logging.getLogger("centroid.worker")


class WorkerPresence:
    def __init__(
        self, database: Database, worker_id: str, expiry_seconds: float, current_job: Callable[[], str | None]
    ) -> None:
        self.db = database
        self.worker_id = worker_id
        self.expiry_seconds = expiry_seconds
        self._current_job = current_job
        self._lock = threading.Lock()  # the loops and the lease thread all heartbeat the row
        self._expired_at = 0.0  # monotonic time dead workers' rows were last deleted

    def heartbeat(self) -> None:
        """Mark this worker alive (registering it if needed); now and then delete dead workers' rows."""
        with self._lock, self.db.session() as session:
            WorkerRepository(session).heartbeat(self.worker_id, self._current_job())
            session.commit()
        self._expire_dead()

    def _expire_dead(self) -> None:
        """At most every expiry/3."""
        if time.monotonic() - self._expired_at < self.expiry_seconds / 3:
            return
        self._expired_at = time.monotonic()
        with self.db.session() as session:
            gone = WorkerRepository(session).delete_silent(self.expiry_seconds, keep=self.worker_id)
            session.commit()
        if gone:
            log.info("expired %d dead worker(s)", gone, extra={"worker_id": self.worker_id})

    def unregister(self) -> None:
        try:
            with self.db.session() as session:
                WorkerRepository(session).delete(self.worker_id)
                session.commit()
        except SQLAlchemyError:
            log.warning("could not unregister worker %s", self.worker_id)
