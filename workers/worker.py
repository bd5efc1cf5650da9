"""The background worker: claim work from the database, drive a backend, write the outcome.

A worker holds no state the database does not also hold, so it can be killed at any moment:

* a claimed job is leased; while a local training runs, a heartbeat thread extends the lease and
  writes progress. If the worker dies, the lease runs out and another worker (or this one,
  restarted) runs the job again from the start. Every write is guarded by ``lease_owner = me``,
  and the model row is unique per job, so a job never ends up in two models.
* remote (SageMaker) jobs and endpoints are polled: claim, ask the backend, write, release with
  ``next_poll_at`` set. A restarted worker simply picks them up again.
* a stop request is noticed within :data:`STOP_POLL_SECONDS` (at once when the request was made
  in this process or announced by PostgreSQL NOTIFY), and the engine honours it within a fraction
  of a second wherever it is (streaming, reduction, evaluation).
* SIGTERM (``request_shutdown``) makes a running training stop the same way; the job is then
  released back to Pending for another worker, not marked Stopped.
* :meth:`Worker.run` runs three loops: training jobs in the calling thread, endpoint transitions
  and dataset tasks (background uploads and derives, :mod:`workers.dataset_tasks`) in threads of
  their own, so an endpoint comes into service (or a derive runs) while a long training runs. All
  are woken by the same announcements; each claims under its own lease.
* every worker heartbeats its row in ``workers``; rows whose heartbeat is older than
  ``resolved_worker_expiry_seconds`` (workers that died without unregistering) are deleted by the
  live ones.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, update
from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from service.backends.base import (
    Backend,
    DatasetInput,
    EndpointSpec,
    EndpointUpdate,
    TrainingSpec,
    TrainingUpdate,
)
from service.datasets.repository import DatasetRepository
from service.db.changes import bump_serving, local_wakeups
from service.db.listen import WorkListener
from service.db.session import rows_affected
from service.db.tables import EndpointTable, TrainingJobTable, WorkerTable
from service.db.types import utcnow
from service.deps import AppState
from service.endpoints.repository import EndpointRepository
from service.engine import KMeansHyperparameters
from service.errors import AppError
from service.jobs.repository import FINAL_STATUSES, JobRepository
from service.jobs.service import transition
from service.models.repository import ModelRepository
from service.models.service import ModelService, served_model
from workers.dataset_tasks import DatasetTaskDriver

log = logging.getLogger("centroid.worker")
MAX_ATTEMPTS = 3
ERROR_BACKOFF_SECONDS = (1.0, 60.0)
STOP_POLL_SECONDS = 0.5  # how often a running job's stop flag is read (besides wake-ups)


def new_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class _Wakeup(threading.Event):
    """The worker's wake-up: set by work announced in this process (``local_wakeups``) and by
    PostgreSQL NOTIFY (``WorkListener``). Setting it also sets every attached event, so the
    endpoint loop and a running job's stop watch hear the same announcements."""

    def __init__(self) -> None:
        super().__init__()
        self._attached: set[threading.Event] = set()
        self._lock = threading.Lock()

    def attach(self, event: threading.Event) -> None:
        with self._lock:
            self._attached.add(event)

    def detach(self, event: threading.Event) -> None:
        with self._lock:
            self._attached.discard(event)

    def set(self) -> None:
        super().set()
        with self._lock:
            attached = list(self._attached)
        for event in attached:
            event.set()


@dataclass
class _RunningJob:
    """Shared between a training and its heartbeat thread."""

    name: str
    points_processed: int = 0
    points_total: int = 0
    stop_requested: bool = False
    lease_lost: bool = False
    shutdown: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    poke: threading.Event = field(default_factory=threading.Event)  # re-read the stop flag now

    def progress(self, points_processed: int, points_total: int) -> None:
        self.points_processed, self.points_total = points_processed, points_total

    def should_stop(self) -> bool:
        return self.stop_requested or self.lease_lost or self.shutdown.is_set()


