"""The training-job driver: claim a job, drive its backend, write the outcome.

* A backend that trains in the worker's process (``Backend.trains_in_process``: the local engine)
  runs the whole job in one call. Meanwhile a heartbeat thread extends the lease and writes
  progress; if the worker dies, the lease runs out and another worker (or this one, restarted)
  runs the job again from the start. Every write is guarded by ``lease_owner = me``, and the model
  row is unique per job, so a job never ends up in two models.
* A remote backend (SageMaker) is polled: claim, ask the backend, write, release with
  ``next_poll_at`` set. A restarted worker simply picks the job up again. Each call runs under
  the same heartbeat thread, so a long one (the first, which uploads the training data) keeps
  its lease instead of being claimed and uploaded again by another worker; the upload is
  abandoned when the lease is lost, the job stopped or the worker shutting down (then the job
  is released, as a local training is).
* A stop request is noticed within :data:`workers.leases.STOP_POLL_SECONDS` (at once when the
  request was made in this process or announced by PostgreSQL NOTIFY), and the engine honours it
  within a fraction of a second wherever it is (streaming, reduction, evaluation).
* On shutdown a running training stops the same way; the job is then released back to Pending
  for another worker, not marked Stopped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pyarrow.fs as pa_fs
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from service.backends.base import Backend, TrainingSpec, TrainingUpdate
from service.datasets.repository import DatasetRepository
from service.datasets.s3 import dataset_input, s3_filesystem
from service.db.tables import TrainingJobTable
from service.db.types import utcnow
from service.engine import KMeansHyperparameters
from service.errors import AppError
from service.jobs.repository import FINAL_STATUSES, JobRepository
from service.jobs.service import transition
from service.models.service import ModelService
from service.state import CoreState
from service.statuses import JobStatus, SecondaryStatus
from workers.leases import hold_lease

log = logging.getLogger("centroid.worker")
MAX_ATTEMPTS = 3


@dataclass
class _RunningJob:
    """Shared between a training and its heartbeat thread."""

    name: str
    points_processed: int = 0
    points_total: int = 0
    reports_progress: bool = True  # the heartbeat writes points_processed (a remote job's come from its backend)
    stop_requested: bool = False
    lease_lost: bool = False
    shutdown: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    poke: threading.Event = field(default_factory=threading.Event)  # re-read the stop flag now

    def progress(self, points_processed: int, points_total: int) -> None:
        self.points_processed, self.points_total = points_processed, points_total

    def should_stop(self) -> bool:
        return self.stop_requested or self.lease_lost or self.shutdown.is_set()


class TrainingDriver:
    """Runs or polls one training job per :meth:`step`.

    ``wakeup`` is the worker's announcement fan-out (a running job's stop watch attaches to it);
    ``stopping`` is set on shutdown; ``presence`` heartbeats the worker's row."""

    def __init__(
        self,
        state: CoreState,
        worker_id: str,
        backend_names: Callable[[], list[str]],
        presence: Callable[[], None],
        stopping: threading.Event,
        wakeup: Any,
    ) -> None:
        self.state = state
        self.settings = state.settings
        self.db = state.database
        self.worker_id = worker_id
        self._backend_names = backend_names
        self._presence = presence
        self.stopping = stopping
        self.wakeup = wakeup
        self.current_job: str | None = None

    def step(self) -> bool:
        """Claim and drive at most one job; True if there was one."""
        with self.db.session() as session:
            job = JobRepository(session).claim_next(self.worker_id, self.settings.lease_seconds, self._backend_names())
        if job is None:
            return False
        log.info("claimed training job", extra={"job": job.name, "status": job.status, "worker_id": self.worker_id})
        backend = self.state.backends.get(job.backend)
        try:
            if backend.trains_in_process:
                self._run_in_process(job, backend)
            else:
                self._poll_remote(job, backend)
        except (OperationalError, InterfaceError, PoolTimeout):
            # The database is unavailable, not the job at fault: the loop backs off; the lease runs
            # out and the job is run again. (Failing it here would turn a database blip into a failed job.)
            raise
        except Exception as exc:  # noqa: BLE001 - a job's failure must never kill the worker
            log.exception("training job %s raised", job.name)
            self._after_error(job, backend, exc)
        return True

    # --- in the worker's process ----------------------------------------------------------------

    def _run_in_process(self, job: TrainingJobTable, backend: Backend) -> None:
        if job.stop_requested:
            self._finish(job, TrainingUpdate.stopped())
            return
        if job.attempts >= MAX_ATTEMPTS:
            self._finish(
                job, TrainingUpdate.failed(f"the worker running this job stopped unexpectedly {job.attempts} times")
            )
            return
        if not self._mark_training(job):
            return
        with self._leased(job, reports_progress=True) as running:
            update = backend.advance_training(self._spec(job), running)
        if running.lease_lost:
            log.warning("lost the lease on %s; another worker owns it now", job.name)
            return
        if update.status == JobStatus.STOPPED and not running.stop_requested and self.stopping.is_set():
            self._release(job)
            return
        self._finish(job, update)

    @contextmanager
    def _leased(self, job: TrainingJobTable, *, reports_progress: bool) -> Iterator[_RunningJob]:
        """Hold ``job``'s lease while the body runs: a heartbeat thread extends it (see
        :meth:`_heartbeat`) and watches for a stop; the :class:`_RunningJob` yielded is the
        backend's hooks, and says afterwards whether the lease was lost."""
        running = _RunningJob(
            job.name,
            points_total=job.points_total,
            reports_progress=reports_progress,
            stop_requested=job.stop_requested,
            shutdown=self.stopping,
        )
        heartbeat = threading.Thread(target=self._heartbeat, args=(running,), daemon=True, name=f"lease-{job.name}")
        self.current_job = job.name
        self.wakeup.attach(running.poke)
        heartbeat.start()
        try:
            yield running
        finally:
            running.finished.set()
            running.poke.set()
            heartbeat.join()
            self.wakeup.detach(running.poke)
            self.current_job = None

    def _mark_training(self, job: TrainingJobTable) -> bool:
        now = utcnow()
        values = {
            "status": JobStatus.IN_PROGRESS,
            "secondary_status": SecondaryStatus.TRAINING,
            "status_message": f"training on worker {self.worker_id}",
            "started_at": job.started_at or now,
            "attempts": job.attempts + 1,
            "points_processed": 0,
            "status_transitions": append_transition(
                job.status_transitions, SecondaryStatus.TRAINING, f"worker {self.worker_id}"
            ),
        }
        with self.db.session() as session:
            owned = JobRepository(session).guarded_update(job.name, self.worker_id, values)
            session.commit()
        for key, value in values.items():
            setattr(job, key, value)
        return owned

    def _heartbeat(self, running: _RunningJob) -> None:
        """Hold the job's lease while it trains (see :func:`workers.leases.hold_lease`)."""
        hold_lease(
            self.db,
            JobRepository,
            running,
            self.worker_id,
            self.settings.lease_seconds,
            progress=lambda: {"points_processed": running.points_processed} if running.reports_progress else {},
            presence=self._presence,
        )

    def _release(self, job: TrainingJobTable) -> None:
        """Give a job back (shutdown mid-training): Pending again, for any worker."""
        values = {
            "status": JobStatus.PENDING,
            "secondary_status": SecondaryStatus.STARTING,
            "status_message": "released by a worker that shut down; waiting for a worker",
            "points_processed": 0,
            "attempts": max(job.attempts - 1, 0),
            "lease_owner": None,
            "lease_expires_at": None,
            "status_transitions": append_transition(
                job.status_transitions, SecondaryStatus.STARTING, "released on shutdown"
            ),
        }
        with self.db.session() as session:
            JobRepository(session).guarded_update(job.name, self.worker_id, values)
            session.commit()
        log.info("released training job on shutdown", extra={"job": job.name})

    # --- remote -----------------------------------------------------------------------------------

    def _poll_remote(self, job: TrainingJobTable, backend: Backend) -> None:
        spec = self._spec(job)
        if job.stop_requested and job.remote and not job.remote.get("stop_sent"):
            backend.stop_training(spec)
            job.remote = {**job.remote, "stop_sent": True}
            spec = self._spec(job)
        if job.status == JobStatus.PENDING:
            if job.stop_requested:
                self._finish(job, TrainingUpdate.stopped())
                return
            self._mark_started_remote(job)
        submitted = bool(job.remote.get("training_job_name"))
        with self._leased(job, reports_progress=False) as running:
            update = backend.advance_training(spec, running)
        if running.lease_lost:
            log.warning("lost the lease on %s during a remote step; another worker owns it now", job.name)
            return
        if (
            update.status == JobStatus.STOPPED
            and not submitted
            and not running.stop_requested
            and self.stopping.is_set()
        ):
            self._release(job)  # the upload was abandoned on shutdown: another worker submits it
            return
        self._finish(job, update)

    def _mark_started_remote(self, job: TrainingJobTable) -> None:
        values = {"status": JobStatus.IN_PROGRESS, "started_at": utcnow(), "attempts": job.attempts + 1}
        with self.db.session() as session:
            JobRepository(session).guarded_update(job.name, self.worker_id, values)
            session.commit()
        for key, value in values.items():
            setattr(job, key, value)

    # --- outcomes ---------------------------------------------------------------------------------

    def _finish(self, job: TrainingJobTable, result: TrainingUpdate) -> None:
        """Write a backend's update; register the model when it completed; release the lease."""
        values = job_values(job, result)
        if result.status in FINAL_STATUSES:
            values.update(ended_at=utcnow(), lease_owner=None, lease_expires_at=None, next_poll_at=None)
        else:
            poll_after = result.poll_after_seconds or self.settings.remote_poll_seconds
            values.update(
                lease_owner=None, lease_expires_at=None, next_poll_at=utcnow() + timedelta(seconds=poll_after)
            )
        with self.db.session() as session:
            if result.status == JobStatus.COMPLETED and result.result is not None:
                service = ModelService(session, self.state.store)
                model = service.register_trained(job, result.result, self.worker_id, values)
                if model is None:
                    log.warning("lease on %s lost before registration; discarded the result", job.name)
                else:
                    log.info("training job completed", extra={"job": job.name, "model_id": model.id})
                return
            JobRepository(session).guarded_update(job.name, self.worker_id, values)
            session.commit()
        log.info("training job updated", extra={"job": job.name, "status": result.status})

    def _after_error(self, job: TrainingJobTable, backend: Backend, exc: Exception) -> None:
        """An error while training in process fails the job; a remote poll error is retried later."""
        if backend.trains_in_process:
            if isinstance(exc, AppError):  # a condition clients are told about, e.g. no space left for the model
                reason = f"the job could not be completed: {exc.message}"
            else:
                reason = f"internal error while training: {type(exc).__name__}: {exc}"
            self._finish(job, TrainingUpdate.failed(reason))
            return
        self._finish(
            job,
            TrainingUpdate(
                JobStatus(job.status),
                job.secondary_status,
                message=f"status poll failed, will retry: {type(exc).__name__}",
                poll_after_seconds=self.settings.remote_poll_seconds,
            ),
        )

    def _s3_filesystem(self) -> pa_fs.FileSystem:
        """pyarrow's S3 filesystem for datasets registered from S3 (opened only for such a dataset)."""
        return s3_filesystem(self.state.settings)

    def _spec(self, job: TrainingJobTable) -> TrainingSpec:
        with self.db.session() as session:
            datasets = DatasetRepository(session)
            train = datasets.get(job.train_dataset_id)
            test = datasets.get(job.test_dataset_id) if job.test_dataset_id else None
            store, columns = self.state.store, list(job.feature_columns)
            s3 = self._s3_filesystem
            return TrainingSpec(
                job_name=job.name,
                train=dataset_input(train, columns, store, s3),
                test=dataset_input(test, columns, store, s3) if test else None,
                hyperparameters=KMeansHyperparameters.from_mapping(job.hyperparameters),
                resource_config=dict(job.resource_config),
                remote=dict(job.remote),
                stop_requested=job.stop_requested,
            )


