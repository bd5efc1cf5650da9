"""The worker's own rows: one per live worker process (``workers``), heartbeated while it runs."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

from sqlalchemy import delete, update
from sqlalchemy.orm import Session

from service.db.session import rows_affected
from service.db.tables import WorkerTable
from service.db.types import utcnow


class WorkerRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def heartbeat(self, worker_id: str, current_job: str | None) -> None:
        """Mark the worker alive, registering it when its row is missing; the caller commits."""
        now = utcnow()
        updated = rows_affected(
            self.session.execute(
                update(WorkerTable)
                .where(WorkerTable.id == worker_id)
                .values(heartbeat_at=now, last_poll_at=now, current_job=current_job)
            )
        )
        if not updated:
            self.session.add(
                WorkerTable(
                    id=worker_id,
                    hostname=socket.gethostname()[:255],
                    pid=os.getpid(),
                    started_at=now,
                    heartbeat_at=now,
                    last_poll_at=now,
                    current_job=current_job,
                )
            )

    def delete_silent(self, seconds: float, keep: str) -> int:
        """Delete the rows of workers (other than ``keep``) silent for ``seconds``; how many."""
        cutoff = utcnow() - timedelta(seconds=seconds)
        return rows_affected(
            self.session.execute(delete(WorkerTable).where(WorkerTable.heartbeat_at < cutoff, WorkerTable.id != keep))
        )

    def delete(self, worker_id: str) -> None:
        self.session.execute(delete(WorkerTable).where(WorkerTable.id == worker_id))
