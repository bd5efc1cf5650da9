"""Training job rows, and the lease protocol that lets many workers share them.

A worker *claims* a job by setting ``lease_owner`` and ``lease_expires_at`` with a conditional
UPDATE that only succeeds if nobody else holds a live lease (compare-and-swap, so it is atomic on
SQLite and PostgreSQL alike; PostgreSQL additionally skips rows another claimer has locked). While
it works it extends the lease; every write it makes is guarded by ``lease_owner = me``, so a
worker that lost its lease (it stalled and another took over) can no longer change the job.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from service.db.tables import TrainingJobTable
from service.db.types import utcnow
from service.errors import NotFound

ACTIVE_STATUSES = ("Pending", "InProgress", "Stopping")
FINAL_STATUSES = ("Completed", "Failed", "Stopped")


class JobRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, row: TrainingJobTable) -> None:
        self.session.add(row)
        self.session.flush()

    def find(self, name: str) -> TrainingJobTable | None:
        return self.session.get(TrainingJobTable, name)

    def get(self, name: str) -> TrainingJobTable:
        row = self.find(name)
        if row is None:
            raise NotFound(f"training job {name!r} not found", details={"name": name})
        return row

    def list(self, offset: int, limit: int, status: str | None) -> tuple[list[TrainingJobTable], int]:
        query = select(TrainingJobTable)
        if status is not None:
            query = query.where(TrainingJobTable.status == status)
        total = self.session.scalar(select(func.count()).select_from(query.subquery())) or 0
        rows = self.session.scalars(
            query.order_by(TrainingJobTable.created_at.desc(), TrainingJobTable.name).offset(offset).limit(limit)
        ).all()
        return list(rows), total

    def using_dataset(self, dataset_id: str) -> list[str]:
        query = select(TrainingJobTable.name).where(
            or_(TrainingJobTable.train_dataset_id == dataset_id, TrainingJobTable.test_dataset_id == dataset_id)
        )
        return list(self.session.scalars(query).all())

    def count_by_status(self) -> dict[str, int]:
        rows = self.session.execute(
            select(TrainingJobTable.status, func.count()).group_by(TrainingJobTable.status)
        ).all()
        return {status: count for status, count in rows}

    # --- the lease protocol -------------------------------------------------------------------

    def claim_next(self, worker_id: str, lease_seconds: float, backends: list[str]) -> TrainingJobTable | None:
        """Atomically take the oldest job that is due and not leased by a live worker."""
        now = utcnow()
        for _ in range(5):
            candidate = self._next_candidate(now, backends)
            if candidate is None:
                return None
            if self._take(candidate, worker_id, now, lease_seconds):
                self.session.commit()
                job = self.get(candidate)
                self.session.refresh(job)
                return job
            self.session.rollback()
        return None

    def _claimable(self, now: datetime) -> Any:
        return and_(
            TrainingJobTable.status.in_(ACTIVE_STATUSES),
            or_(TrainingJobTable.lease_expires_at.is_(None), TrainingJobTable.lease_expires_at < now),
            or_(TrainingJobTable.next_poll_at.is_(None), TrainingJobTable.next_poll_at <= now),
        )

    def _next_candidate(self, now: datetime, backends: list[str]) -> str | None:
        query = (
            select(TrainingJobTable.name)
            .where(self._claimable(now), TrainingJobTable.backend.in_(backends))
            .order_by(TrainingJobTable.next_poll_at.is_not(None), TrainingJobTable.created_at)
            .limit(1)
            .with_for_update(skip_locked=True)
        )
        return self.session.scalar(query)

    def _take(self, name: str, worker_id: str, now: datetime, lease_seconds: float) -> bool:
        result = self.session.execute(
            update(TrainingJobTable)
            .where(TrainingJobTable.name == name, self._claimable(now))
            .values(
                lease_owner=worker_id,
                lease_expires_at=now + timedelta(seconds=lease_seconds),
                next_poll_at=None,
            )
            .execution_options(synchronize_session=False)
        )
        return result.rowcount == 1

    def heartbeat(self, name: str, worker_id: str, lease_seconds: float, values: dict[str, Any]) -> bool:
        """Extend the lease (and write progress); False when the lease is no longer ours."""
        result = self.session.execute(
            update(TrainingJobTable)
            .where(TrainingJobTable.name == name, TrainingJobTable.lease_owner == worker_id)
            .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds), **values)
            .execution_options(synchronize_session=False)
        )
        self.session.commit()
        return result.rowcount == 1

    def stop_requested(self, name: str) -> bool:
        return bool(self.session.scalar(select(TrainingJobTable.stop_requested).where(TrainingJobTable.name == name)))

    def guarded_update(self, name: str, worker_id: str, values: dict[str, Any]) -> bool:
        """Write ``values`` only while ``worker_id`` holds the lease; the caller commits."""
        result = self.session.execute(
            update(TrainingJobTable)
            .where(TrainingJobTable.name == name, TrainingJobTable.lease_owner == worker_id)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        return result.rowcount == 1