class Worker:
    def __init__(self, state: AppState, worker_id: str | None = None) -> None:
        self.state = state
        self.settings = state.settings
        self.db = state.database
        self.id = worker_id or new_worker_id()
        self.stopping = threading.Event()
        self.wakeup = _Wakeup()
        self._endpoint_wakeup = threading.Event()
        self.wakeup.attach(self._endpoint_wakeup)
        self._task_wakeup = threading.Event()
        self.wakeup.attach(self._task_wakeup)
        self.dataset_tasks = DatasetTaskDriver(state, self.id, self._heartbeat_worker)
        local_wakeups.register(self.wakeup)
        self._listener = WorkListener(self.db, self.wakeup)
        self._current_job: str | None = None
        self._presence = threading.Lock()  # the loops and the lease thread all heartbeat the worker row
        self._expired_at = 0.0  # monotonic time dead workers' rows were last deleted

    # --- the loops ----------------------------------------------------------------------------

    def run(self) -> None:
        """Work until :meth:`request_shutdown`: training jobs here, endpoints in a second thread."""
        log.info("worker started", extra={"worker_id": self.id})
        self._listener.start()
        endpoints = threading.Thread(
            target=self._loop,
            args=(self._endpoint_step, self._endpoint_wakeup, "endpoints"),
            name=f"centroid-endpoints-{self.id}",
            daemon=True,
        )
        endpoints.start()
        tasks = threading.Thread(
            target=self._loop,
            args=(self._task_step, self._task_wakeup, "dataset tasks"),
            name=f"centroid-dataset-tasks-{self.id}",
            daemon=True,
        )
        tasks.start()
        try:
            self._loop(self._job_step, self.wakeup, "jobs")
        finally:
            self.stopping.set()
            self._endpoint_wakeup.set()
            self._task_wakeup.set()
            endpoints.join()
            # a running upload or derive is not interrupted: it finishes, or (the process ending
            # first) its lease runs out and another worker runs it again
            tasks.join()
            self._listener.stop()
            local_wakeups.unregister(self.wakeup)
            self._unregister()
        log.info("worker stopped", extra={"worker_id": self.id})

    def request_shutdown(self) -> None:
        self.stopping.set()
        self.wakeup.set()

    def _loop(self, step: Callable[[], bool], wakeup: threading.Event, name: str) -> None:
        """Run ``step`` until shutdown; idle until a wake-up or the poll; back off after errors
        (the database down, or a bug: neither loop may die while the other goes on)."""
        errors = 0
        while not self.stopping.is_set():
            wakeup.clear()  # before the step: an announcement made during it is not lost
            try:
                busy = step()
                errors = 0
            except Exception as exc:  # noqa: BLE001
                errors += 1
                delay = min(ERROR_BACKOFF_SECONDS[0] * 2 ** (errors - 1), ERROR_BACKOFF_SECONDS[1])
                if isinstance(exc, SQLAlchemyError):
                    log.warning(
                        "database unavailable, retrying in %.1fs: %s (%s loop)", delay, type(exc).__name__, name
                    )
                else:
                    log.exception("worker step failed, retrying in %.1fs (%s loop)", delay, name)
                self.stopping.wait(delay)
                continue
            if not busy:
                wakeup.wait(self.settings.worker_poll_interval)

    def _job_step(self) -> bool:
        self._heartbeat_worker()
        return self._next_job()

    def _endpoint_step(self) -> bool:
        self._heartbeat_worker()
        return self._next_endpoint()

    def _task_step(self) -> bool:
        self._heartbeat_worker()
        return self.dataset_tasks.step()

    def run_once(self) -> bool:
        """Handle at most one job, one endpoint and one dataset task, in this thread; True if there
        was anything to do."""
        self._heartbeat_worker()
        did_job = self._next_job()
        did_endpoint = self._next_endpoint()
        did_task = self.dataset_tasks.step()
        return did_job or did_endpoint or did_task

    @property
    def _backend_names(self) -> list[str]:
        return [backend.name for backend in self.state.backends]

    # --- training jobs ------------------------------------------------------------------------

    def _next_job(self) -> bool:
        with self.db.session() as session:
            job = JobRepository(session).claim_next(self.id, self.settings.lease_seconds, self._backend_names)
        if job is None:
            return False
        log.info("claimed training job", extra={"job": job.name, "status": job.status, "worker_id": self.id})
        backend = self.state.backends.get(job.backend)
        try:
            self._drive_job(job, backend)
        except (OperationalError, InterfaceError, PoolTimeout):
            # The database is unavailable, not the job at fault: `run` backs off; the lease runs out
            # and the job is run again. (Failing it here would turn a database blip into a failed job.)
            raise
        except Exception as exc:  # noqa: BLE001 - a job's failure must never kill the worker
            log.exception("training job %s raised", job.name)
            self._after_error(job, backend, exc)
        return True

    def _drive_job(self, job: TrainingJobTable, backend: Backend) -> None:
        if job.backend == "local":
            self._run_local(job, backend)
        else:
            self._poll_remote(job, backend)

    def _run_local(self, job: TrainingJobTable, backend: Backend) -> None:
        if job.stop_requested:
            self._finish(
                job, TrainingUpdate(status="Stopped", secondary_status="Stopped", message="stopped on request")
            )
            return
        if job.attempts >= MAX_ATTEMPTS:
            reason = f"the worker running this job stopped unexpectedly {job.attempts} times"
            self._finish(job, TrainingUpdate(status="Failed", secondary_status="Failed", failure_reason=reason))
            return
        if not self._mark_training(job):
            return
        running = _RunningJob(job.name, points_total=job.points_total, shutdown=self.stopping)
        heartbeat = threading.Thread(target=self._heartbeat_job, args=(running,), daemon=True, name=f"lease-{job.name}")
        self._current_job = job.name
        self.wakeup.attach(running.poke)
        heartbeat.start()
        try:
            update_ = backend.advance_training(self._spec(job), running)
        finally:
            running.finished.set()
            running.poke.set()
            heartbeat.join()
            self.wakeup.detach(running.poke)
            self._current_job = None
        if running.lease_lost:
            log.warning("lost the lease on %s; another worker owns it now", job.name)
            return
        if update_.status == "Stopped" and not running.stop_requested and self.stopping.is_set():
            self._release(job)
            return
        self._finish(job, update_)

    def _mark_training(self, job: TrainingJobTable) -> bool:
        now = utcnow()
        values = {
            "status": "InProgress",
            "secondary_status": "Training",
            "status_message": f"training on worker {self.id}",
            "started_at": job.started_at or now,
            "attempts": job.attempts + 1,
            "points_processed": 0,
            "status_transitions": _append_transition(job.status_transitions, "Training", f"worker {self.id}"),
        }
        with self.db.session() as session:
            owned = JobRepository(session).guarded_update(job.name, self.id, values)
            session.commit()
        for key, value in values.items():
            setattr(job, key, value)
        return owned

    def _heartbeat_job(self, running: _RunningJob) -> None:
        """Extend the lease (and write progress) every lease/3 (at most 5 s); read the stop flag
        every STOP_POLL_SECONDS, and at once when woken (a stop made here or NOTIFYed)."""
        interval = max(min(self.settings.lease_seconds / 3, 5.0), 0.05)
        stop_poll = min(interval, STOP_POLL_SECONDS)
        next_lease = time.monotonic() + interval
        while True:
            running.poke.wait(stop_poll)
            running.poke.clear()
            if running.finished.is_set():
                return
            try:
                with self.db.session() as session:
                    repository = JobRepository(session)
                    running.stop_requested = running.stop_requested or repository.stop_requested(running.name)
                    if time.monotonic() < next_lease:
                        continue
                    owned = repository.heartbeat(
                        running.name,
                        self.id,
                        self.settings.lease_seconds,
                        {"points_processed": running.points_processed},
                    )
                next_lease = time.monotonic() + interval
                self._heartbeat_worker()
            except SQLAlchemyError as exc:
                log.warning("heartbeat failed (will retry): %s", type(exc).__name__)
                continue
            if not owned:
                running.lease_lost = True
                return

    def _poll_remote(self, job: TrainingJobTable, backend: Backend) -> None:
        spec = self._spec(job)
        if job.stop_requested and job.remote and not job.remote.get("stop_sent"):
            backend.stop_training(spec)
            job.remote = {**job.remote, "stop_sent": True}
            spec = self._spec(job)
        if job.status == "Pending":
            if job.stop_requested:
                self._finish(
                    job, TrainingUpdate(status="Stopped", secondary_status="Stopped", message="stopped on request")
                )
                return
            self._mark_started_remote(job)
        update_ = backend.advance_training(spec, _RunningJob(job.name))
        self._finish(job, update_)

    def _mark_started_remote(self, job: TrainingJobTable) -> None:
        values = {"status": "InProgress", "started_at": utcnow(), "attempts": job.attempts + 1}
        with self.db.session() as session:
            JobRepository(session).guarded_update(job.name, self.id, values)
            session.commit()
        for key, value in values.items():
            setattr(job, key, value)

    def _finish(self, job: TrainingJobTable, result: TrainingUpdate) -> None:
        """Write a backend's update; register the model when it completed; release the lease."""
        values = _job_values(job, result)
        final = result.status in FINAL_STATUSES
        if final:
            values.update(ended_at=utcnow(), lease_owner=None, lease_expires_at=None, next_poll_at=None)
        else:
            poll_after = result.poll_after_seconds or self.settings.remote_poll_seconds
            values.update(
                lease_owner=None, lease_expires_at=None, next_poll_at=utcnow() + timedelta(seconds=poll_after)
            )
        with self.db.session() as session:
            if result.status == "Completed" and result.result is not None:
                model = ModelService(session, self.state.store).register_trained(job, result.result, self.id, values)
                if model is None:
                    log.warning("lease on %s lost before registration; discarded the result", job.name)
                else:
                    log.info("training job completed", extra={"job": job.name, "model_id": model.id})
                return
            JobRepository(session).guarded_update(job.name, self.id, values)
            session.commit()
        log.info("training job updated", extra={"job": job.name, "status": result.status})

    def _release(self, job: TrainingJobTable) -> None:
        """Give a job back (shutdown mid-training): Pending again, for any worker."""
        values = {
            "status": "Pending",
            "secondary_status": "Starting",
            "status_message": "released by a worker that shut down; waiting for a worker",
            "points_processed": 0,
            "attempts": max(job.attempts - 1, 0),
            "lease_owner": None,
            "lease_expires_at": None,
            "status_transitions": _append_transition(job.status_transitions, "Starting", "released on shutdown"),
        }
        with self.db.session() as session:
            JobRepository(session).guarded_update(job.name, self.id, values)
            session.commit()
        log.info("released training job on shutdown", extra={"job": job.name})

    def _after_error(self, job: TrainingJobTable, backend: Backend, exc: Exception) -> None:
        """Local training errors fail the job; a remote poll error is retried later."""
        if job.backend == "local":
            if isinstance(exc, AppError):  # a condition clients are told about, e.g. no space left for the model
                reason = f"the job could not be completed: {exc.message}"
            else:
                reason = f"internal error while training: {type(exc).__name__}: {exc}"
            self._finish(job, TrainingUpdate(status="Failed", secondary_status="Failed", failure_reason=reason))
            return
        self._finish(
            job,
            TrainingUpdate(
                status=job.status,
                secondary_status=job.secondary_status,
                message=f"status poll failed, will retry: {type(exc).__name__}",
                poll_after_seconds=self.settings.remote_poll_seconds,
            ),
        )

    def _spec(self, job: TrainingJobTable) -> TrainingSpec:
        with self.db.session() as session:
            datasets = DatasetRepository(session)
            train = datasets.get(job.train_dataset_id)
            test = datasets.get(job.test_dataset_id) if job.test_dataset_id else None
            store = self.state.store
            return TrainingSpec(
                job_name=job.name,
                train=DatasetInput(train.id, store.path(train.storage_key), list(job.feature_columns), train.row_count),
                test=DatasetInput(test.id, store.path(test.storage_key), list(job.feature_columns), test.row_count)
                if test
                else None,
                hyperparameters=KMeansHyperparameters.from_mapping(job.hyperparameters),
                resource_config=dict(job.resource_config),
                remote=dict(job.remote),
                stop_requested=job.stop_requested,
            )

    # --- endpoints ----------------------------------------------------------------------------

    def _next_endpoint(self) -> bool:
        with self.db.session() as session:
            endpoint = EndpointRepository(session).claim_next(self.id, self.settings.lease_seconds, self._backend_names)
            if endpoint is None:
                return False
            model = ModelRepository(session).get(endpoint.pending_model_id or endpoint.model_id)
            spec = EndpointSpec(
                endpoint.name, served_model(model, self.state.store), endpoint.instance_config, endpoint.remote
            )
        backend = self.state.backends.get(endpoint.backend)
        try:
            result = backend.delete_endpoint(spec) if endpoint.status == "Deleting" else backend.advance_endpoint(spec)
        except Exception as exc:  # noqa: BLE001 - a backend failure must never kill the worker
            log.exception("endpoint %s raised", endpoint.name)
            result = EndpointUpdate(status=endpoint.status, poll_after_seconds=self.settings.remote_poll_seconds)
            result.failure_reason = f"{type(exc).__name__}: {exc}"
        self._write_endpoint(endpoint, spec, result)
        return True

    def _write_endpoint(self, endpoint: EndpointTable, spec: EndpointSpec, result: EndpointUpdate) -> None:
        with self.db.session() as session:
            if result.gone:
                session.execute(
                    delete(EndpointTable).where(
                        EndpointTable.name == endpoint.name, EndpointTable.lease_owner == self.id
                    )
                )
                bump_serving(session)
                session.commit()
                self.state.catalog.changed()
                log.info("endpoint deleted", extra={"endpoint": endpoint.name})
                return
            values = _endpoint_values(endpoint, spec, result)
            if result.status == endpoint.status and result.status in ("Creating", "Updating", "Deleting"):
                poll_after = result.poll_after_seconds or self.settings.remote_poll_seconds
                values["next_poll_at"] = utcnow() + timedelta(seconds=poll_after)
            if EndpointRepository(session).guarded_update(endpoint.name, self.id, values):
                bump_serving(session)
            session.commit()
        self.state.catalog.changed()
        log.info("endpoint updated", extra={"endpoint": endpoint.name, "status": values.get("status")})

    # --- presence -----------------------------------------------------------------------------

    def _heartbeat_worker(self) -> None:
        """Mark this worker alive (registering it if needed); now and then delete dead workers' rows."""
        with self._presence, self.db.session() as session:
            now = utcnow()
            current_job = self._current_job
            updated = rows_affected(
                session.execute(
                    update(WorkerTable)
                    .where(WorkerTable.id == self.id)
                    .values(heartbeat_at=now, last_poll_at=now, current_job=current_job)
                )
            )
            if not updated:
                session.add(
                    WorkerTable(
                        id=self.id,
                        hostname=socket.gethostname()[:255],
                        pid=os.getpid(),
                        started_at=now,
                        heartbeat_at=now,
                        last_poll_at=now,
                        current_job=current_job,
                    )
                )
            session.commit()
        self._expire_dead_workers()

    def _expire_dead_workers(self) -> None:
        """Delete the rows of workers whose heartbeat is older than the expiry (at most every expiry/3)."""
        expiry = self.settings.resolved_worker_expiry_seconds
        if time.monotonic() - self._expired_at < expiry / 3:
            return
        self._expired_at = time.monotonic()
        with self.db.session() as session:
            gone = rows_affected(
                session.execute(
                    delete(WorkerTable).where(
                        WorkerTable.heartbeat_at < utcnow() - timedelta(seconds=expiry), WorkerTable.id != self.id
                    )
                )
            )
            session.commit()
        if gone:
            log.info("expired %d dead worker(s)", gone, extra={"worker_id": self.id})

    def _unregister(self) -> None:
        try:
            with self.db.session() as session:
                session.execute(delete(WorkerTable).where(WorkerTable.id == self.id))
                session.commit()
        except SQLAlchemyError:
            log.warning("could not unregister worker %s", self.id)


