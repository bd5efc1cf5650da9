"""Training job rows, and their side of the lease protocol (see :mod:`service.db.leases`)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, delete, or_, select, update

from service.db import leases
from service.db.repository import LeasedRepository
from service.db.session import rows_affected
from service.db.tables import ModelTable, TrainingJobTable
from service.db.types import utcnow
from service.statuses import JobStatus, SecondaryStatus

ACTIVE_STATUSES = tuple(status for status in JobStatus if status.active)
FINAL_STATUSES = tuple(status for status in JobStatus if status.terminal)


class JobRepository(LeasedRepository[TrainingJobTable]):
    table = TrainingJobTable
    noun = "training job"
    key_detail = "name"

    def using_dataset(self, dataset_id: str) -> list[str]:
        query = select(TrainingJobTable.name).where(
            or_(TrainingJobTable.train_dataset_id == dataset_id, TrainingJobTable.test_dataset_id == dataset_id)
        )
        return list(self.session.scalars(query).all())

    # --- the lease protocol -------------------------------------------------------------------

    def claim_next(self, worker_id: str, lease_seconds: float, backends: list[str]) -> TrainingJobTable | None:
        """Atomically take the oldest job that is due and not leased by a live worker."""
        condition = and_(
            leases.due(TrainingJobTable, ACTIVE_STATUSES, utcnow()), TrainingJobTable.backend.in_(backends)
        )
        order = (TrainingJobTable.next_poll_at.is_not(None), TrainingJobTable.created_at)
        return self.claim(condition, order, worker_id, lease_seconds)

    def stop_requested(self, name: str) -> bool:
        return bool(self.session.scalar(select(TrainingJobTable.stop_requested).where(TrainingJobTable.name == name)))

    def stop_if_unclaimed(self, job: TrainingJobTable, message: str, transitions: list[dict[str, Any]]) -> bool:
        """Stop a Pending job no worker holds, at once; False when it was claimed (or moved on)."""
        return (
            rows_affected(
                self.session.execute(
                    update(TrainingJobTable)
                    .where(
                        TrainingJobTable.name == job.name,
                        TrainingJobTable.status == JobStatus.PENDING,
                        TrainingJobTable.lease_owner.is_(None),
                    )
                    .values(
                        status=JobStatus.STOPPED,
                        secondary_status=SecondaryStatus.STOPPED,
                        status_message=message,
                        stop_requested=True,
                        ended_at=utcnow(),
                        status_transitions=transitions,
                    )
                    .execution_options(synchronize_session=False)
                )
            )
            > 0
        )

    def request_stop(self, name: str) -> None:
        """Ask the worker holding an active job to stop it (Stopping until it has)."""
        self.session.execute(
            update(TrainingJobTable)
            .where(TrainingJobTable.name == name, TrainingJobTable.status.in_(ACTIVE_STATUSES))
            .values(
                status=JobStatus.STOPPING,
                secondary_status=SecondaryStatus.STOPPING,
                stop_requested=True,
                next_poll_at=None,
            )
            .execution_options(synchronize_session=False)
        )

    def delete_ended(self, name: str) -> bool:
        """Delete a job that has ended, leaving its model (which forgets the job's name); False
        when no ended job of that name remains. The caller commits."""
        self.session.execute(
            update(ModelTable)
            .where(ModelTable.training_job_name == name)
            .values(training_job_name=None)
            .execution_options(synchronize_session=False)
        )
        return (
            rows_affected(
                self.session.execute(
                    delete(TrainingJobTable)
                    .where(TrainingJobTable.name == name, TrainingJobTable.status.in_(FINAL_STATUSES))
                    .execution_options(synchronize_session=False)
                )
            )
            > 0
        )

    def finish_with_model(self, name: str, worker_id: str, values: dict[str, Any], model_id: str) -> bool:
        """Write a completed job's ``values`` and its model, while ``worker_id`` holds the lease."""
        return self.guarded_update(name, worker_id, {**values, "model_id": model_id})

    def forget_model(self, model_id: str) -> None:
        """The model is being deleted: the jobs that trained it keep no reference."""
        self.session.execute(
            update(TrainingJobTable).where(TrainingJobTable.model_id == model_id).values(model_id=None)
        )
