"""The sweep driver: claim a sweep, drive its backend, write the outcome.

Like the training-job driver (:mod:`workers.jobs`):

* the local backend runs the whole sweep in one call (the engine's one-pass sweep) while a
  heartbeat thread extends the lease, writes progress and watches for a stop. A killed worker
  loses nothing: its lease runs out and another worker runs the sweep again from the start; on
  shutdown a running sweep stops and is released back to Pending for another worker;
* a remote backend (SageMaker: one training job per k) is polled: claim, advance, write, release
  with ``next_poll_at`` set; everything the next poll needs is in the row's ``remote``.

Every write is guarded by ``lease_owner = me``, so a sweep's outcome is written once.
"""

from __future__ import annotations

import base64
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from service.backends.base import Backend, SweepSpec, SweepUpdate
from service.datasets.repository import DatasetRepository
from service.datasets.s3 import dataset_input, s3_filesystem
from service.db.tables import SweepTable
from service.db.types import utcnow
from service.engine import KMeansHyperparameters
from service.engine.sweep import SweepResult
from service.errors import AppError
from service.state import CoreState
from service.statuses import JobStatus
from service.sweeps.repository import FINAL_STATUSES, SweepRepository
from workers.jobs import MAX_ATTEMPTS  # the same retry budget as a training job
from workers.leases import hold_lease

log = logging.getLogger("centroid.worker")


@dataclass
class _Running:
    """Shared between a sweep and its heartbeat thread (and the backend's hooks)."""

    name: str
    rows_processed: int = 0
    stop_requested: bool = False
    lease_lost: bool = False
    shutdown: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    poke: threading.Event = field(default_factory=threading.Event)

    def progress(self, done: int, total: int) -> None:
        self.rows_processed = done

    def should_stop(self) -> bool:
        return self.stop_requested or self.lease_lost or self.shutdown.is_set()


