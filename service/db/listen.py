"""PostgreSQL LISTEN for idle workers: a NOTIFY on the work channel wakes them at once.

Only a wake-up: workers still poll (``CENTROID_WORKER_POLL_INTERVAL``), so a lost connection or a
missed notification costs at most one poll interval. On SQLite this does nothing.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy.engine import make_url

from service.db.changes import WORK_CHANNEL
from service.db.session import PG_CONNECT_TIMEOUT_SECONDS, Database

log = logging.getLogger("centroid.worker")
_RECONNECT_SECONDS = 5.0


class WorkListener:
    """A daemon thread holding one LISTEN connection; sets ``wakeup`` on every notification."""

    def __init__(self, database: Database, wakeup: threading.Event) -> None:
        self.database = database
        self.wakeup = wakeup
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.database.dialect != "postgresql" or self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="centroid-work-listener", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(3.0)
            self._thread = None

    def _conninfo(self) -> str:
        url = make_url(self.database.url).set(drivername="postgresql")
        return url.render_as_string(hide_password=False)

    def _run(self) -> None:
        import psycopg

        while not self._stopping.is_set():
            try:
                with psycopg.connect(
                    self._conninfo(), autocommit=True, connect_timeout=PG_CONNECT_TIMEOUT_SECONDS
                ) as connection:
                    connection.execute(f"LISTEN {WORK_CHANNEL}")
                    self.wakeup.set()  # anything announced while (re)connecting is not lost
                    while not self._stopping.is_set():
                        for _ in connection.notifies(timeout=0.5):
                            self.wakeup.set()
            except psycopg.Error as exc:
                log.warning("work listener connection failed (polling meanwhile): %s", type(exc).__name__)
                self._stopping.wait(_RECONNECT_SECONDS)
