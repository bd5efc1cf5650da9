"""The sweep driver: claim a sweep, run the engine's one-pass sweep, write the outcome.

Like a local training job (:mod:`workers.jobs`): the whole sweep runs in one call while a heartbeat
thread extends the lease, writes progress and watches for a stop. A killed worker loses nothing:
its lease runs out and another worker runs the sweep again from the start; every write is guarded
by ``lease_owner = me``, so a sweep's outcome is written once. On shutdown a running sweep stops and
is released back to Pending for another worker.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from service.datasets.repository import DatasetRepository
from service.datasets.s3 import dataset_input, s3_filesystem
from service.db.tables import SweepTable
from service.db.types import utcnow
from service.engine import EngineInputError, HyperparameterError, KMeansHyperparameters, TrainingStopped, sweep
from service.engine.sweep import SweepResult
from service.errors import AppError
from service.state import CoreState
from service.statuses import JobStatus
from service.sweeps.repository import SweepRepository
from workers.jobs import MAX_ATTEMPTS  # the same retry budget as a training job
from workers.leases import hold_lease

log = logging.getLogger("centroid.worker")


@dataclass
class _Running:
    """Shared between a sweep and its heartbeat thread."""

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
    """Runs one sweep per :meth:`step`."""

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
        """Claim and run at most one sweep; True if there was one."""
        with self.db.session() as session:
            row = SweepRepository(session).claim_next(
                self.worker_id, self.settings.lease_seconds, self._backend_names()
            )
        if row is None:
            return False
        log.info("claimed sweep", extra={"sweep": row.name, "worker_id": self.worker_id})
        try:
            self._run(row)
        except (OperationalError, InterfaceError, PoolTimeout):
            raise  # the database, not the sweep: the lease runs out and it runs again
        except Exception as exc:  # noqa: BLE001 - a sweep's failure must never kill the worker
            log.exception("sweep %s raised", row.name)
            reason = exc.message if isinstance(exc, AppError) else f"{type(exc).__name__}: {exc}"
            self._write(row.name, self._ended(JobStatus.FAILED, failure_reason=f"the sweep failed: {reason}"))
        return True

    def _run(self, row: SweepTable) -> None:
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
        running = _Running(row.name, stop_requested=row.stop_requested, shutdown=self.stopping)
        heartbeat = threading.Thread(target=self._heartbeat, args=(running,), daemon=True, name=f"lease-{row.name}")
        self.current = row.name
        self.wakeup.attach(running.poke)
        heartbeat.start()
        outcome: dict[str, Any] | None = None
        failure: str | None = None
        try:
            outcome = self._sweep(row, running)
        except TrainingStopped:
            pass
        except (EngineInputError, HyperparameterError) as exc:
            failure = str(exc)
        finally:
            running.finished.set()
            running.poke.set()
            heartbeat.join()
            self.wakeup.detach(running.poke)
            self.current = None
        if running.lease_lost:
            log.warning("lost the lease on sweep %s; another worker owns it now", row.name)
        elif failure is not None:
            self._write(row.name, self._ended(JobStatus.FAILED, failure_reason=failure))
        elif outcome is not None:
            values = self._ended(JobStatus.COMPLETED, status_message="sweep completed")
            self._write(row.name, {**values, **outcome, "rows_processed": row.rows_total})
            log.info("sweep completed", extra={"sweep": row.name})
        elif running.stop_requested:
            message = f"stopped after {running.rows_processed} rows"
            self._write(row.name, self._ended(JobStatus.STOPPED, status_message=message))
        else:  # shutting down: released, for another worker to run from the start
            released = {"status": JobStatus.PENDING, "status_message": "released by a worker that shut down"}
            self._write(row.name, {**released, "attempts": row.attempts, "rows_processed": 0})

    def _sweep(self, row: SweepTable, running: _Running) -> dict[str, Any]:
        with self.db.session() as session:
            datasets = DatasetRepository(session)
            train = datasets.get(row.train_dataset_id)
            test = datasets.get(row.test_dataset_id) if row.test_dataset_id else None
            columns = list(row.feature_columns)
            s3 = lambda: s3_filesystem(self.settings)  # noqa: E731 - opened only for a dataset in S3
            train_input = dataset_input(train, columns, self.state.store, s3)
            test_input = dataset_input(test, columns, self.state.store, s3) if test else None
        hyperparameters = KMeansHyperparameters.from_mapping(row.hyperparameters)
        result = sweep(
            train_input.batch_source(),
            list(row.k_values),
            hyperparameters,
            test=test_input.batch_source() if test_input else None,
            sample_size=row.sample_size,
            progress=running.progress,
            should_stop=running.should_stop,
        )
        return outcome_of(result)

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
            values = {**values, "lease_owner": None, "lease_expires_at": None, "next_poll_at": None}
        with self.db.session() as session:
            owned = SweepRepository(session).guarded_update(name, self.worker_id, values)
            session.commit()
        return owned


def outcome_of(result: SweepResult) -> dict[str, Any]:
    """The sweep's result as stored on its row: ``outcome`` (per-k metrics, the recommendation,
    the models registered so far) and ``trained_state`` (each k's centroids and the shared local
    centers and weights: what a registered model's artifact holds)."""

    def number(value: float | None) -> float | None:
        return None if value is None or not np.isfinite(value) else float(value)

    return {
        "outcome": {
            "evaluated_on": result.evaluated_on,
            "sample_rows": result.sample_rows,
            "results": [
                {
                    "k": r.k,
                    "msd": float(r.msd),
                    "ssd": float(r.ssd),
                    "train_msd": float(r.reduction_msd),
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
        "trained_state": {
            "centroids": {str(r.k): np.asarray(r.centers, dtype=np.float64).tolist() for r in result.results},
            "local_centers": np.asarray(result.local_centers, dtype=np.float64).tolist(),
            "local_weights": np.asarray(result.local_weights, dtype=np.float64).tolist(),
        },
    }