def append_transition(transitions: list[dict[str, Any]], status: str, message: str | None) -> list[dict[str, Any]]:
    """SageMaker-style SecondaryStatusTransitions: close the open entry, open a new one."""
    history = [dict(entry) for entry in transitions or []]
    if history and history[-1].get("status") == status:
        return history
    if history and history[-1].get("end_time") is None:
        history[-1]["end_time"] = utcnow().isoformat()
    return [*history, transition(status, message)]


def job_values(job: TrainingJobTable, result: TrainingUpdate) -> dict[str, Any]:
    """The job row's new values after a backend's update."""
    values: dict[str, Any] = {"status": result.status, "secondary_status": result.secondary_status}
    if result.message is not None:
        values["status_message"] = result.message
    if result.failure_reason is not None:
        values["failure_reason"] = result.failure_reason
    for name in ("points_processed", "points_total", "training_seconds", "billable_seconds"):
        if getattr(result, name) is not None:
            values[name] = getattr(result, name)
    if result.status == JobStatus.COMPLETED and result.points_processed is None:
        values["points_processed"] = job.points_total
    if result.remote:
        values["remote"] = {**job.remote, **result.remote}
    values["status_transitions"] = (
        result.transitions
        if result.transitions is not None
        else append_transition(job.status_transitions, result.secondary_status, result.message or result.failure_reason)
    )
    if (
        result.status in FINAL_STATUSES
        and values["status_transitions"]
        and values["status_transitions"][-1].get("end_time") is None
    ):
        values["status_transitions"][-1]["end_time"] = utcnow().isoformat()
    return values
