"""Progress of a long dataset task (an upload's parsing, a derive), shared across threads.

The code doing the work calls :meth:`Progress.stage` when it starts a stage and
:meth:`Progress.advance` as it goes; a heartbeat thread reads :meth:`Progress.snapshot` and writes
it to the task's row. A stage that is one long DuckDB statement registers the statement's own
progress (``live``), which the snapshot reads. Nothing here blocks the work: a snapshot is a copy
taken under a lock held for microseconds.

``percent`` counts the stages planned up front as equal parts (a derive: one per step, then
writing, then checking; an upload: parsing, then checking): it is monotonic and reaches 100 only
when the dataset is committed, but it is an estimate of how far the work is, not of time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class Progress:
    """What a task is doing now; safe to update from the worker and read from a heartbeat thread."""

    def __init__(self, stages: int = 1) -> None:
        self._lock = threading.Lock()
        self._stages = max(1, stages)
        self._index = 0
        self._name = "queued"
        self._done = 0
        self._total: int | None = None
        self._unit = "rows"
        self._rows_written = 0
        self._live: Callable[[], float] | None = None
        self._floor = 0.0

    def plan(self, stages: int) -> None:
        """The number of stages the task will go through (known once its input is read)."""
        with self._lock:
            self._stages = max(1, stages)

    def stage(self, name: str, *, total: int | None = None, unit: str = "rows") -> None:
        """Start the next stage; ``total`` units of work, when known."""
        with self._lock:
            if self._name != "queued":
                self._index = min(self._index + 1, self._stages - 1)
            self._floor = max(self._floor, self._percent_locked())
            self._name, self._done, self._total, self._unit, self._live = name, 0, total, unit, None

    def advance(self, done: int, total: int | None = None) -> None:
        """``done`` units of the current stage are finished (an absolute count, not an increment)."""
        with self._lock:
            self._done = done
            if total is not None:
                self._total = total

    def rows_written(self, rows: int) -> None:
        with self._lock:
            self._rows_written = rows

    def live(self, fraction: Callable[[], float] | None) -> None:
        """Register (or clear) a callable giving the running statement's progress in [0, 1]
        (negative when unknown)."""
        with self._lock:
            self._live = fraction

    def _fraction_locked(self) -> float:
        if self._live is not None:
            try:
                value = float(self._live())
            except Exception:  # noqa: BLE001 - a progress probe must never break the work
                value = -1.0
            if value >= 0:
                return min(value, 1.0)
        if self._total:
            return min(self._done / self._total, 1.0)
        return 0.0

    def _percent_locked(self) -> float:
        if self._name == "queued":
            return 0.0
        within = self._fraction_locked()
        return min(99.9, 100.0 * (self._index + within) / self._stages)

    def snapshot(self) -> dict[str, Any]:
        """The JSON written to the task row (see ``schemas.datasets.DatasetTaskProgress``)."""
        with self._lock:
            percent = max(self._floor, self._percent_locked())
            self._floor = percent
            return {
                "stage": self._name,
                "stage_index": self._index + 1 if self._name != "queued" else 0,
                "stages": self._stages,
                "done": self._done,
                "total": self._total,
                "unit": self._unit,
                "rows_written": self._rows_written,
                "percent": round(percent, 1),
            }


def duckdb_fraction(connection: Any) -> Callable[[], float]:
    """The progress of the statement running on ``connection`` (DuckDB reports percent, or -1)."""

    def fraction() -> float:
        value = connection.query_progress()
        return -1.0 if value is None or value < 0 else value / 100.0

    return fraction
