"""The background worker: claim work from the database, drive a backend, write the outcome.

A worker holds no state the database does not also hold, so it can be killed at any moment. It
runs three loops, each with a driver of its own: training jobs (:mod:`workers.jobs`) and sweeps
(:mod:`workers.sweeps`) in the calling thread, endpoint changes (:mod:`workers.endpoints`) and
dataset tasks (background uploads and derives, :mod:`workers.dataset_tasks`) in threads, so an
endpoint comes into service (or a derive runs) while a long training runs. All are woken by the
same announcements (work announced in this process, and PostgreSQL NOTIFY); each claims under its
own lease. Every loop heartbeats the worker's row (:mod:`workers.presence`).

SIGTERM (:meth:`Worker.request_shutdown`) makes a running training stop; its job is released back
to Pending for another worker, not marked Stopped. The worker process loads no web framework: it is
built from :class:`service.state.CoreState`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable

from sqlalchemy.exc import SQLAlchemyError

from service.db.changes import local_wakeups
from service.db.listen import WorkListener
from service.state import CoreState
from workers.dataset_tasks import DatasetTaskDriver
from workers.endpoints import EndpointDriver
from workers.jobs import MAX_ATTEMPTS, TrainingDriver
from workers.presence import WorkerPresence
from workers.sweeps import SweepDriver

__all__ = ["MAX_ATTEMPTS", "EmbeddedWorker", "Worker", "new_worker_id"]

log = logging.getLogger("centroid.worker")
ERROR_BACKOFF_SECONDS = (1.0, 60.0)


def new_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class _Wakeup(threading.Event):
    """The worker's wake-up: set by work announced in this process (``local_wakeups``) and by
    PostgreSQL NOTIFY (``WorkListener``). Setting it also sets every attached event, so the other
    loops and a running job's stop watch hear the same announcements."""

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


class Worker:
    def __init__(self, state: CoreState, worker_id: str | None = None) -> None:
        self.state = state
        self.settings = state.settings
        self.id = worker_id or new_worker_id()
        self.stopping = threading.Event()
        self.wakeup = _Wakeup()
        self._endpoint_wakeup = threading.Event()
        self.wakeup.attach(self._endpoint_wakeup)
        self._task_wakeup = threading.Event()
        self.wakeup.attach(self._task_wakeup)
        self.presence = WorkerPresence(
            state.database,
            self.id,
            self.settings.resolved_worker_expiry_seconds,
            lambda: self.jobs.current_job or self.sweeps.current,
        )
        self.jobs = TrainingDriver(
            state, self.id, self._backend_names, self.presence.heartbeat, self.stopping, self.wakeup
        )
        self.sweeps = SweepDriver(state, self.id, self._backend_names, self.stopping, self.wakeup)
        self.endpoints = EndpointDriver(state, self.id, self._backend_names)
        self.dataset_tasks = DatasetTaskDriver(state, self.id, self.presence.heartbeat)
        local_wakeups.register(self.wakeup)
        self._listener = WorkListener(state.database, self.wakeup)

    def _backend_names(self) -> list[str]:
        return [backend.name for backend in self.state.backends]

    def run(self) -> None:
        """Work until :meth:`request_shutdown`: training jobs here, endpoints and dataset tasks in
        threads of their own."""
        log.info("worker started", extra={"worker_id": self.id})
        self._listener.start()
        loops = [
            threading.Thread(
                target=self._loop,
                args=(self.endpoints.step, self._endpoint_wakeup, "endpoints"),
                name=f"centroid-endpoints-{self.id}",
                daemon=True,
            ),
            threading.Thread(
                target=self._loop,
                args=(self.dataset_tasks.step, self._task_wakeup, "dataset tasks"),
                name=f"centroid-dataset-tasks-{self.id}",
                daemon=True,
            ),
        ]
        for loop in loops:
            loop.start()
        try:
            self._loop(self._training_step, self.wakeup, "jobs")
        finally:
            self.stopping.set()
            self._endpoint_wakeup.set()
            self._task_wakeup.set()
            # a running upload or derive is not interrupted: it finishes, or (the process ending
            # first) its lease runs out and another worker runs it again
            for loop in loops:
                loop.join()
            self._listener.stop()
            local_wakeups.unregister(self.wakeup)
            self.presence.unregister()
        log.info("worker stopped", extra={"worker_id": self.id})

    def _training_step(self) -> bool:
        """One training job, or else one sweep: both train in this thread, one at a time."""
        return self.jobs.step() or self.sweeps.step()

    def request_shutdown(self) -> None:
        self.stopping.set()
        self.wakeup.set()

    def _loop(self, step: Callable[[], bool], wakeup: threading.Event, name: str) -> None:
        """Heartbeat and run ``step`` until shutdown; idle until a wake-up or the poll; back off
        after errors (the database down, or a bug: no loop may die while the others go on)."""
        errors = 0
        while not self.stopping.is_set():
            wakeup.clear()  # before the step: an announcement made during it is not lost
            try:
                self.presence.heartbeat()
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

    def run_once(self) -> bool:
        """Handle at most one job, one sweep, one endpoint and one dataset task, in this thread; True if there
        was anything to do."""
        self.presence.heartbeat()
        did_job = self.jobs.step()
        did_sweep = self.sweeps.step()
        did_endpoint = self.endpoints.step()
        did_task = self.dataset_tasks.step()
        return did_job or did_sweep or did_endpoint or did_task


class EmbeddedWorker:
    """A worker thread inside the API process (the one-command default)."""

    def __init__(self, state: CoreState) -> None:
        self.worker = Worker(state)
        self.thread = threading.Thread(target=self.worker.run, name="centroid-worker", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self.worker.request_shutdown()
        self.thread.join(timeout)
