"""Dataset task rows: background uploads and derives, claimed by workers under leases."""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, select
from sqlalchemy.orm import Session

from service.db import leases
from service.db.pagination import paginate
from service.db.tables import DatasetTaskTable
from service.db.types import utcnow
from service.errors import NotFound
from service.statuses import DatasetTaskStatus

PENDING, IN_PROGRESS = DatasetTaskStatus.PENDING, DatasetTaskStatus.IN_PROGRESS
COMPLETED, FAILED = DatasetTaskStatus.COMPLETED, DatasetTaskStatus.FAILED
ACTIVE_STATUSES = (PENDING, IN_PROGRESS)
UPLOADS_PREFIX = "uploads"  # an async upload's CSV waits here, named after its task, until the task ends


def upload_key(task_id: str) -> str:
    return f"{UPLOADS_PREFIX}/{task_id}.csv"


class DatasetTaskRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, row: DatasetTaskTable) -> None:
        self.session.add(row)
        self.session.flush()

    def get(self, task_id: str) -> DatasetTaskTable:
        row = self.session.get(DatasetTaskTable, task_id)
        if row is None:
            raise NotFound(f"dataset task {task_id!r} not found", details={"task_id": task_id})
        return row

    def page(self, offset: int, limit: int, status: str | None) -> tuple[list[DatasetTaskTable], int]:
        query = select(DatasetTaskTable)
        if status is not None:
            query = query.where(DatasetTaskTable.status == status)
        return paginate(self.session, query, (DatasetTaskTable.created_at.desc(), DatasetTaskTable.id), offset, limit)

    def active_using(self, dataset_id: str) -> list[str]:
        """Ids of unfinished tasks that read ``dataset_id`` (a delete must wait for them)."""
        rows = self.session.execute(
            select(DatasetTaskTable.id, DatasetTaskTable.input_ids).where(DatasetTaskTable.status.in_(ACTIVE_STATUSES))
        ).all()
        return [task_id for task_id, inputs in rows if dataset_id in (inputs or [])]

    def active_upload_keys(self) -> set[str]:
        ids = self.session.scalars(
            select(DatasetTaskTable.id).where(
                DatasetTaskTable.status.in_(ACTIVE_STATUSES), DatasetTaskTable.kind == "upload"
            )
        ).all()
        return {upload_key(task_id) for task_id in ids}

    def claim_next(self, worker_id: str, lease_seconds: float) -> DatasetTaskTable | None:
        """Atomically take the oldest task that is due and not leased by a live worker."""
        now = utcnow()
        task_id = leases.claim(
            self.session,
            DatasetTaskTable.id,
            and_(leases.due(DatasetTaskTable, ACTIVE_STATUSES, now)),
            (DatasetTaskTable.created_at,),
            worker_id,
            leases.lease_until(lease_seconds, now),
        )
        if task_id is None:
            return None
        task = self.get(task_id)
        self.session.refresh(task)
        return task

    def heartbeat(self, task_id: str, worker_id: str, lease_seconds: float, values: dict[str, Any]) -> bool:
        """Extend the lease (and write progress); False when the lease is no longer ours."""
        owned = self.guarded_update(
            task_id, worker_id, {"lease_expires_at": leases.lease_until(lease_seconds, utcnow()), **values}
        )
        self.session.commit()
        return owned

    def guarded_update(self, task_id: str, worker_id: str, values: dict[str, Any]) -> bool:
        """Write ``values`` only while ``worker_id`` holds the lease; the caller commits."""
        return leases.guarded_update(self.session, DatasetTaskTable.id, task_id, worker_id, values)