class SweepDriver:
    """Runs (or polls) one sweep per :meth:`step`."""

    def __init__(
        self,
        state: CoreState,
        worker_id: str,
        backend_names: Callable[[], list[str]],
        stopping: threading.Event,
        wakeup: Any,
    ) -> None:
        self.state = state
        self.settings = state.settings
        self.db = state.database
        self.worker_id = worker_id
        self._backend_names = backend_names
        self.stopping = stopping
        self.wakeup = wakeup
        self.current: str | None = None

    def step(self) -> bool:
        """Claim and drive at most one sweep; True if there was one."""
        with self.db.session() as session:
            row = SweepRepository(session).claim_next(
                self.worker_id, self.settings.lease_seconds, self._backend_names()
            )
        if row is None:
            return False
        log.info("claimed sweep", extra={"sweep": row.name, "worker_id": self.worker_id})
        backend = self.state.backends.get(row.backend)
        try:
            if backend.trains_in_process:
                self._run(row, backend)
            else:
                self._poll_remote(row, backend)
        except (OperationalError, InterfaceError, PoolTimeout):
            raise  # the database, not the sweep: the lease runs out and it runs again
        except Exception as exc:  # noqa: BLE001 - a sweep's failure must never kill the worker
            log.exception("sweep %s raised", row.name)
            if backend.trains_in_process:
                reason = exc.message if isinstance(exc, AppError) else f"{type(exc).__name__}: {exc}"
                self._write(row.name, self._ended(JobStatus.FAILED, failure_reason=f"the sweep failed: {reason}"))
            else:  # a remote poll's error (the network, AWS): poll again later
                message = f"status poll failed, will retry: {type(exc).__name__}"
                self._write(row.name, {"status_message": message, **self._next_poll(None)})
        return True

    # --- in the worker's process ------------------------------------------------------------------

    def _run(self, row: SweepTable, backend: Backend) -> None:
        if row.stop_requested:
            self._write(row.name, self._ended(JobStatus.STOPPED, status_message="stopped before it started"))
            return
        if row.attempts >= MAX_ATTEMPTS:
            reason = f"the worker running this sweep stopped unexpectedly {row.attempts} times"
            self._write(row.name, self._ended(JobStatus.FAILED, failure_reason=reason))
            return
        started = {
            "status": JobStatus.IN_PROGRESS,
            "status_message": f"sweeping on worker {self.worker_id}",
            "started_at": row.started_at or utcnow(),
            "attempts": row.attempts + 1,
            "rows_processed": 0,
        }
        if not self._write(row.name, started, release=False):
            return
        update, running = self._advance(row, backend)
        if running.lease_lost:
            log.warning("lost the lease on sweep %s; another worker owns it now", row.name)
        elif update.status == JobStatus.STOPPED and not running.stop_requested and self.stopping.is_set():
            # shutting down: released, for another worker to run from the start
            released = {"status": JobStatus.PENDING, "status_message": "released by a worker that shut down"}
            self._write(row.name, {**released, "attempts": row.attempts, "rows_processed": 0})
        else:
            self._finish(row, update)

    def _advance(self, row: SweepTable, backend: Backend) -> tuple[SweepUpdate, _Running]:
        """One ``advance_sweep`` call under the lease's heartbeat."""
        running = _Running(row.name, stop_requested=row.stop_requested, shutdown=self.stopping)
        heartbeat = threading.Thread(target=self._heartbeat, args=(running,), daemon=True, name=f"lease-{row.name}")
        self.current = row.name
        self.wakeup.attach(running.poke)
        heartbeat.start()
        try:
            update = backend.advance_sweep(self._spec(row), running)
        finally:
            running.finished.set()
            running.poke.set()
            heartbeat.join()
            self.wakeup.detach(running.poke)
            self.current = None
        return update, running

    # --- remote -----------------------------------------------------------------------------------

    def _poll_remote(self, row: SweepTable, backend: Backend) -> None:
        if row.stop_requested and row.remote and not row.remote.get("stop_sent"):
            backend.stop_sweep(self._spec(row))
            row.remote = {**row.remote, "stop_sent": True}
        if row.status == JobStatus.PENDING:
            if row.stop_requested:
                self._write(row.name, self._ended(JobStatus.STOPPED, status_message="stopped before it started"))
                return
            values = {"status": JobStatus.IN_PROGRESS, "started_at": utcnow(), "attempts": row.attempts + 1}
            if not self._write(row.name, values, release=False):
                return
        update, running = self._advance(row, backend)
        if running.lease_lost:
            log.warning("lost the lease on sweep %s during a remote step; another worker owns it now", row.name)
            return
        abandoned = update.status == JobStatus.STOPPED and not row.remote.get("data") and not running.stop_requested
        if abandoned and self.stopping.is_set():  # the upload was abandoned on shutdown: another worker does it
            released = {"status": JobStatus.PENDING, "status_message": "released by a worker that shut down"}
            self._write(row.name, {**released, "attempts": row.attempts})
            return
        self._finish(row, update)

    # --- outcomes ---------------------------------------------------------------------------------

    def _finish(self, row: SweepTable, update: SweepUpdate) -> None:
        values: dict[str, Any] = {"status": update.status}
        if update.message is not None:
            values["status_message"] = update.message
        if update.failure_reason is not None:
            values["failure_reason"] = update.failure_reason
        if update.remote:
            values["remote"] = {**row.remote, **update.remote}
        if update.status == JobStatus.COMPLETED and update.result is not None:
            values.update(outcome_of(update.result, update.artifacts), rows_processed=row.rows_total)
            log.info("sweep completed", extra={"sweep": row.name})
        if update.status in FINAL_STATUSES:
            self._write(row.name, {**values, "ended_at": utcnow()})
        else:
            self._write(row.name, {**values, **self._next_poll(update.poll_after_seconds)})

    def _next_poll(self, seconds: float | None) -> dict[str, Any]:
        """Release the lease until the next poll is due."""
        delay = seconds or self.settings.remote_poll_seconds
        return {"lease_owner": None, "lease_expires_at": None, "next_poll_at": utcnow() + timedelta(seconds=delay)}

    def _spec(self, row: SweepTable) -> SweepSpec:
        with self.db.session() as session:
            datasets = DatasetRepository(session)
            train = datasets.get(row.train_dataset_id)
            test = datasets.get(row.test_dataset_id) if row.test_dataset_id else None
            columns = list(row.feature_columns)
            s3 = lambda: s3_filesystem(self.settings)  # noqa: E731 - opened only for a dataset in S3
            return SweepSpec(
                name=row.name,
                train=dataset_input(train, columns, self.state.store, s3),
                test=dataset_input(test, columns, self.state.store, s3) if test else None,
                ks=list(row.k_values),
                hyperparameters=KMeansHyperparameters.from_mapping(row.hyperparameters),
                sample_size=row.sample_size,
                remote=dict(row.remote or {}),
                stop_requested=row.stop_requested,
            )

    def _heartbeat(self, running: _Running) -> None:
        hold_lease(
            self.db,
            SweepRepository,
            running,
            self.worker_id,
            self.settings.lease_seconds,
            progress=lambda: {"rows_processed": running.rows_processed},
        )

    @staticmethod
    def _ended(status: JobStatus, **values: Any) -> dict[str, Any]:
        return {"status": status, "ended_at": utcnow(), **values}

    def _write(self, name: str, values: dict[str, Any], *, release: bool = True) -> bool:
        """Write ``values`` while this worker holds the lease (releasing it unless asked not to)."""
        if release:
            values = {"lease_owner": None, "lease_expires_at": None, "next_poll_at": None, **values}
        with self.db.session() as session:
            owned = SweepRepository(session).guarded_update(name, self.worker_id, values)
            session.commit()
        return owned