def _append_transition(transitions: list[dict[str, Any]], status: str, message: str | None) -> list[dict[str, Any]]:
    """SageMaker-style SecondaryStatusTransitions: close the open entry, open a new one."""
    history = [dict(entry) for entry in transitions or []]
    if history and history[-1].get("status") == status:
        return history
    if history and history[-1].get("end_time") is None:
        history[-1]["end_time"] = utcnow().isoformat()
    return [*history, transition(status, message)]


def _job_values(job: TrainingJobTable, result: TrainingUpdate) -> dict[str, Any]:
    values: dict[str, Any] = {"status": result.status, "secondary_status": result.secondary_status}
    if result.message is not None:
        values["status_message"] = result.message
    if result.failure_reason is not None:
        values["failure_reason"] = result.failure_reason
    for name in ("points_processed", "points_total", "training_seconds", "billable_seconds"):
        if getattr(result, name) is not None:
            values[name] = getattr(result, name)
    if result.status == "Completed" and result.points_processed is None:
        values["points_processed"] = job.points_total
    if result.remote:
        values["remote"] = {**job.remote, **result.remote}
    values["status_transitions"] = (
        result.transitions
        if result.transitions is not None
        else _append_transition(
            job.status_transitions, result.secondary_status, result.message or result.failure_reason
        )
    )
    if (
        result.status in FINAL_STATUSES
        and values["status_transitions"]
        and values["status_transitions"][-1].get("end_time") is None
    ):
        values["status_transitions"][-1]["end_time"] = utcnow().isoformat()
    return values


def _endpoint_values(endpoint: EndpointTable, spec: EndpointSpec, result: EndpointUpdate) -> dict[str, Any]:
    values: dict[str, Any] = {"lease_owner": None, "lease_expires_at": None}
    if result.remote:
        values["remote"] = {**endpoint.remote, **result.remote}
    if result.status == "InService":
        values.update(status="InService", model_id=spec.model.model_id, pending_model_id=None, failure_reason=None)
    elif result.status == "Failed" and endpoint.status == "Updating":
        values.update(
            status="InService",
            pending_model_id=None,
            failure_reason=f"switch to model {spec.model.model_id} failed: {result.failure_reason}",
        )
    elif result.status == "Failed":
        values.update(status="Failed", failure_reason=result.failure_reason)
    else:
        values.update(status=endpoint.status, failure_reason=result.failure_reason)
    return values


class EmbeddedWorker:
    """A worker thread inside the API process (the one-command default)."""

    def __init__(self, state: AppState) -> None:
        self.worker = Worker(state)
        self.thread = threading.Thread(target=self.worker.run, name="centroid-worker", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self.worker.request_shutdown()
        self.thread.join(timeout)
