"""Dataset task rows: background uploads and derives, claimed by workers under leases."""

from __future__ import annotations

from sqlalchemy import select

from service.db import leases
from service.db.repository import LeasedRepository
from service.db.tables import DatasetTaskTable
from service.db.types import utcnow
from service.statuses import DatasetTaskStatus

PENDING, IN_PROGRESS = DatasetTaskStatus.PENDING, DatasetTaskStatus.IN_PROGRESS
COMPLETED, FAILED = DatasetTaskStatus.COMPLETED, DatasetTaskStatus.FAILED
ACTIVE_STATUSES = (PENDING, IN_PROGRESS)
UPLOADS_PREFIX = "uploads"  # an async upload's CSV waits here, named after its task, until the task ends


def upload_key(task_id: str) -> str:
    return f"{UPLOADS_PREFIX}/{task_id}.csv"


class DatasetTaskRepository(LeasedRepository[DatasetTaskTable]):
    table = DatasetTaskTable
    noun = "dataset task"
    key_detail = "task_id"

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
        condition = leases.due(DatasetTaskTable, ACTIVE_STATUSES, utcnow())
        return self.claim(condition, (DatasetTaskTable.created_at,), worker_id, lease_seconds)
