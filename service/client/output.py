"""What the client subcommands print: rich tables for people, one JSON document for scripts.

Tables and progress go through rich consoles made when they are needed (so they write to whatever
``sys.stdout`` / ``sys.stderr`` is at that moment); errors are plain lines on stderr, never rich
markup (a message may hold ``[brackets]``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from rich.console import Console, RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

JsonObject = dict[str, Any]


def stdout() -> Console:
    return Console(highlight=False)


def stderr() -> Console:
    return Console(stderr=True, highlight=False)


def emit_json(document: Any) -> None:
    """One JSON document on stdout (what ``--json`` prints)."""
    sys.stdout.write(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def error(message: str) -> None:
    print(f"centroid: error: {message}", file=sys.stderr, flush=True)


def note(message: str) -> None:
    print(f"centroid: note: {message}", file=sys.stderr, flush=True)


def show(*renderables: RenderableType) -> None:
    console = stdout()
    for renderable in renderables:
        console.print(renderable)


def _fields(title: str, rows: Iterable[tuple[str, Any]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for name, value in rows:
        table.add_row(name, Text("" if value is None else str(value)))
    return table


def dataset_table(dataset: Mapping[str, Any]) -> Table:
    columns = ", ".join(f"{c['name']} ({c['dtype']})" for c in dataset.get("columns", []))
    return _fields(
        f"Dataset {dataset['id']}",
        [
            ("name", dataset.get("name")),
            ("key column", dataset.get("key_column") or "(none: rows are labelled by position)"),
            ("rows", dataset.get("row_count")),
            ("columns", columns),
        ],
    )


def _percent(job: Mapping[str, Any]) -> str:
    progress = job.get("progress") or {}
    return f"{progress.get('points_processed', 0)} / {progress.get('points_total', 0)} points"


def job_table(job: Mapping[str, Any]) -> Table:
    rows: list[tuple[str, Any]] = [
        ("status", f"{job['status']} ({job.get('secondary_status')})"),
        ("dataset", job.get("train_dataset_id")),
        ("k", (job.get("hyperparameters") or {}).get("k")),
        ("progress", _percent(job)),
        ("training seconds", job.get("training_seconds")),
        ("model", job.get("model_id")),
    ]
    if job.get("failure_reason"):
        rows.append(("failure reason", job["failure_reason"]))
    return _fields(f"Training job {job['name']}", rows)


def endpoint_table(endpoint: Mapping[str, Any]) -> Table:
    rows: list[tuple[str, Any]] = [
        ("status", endpoint["status"]),
        ("model", endpoint.get("model_id")),
        ("backend", endpoint.get("backend")),
    ]
    if endpoint.get("failure_reason"):
        rows.append(("failure reason", endpoint["failure_reason"]))
    return _fields(f"Endpoint {endpoint['name']}", rows)


def predictions_table(predictions: Iterable[Mapping[str, Any]], title: str = "Predictions", key: str = "Key") -> Table:
    """Key, cluster and distance per row, in the order given."""
    table = Table(title=title, title_justify="left")
    table.add_column(key)
    table.add_column("Cluster", justify="right")
    table.add_column("Distance", justify="right")
    for row in predictions:
        table.add_row(Text(str(row["key"])), str(int(row["closest_cluster"])), f"{row['distance_to_cluster']:.4f}")
    return table


def counts_table(counts: Mapping[str, int], title: str = "Rows per cluster", label: str = "Rows") -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("Cluster", justify="right")
    table.add_column(label, justify="right")
    for cluster, count in sorted(counts.items(), key=lambda item: int(item[0])):
        table.add_row(str(cluster), str(count))
    table.add_section()
    table.add_row("total", str(sum(counts.values())))
    return table


def invocations_table(predictions: Iterable[Mapping[str, Any]]) -> Table:
    """SageMaker's answer: one row per input row, in order."""
    table = Table(title="Predictions", title_justify="left")
    table.add_column("Row", justify="right")
    table.add_column("Cluster", justify="right")
    table.add_column("Distance", justify="right")
    for index, row in enumerate(predictions):
        table.add_row(str(index), str(int(row["closest_cluster"])), f"{row['distance_to_cluster']:.4f}")
    return table


class JobProgress:
    """A rich progress bar of a training job's points processed (on stderr), fed job states."""

    def __init__(self, progress: Progress, task: TaskID) -> None:
        self._progress = progress
        self._task = task

    def update(self, job: Mapping[str, Any]) -> None:
        points = job.get("progress") or {}
        total = points.get("points_total") or None
        self._progress.update(
            self._task,
            completed=points.get("points_processed", 0),
            total=total,
            description=f"{job['name']}: {job['status']}",
        )


@contextmanager
def job_progress(name: str, enabled: bool = True) -> Iterator[JobProgress | None]:
    """A progress bar for the block (``None`` when not ``enabled``, e.g. with ``--json``)."""
    if not enabled:
        yield None
        return
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("points"),
        TimeElapsedColumn(),
        console=stderr(),
        transient=False,
    )
    with progress:
        yield JobProgress(progress, progress.add_task(f"{name}: waiting", total=None))
