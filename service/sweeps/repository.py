"""Sweep rows, with the lease protocol of training jobs (see :mod:`service.db.leases`)."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.orm import defer
from sqlalchemy.orm.interfaces import ORMOption

from service.db import leases
from service.db.repository import LeasedRepository
from service.db.session import rows_affected
from service.db.tables import SweepTable
from service.db.types import utcnow
from service.statuses import JobStatus

ACTIVE_STATUSES = tuple(status for status in JobStatus if status.active)
FINAL_STATUSES = tuple(status for status in JobStatus if status.terminal)


class SweepRepository(LeasedRepository[SweepTable]):
    table = SweepTable
    noun = "sweep"
    key_detail = "name"

    def find(self, key: str, options: Sequence[ORMOption] = ()) -> SweepTable | None:
        """The sweep's row; its ``trained_state`` (centroids of every k, the local centers) is read
        only when used: registering a model, never describing the sweep."""
        return super().find(key, [defer(SweepTable.trained_state), *options])

    def page(self, offset: int, limit: int, status: str | None = None) -> tuple[list[SweepTable], int]:
        where = [] if status is None else [SweepTable.status == status]
        return self.listing(offset, limit, *where, options=[defer(SweepTable.trained_state, raiseload=True)])

    def using_dataset(self, dataset_id: str) -> list[str]:
        query = select(SweepTable.name).where(
            or_(SweepTable.train_dataset_id == dataset_id, SweepTable.test_dataset_id == dataset_id)
        )
        return list(self.session.scalars(query).all())

    def claim_next(self, worker_id: str, lease_seconds: float, backends: list[str]) -> SweepTable | None:
        """Atomically take the oldest sweep that is due and not leased by a live worker."""
        condition = and_(leases.due(SweepTable, ACTIVE_STATUSES, utcnow()), SweepTable.backend.in_(backends))
        return self.claim(condition, (SweepTable.created_at,), worker_id, lease_seconds)

    def stop_requested(self, name: str) -> bool:
        return bool(self.session.scalar(select(SweepTable.stop_requested).where(SweepTable.name == name)))

    def stop_if_unclaimed(self, name: str) -> bool:
        """Stop a Pending sweep no worker holds, at once; False when it was claimed (or moved on)."""
        statement = (
            update(SweepTable)
            .where(SweepTable.name == name, SweepTable.status == JobStatus.PENDING, SweepTable.lease_owner.is_(None))
            .values(
                status=JobStatus.STOPPED,
                status_message="stopped before it started",
                stop_requested=True,
                ended_at=utcnow(),
            )
            .execution_options(synchronize_session=False)
        )
        return rows_affected(self.session.execute(statement)) > 0

    def request_stop(self, name: str) -> None:
        """Ask the worker running an active sweep to stop it (Stopping until it has)."""
        self.session.execute(
            update(SweepTable)
            .where(SweepTable.name == name, SweepTable.status.in_(ACTIVE_STATUSES))
            .values(status=JobStatus.STOPPING, stop_requested=True)
            .execution_options(synchronize_session=False)
        )

    def delete_ended(self, name: str) -> bool:
        """Delete a sweep that has ended; False when no ended sweep of that name remains. The
        models registered from it stay. The caller commits."""
        statement = delete(SweepTable).where(SweepTable.name == name, SweepTable.status.in_(FINAL_STATUSES))
        return rows_affected(self.session.execute(statement.execution_options(synchronize_session=False))) > 0