def outcome_of(result: SweepResult, artifacts: dict[int, bytes] | None = None) -> dict[str, Any]:
    """The sweep's result as stored on its row: ``outcome`` (per-k metrics, the recommendation,
    the models registered so far) and ``trained_state`` (each k's centroids, and what a
    registered model's artifact is made of: the shared local centers and weights of a local
    sweep, or each k's artifact as SageMaker wrote it, base64)."""

    def number(value: float | None) -> float | None:
        return None if value is None or not np.isfinite(value) else float(value)

    state: dict[str, Any] = {
        "centroids": {str(r.k): np.asarray(r.centers, dtype=np.float64).tolist() for r in result.results}
    }
    if result.local_centers is not None and result.local_weights is not None:
        state["local_centers"] = np.asarray(result.local_centers, dtype=np.float64).tolist()
        state["local_weights"] = np.asarray(result.local_weights, dtype=np.float64).tolist()
    if artifacts:
        state["artifacts"] = {str(k): base64.b64encode(data).decode("ascii") for k, data in artifacts.items()}

    return {
        "outcome": {
            "evaluated_on": result.evaluated_on,
            "sample_rows": result.sample_rows,
            "results": [
                {
                    "k": r.k,
                    "msd": float(r.msd),
                    "ssd": float(r.ssd),
                    "train_msd": number(r.reduction_msd),
                    "cluster_sizes": list(r.cluster_sizes),
                    "silhouette": number(r.silhouette),
                    "davies_bouldin": number(r.davies_bouldin),
                    "calinski_harabasz": number(r.calinski_harabasz),
                }
                for r in result.results
            ],
            "recommendation": {
                "k": result.recommendation.k,
                "elbow_k": result.recommendation.elbow_k,
                "best_silhouette_k": result.recommendation.best_silhouette_k,
                "reasons": list(result.recommendation.reasons),
            },
            "models": {},
        },
        "trained_state": state,
    }
