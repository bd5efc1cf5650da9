"""Training job rows, and their side of the lease protocol (see :mod:`service.db.leases`)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from service.db import leases
from service.db.pagination import paginate
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

    def page(self, offset: int, limit: int, status: str | None) -> tuple[list[TrainingJobTable], int]:
        query = select(TrainingJobTable)
        if status is not None:
            query = query.where(TrainingJobTable.status == status)
        return paginate(
            self.session,
            query,
            (
                TrainingJobTable.created_at.desc(),
                TrainingJobTable.name,
            ),
            offset,
            limit,
        )

    def using_dataset(self, dataset_id: str) -> list[str]:
        query = select(TrainingJobTable.name).where(
            or_(TrainingJobTable.train_dataset_id == dataset_id, TrainingJobTable.test_dataset_id == dataset_id)
        )
        return list(self.session.scalars(query).all())

    # --- the lease protocol -------------------------------------------------------------------

    def claim_next(self, worker_id: str, lease_seconds: float, backends: list[str]) -> TrainingJobTable | None:
        """Atomically take the oldest job that is due and not leased by a live worker."""
        now = utcnow()
        name = leases.claim(
            self.session,
            TrainingJobTable.name,
            and_(leases.due(TrainingJobTable, ACTIVE_STATUSES, now), TrainingJobTable.backend.in_(backends)),
            (TrainingJobTable.next_poll_at.is_not(None), TrainingJobTable.created_at),
            worker_id,
            leases.lease_until(lease_seconds, now),
        )
        if name is None:
            return None
        job = self.get(name)
        self.session.refresh(job)
        return job

    def heartbeat(self, name: str, worker_id: str, lease_seconds: float, values: dict[str, Any]) -> bool:
        """Extend the lease (and write progress); False when the lease is no longer ours."""
        owned = self.guarded_update(
            name, worker_id, {"lease_expires_at": leases.lease_until(lease_seconds, utcnow()), **values}
        )
        self.session.commit()
        return owned

    def stop_requested(self, name: str) -> bool:
        return bool(self.session.scalar(select(TrainingJobTable.stop_requested).where(TrainingJobTable.name == name)))

    def guarded_update(self, name: str, worker_id: str, values: dict[str, Any]) -> bool:
        """Write ``values`` only while ``worker_id`` holds the lease; the caller commits."""
        return leases.guarded_update(self.session, TrainingJobTable.name, name, worker_id, values)
