"""The dataset-task driver: claim a background upload or derive, run it, write its outcome.

Like training jobs, a task is leased: a heartbeat thread extends the lease and writes the task's
progress about once a second. If the worker dies (or its lease runs out), another worker runs the
task again from the start: the new dataset's id was chosen when the task was made, and the dataset
row is committed in the same transaction as the task's completion, guarded by the lease, so a task
makes its dataset exactly once. A task that failed the same way more than ``MAX_ATTEMPTS`` times
(a worker killed by it, for example out of memory) is marked Failed.

On shutdown a running task is not interrupted (DuckDB's work is not resumable mid-statement): it
finishes, or the lease runs out after the process ends and another worker runs it again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from service.datasets.progress import Progress
from service.datasets.service import TaskLeaseLost, build_dataset_service
from service.datasets.task_repository import COMPLETED, FAILED, IN_PROGRESS, DatasetTaskRepository
from service.db.tables import DatasetTaskTable
from service.db.types import utcnow
from service.errors import AppError
from service.state import CoreState

log = logging.getLogger("centroid.worker")

MAX_ATTEMPTS = 3
PROGRESS_SECONDS = 1.0  # how often a running task's progress is written (and its lease extended)


class DatasetTaskDriver:
    def __init__(self, state: CoreState, worker_id: str, presence: Callable[[], None]) -> None:
        self.state = state
        self.settings = state.settings
        self.db = state.database
        self.worker_id = worker_id
        self._presence = presence  # heartbeats the worker's row

    def step(self) -> bool:
        """Claim and run at most one task; True if there was one."""
        with self.db.session() as session:
            task = DatasetTaskRepository(session).claim_next(self.worker_id, self.settings.lease_seconds)
            if task is not None:
                session.expunge(task)
        if task is None:
            return False
        log.info("claimed dataset task", extra={"task": task.id, "kind": task.kind, "worker_id": self.worker_id})
        if task.attempts >= MAX_ATTEMPTS:
            reason = f"the worker running this task stopped unexpectedly {task.attempts} times"
            self._fail(task, {"code": "internal_error", "message": reason, "details": None})
            return True
        if not self._start(task):
            return True
        try:
            self._run(task)
        except (OperationalError, InterfaceError, PoolTimeout):
            raise  # the database is away, not the task at fault: the lease runs out, the task runs again
        except TaskLeaseLost:
            log.warning("lease on dataset task %s lost; another worker runs it", task.id)
        except AppError as exc:
            self._fail(task, {"code": exc.code, "message": exc.message, "details": exc.details})
        except Exception as exc:  # noqa: BLE001 - a task's failure must never kill the worker
            log.exception("dataset task %s raised", task.id)
            message = f"internal error while running the task: {type(exc).__name__}: {exc}"
            self._fail(task, {"code": "internal_error", "message": message[:2000], "details": None})
        return True

    def _start(self, task: DatasetTaskTable) -> bool:
        values: dict[str, Any] = {"status": IN_PROGRESS, "attempts": task.attempts + 1}
        if task.started_at is None:
            values["started_at"] = utcnow()
        with self.db.session() as session:
            owned = DatasetTaskRepository(session).guarded_update(task.id, self.worker_id, values)
            session.commit()
        task.attempts += 1
        return owned

    def _run(self, task: DatasetTaskTable) -> None:
        progress = Progress()
        finished = threading.Event()
        beat = threading.Thread(
            target=self._heartbeat, args=(task.id, progress, finished), name=f"task-{task.id}", daemon=True
        )
        beat.start()
        try:
            with self.db.session() as session:
                service = build_dataset_service(session, self.settings, self.state.store)
                repository = DatasetTaskRepository(session)

                def complete() -> bool:
                    done = {**progress.snapshot(), "stage": "done", "percent": 100.0}
                    return repository.guarded_update(
                        task.id,
                        self.worker_id,
                        {
                            "status": COMPLETED,
                            "progress": done,
                            "ended_at": utcnow(),
                            "lease_owner": None,
                            "lease_expires_at": None,
                        },
                    )

                dataset = service.run_task(task, progress, complete)
            log.info("dataset task completed", extra={"task": task.id, "dataset_id": dataset.id})
        finally:
            finished.set()
            beat.join()
        self._discard_upload(task)

    def _heartbeat(self, task_id: str, progress: Progress, finished: threading.Event) -> None:
        interval = max(min(PROGRESS_SECONDS, self.settings.lease_seconds / 3), 0.05)
        while not finished.wait(interval):
            try:
                with self.db.session() as session:
                    owned = DatasetTaskRepository(session).heartbeat(
                        task_id, self.worker_id, self.settings.lease_seconds, {"progress": progress.snapshot()}
                    )
                self._presence()
            except SQLAlchemyError as exc:
                log.warning("dataset task heartbeat failed (will retry): %s", type(exc).__name__)
                continue
            if not owned:
                return  # the final, guarded commit refuses; the task is another worker's now

    def _fail(self, task: DatasetTaskTable, error: dict[str, Any]) -> None:
        with self.db.session() as session:
            repository = DatasetTaskRepository(session)
            current = repository.get(task.id).progress
            owned = repository.guarded_update(
                task.id,
                self.worker_id,
                {
                    "status": FAILED,
                    "error": error,
                    "progress": {**current, "stage": "failed"},
                    "ended_at": utcnow(),
                    "lease_owner": None,
                    "lease_expires_at": None,
                },
            )
            session.commit()
        if not owned:
            log.warning("lease on dataset task %s lost before its failure was written", task.id)
            return
        log.info("dataset task failed", extra={"task": task.id, "code": error["code"]})
        self._discard_upload(task)

    def _discard_upload(self, task: DatasetTaskTable) -> None:
        """An upload's CSV is not needed once its task has ended (a crash leaves it to the sweep)."""
        if task.kind == "upload":
            try:
                self.state.store.path(task.request["upload_key"]).unlink(missing_ok=True)
            except OSError as exc:
                log.warning("could not remove the upload of task %s: %s", task.id, exc)
