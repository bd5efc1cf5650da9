"""What each plot shows, loaded from the repositories and the artifact store (no HTTP).

:class:`PlotService` turns a model (or a sweep) into the plain description :mod:`service.plots.render`
draws. Models and Completed sweeps are immutable, so :meth:`PlotService.model_version` and
:func:`sweep_version` identify a plot's bytes without drawing it (the router's ETags and cache keys).

**Sampling** (``projection``): at most :data:`PROJECTION_SAMPLE_ROWS` rows of the training dataset,
chosen with a fixed seed, read without loading the file: the Parquet footer gives each row group's
size, :func:`sample_plan` picks up to :data:`SAMPLE_ROW_GROUPS` row groups at random (more only
while they hold fewer rows than the sample) and rows uniformly among them, and :func:`read_sample`
reads only those row groups' feature columns, a batch at a time, keeping only the picked rows.
Memory and time depend on the sample size and the row-group size, never on the dataset's rows.

A request that is well formed but meets data that cannot be plotted (an imported model without a
training dataset, keys that are not US states, a sweep still running) is a 409 ``conflict`` whose
message says why, never a 400.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy.orm import Session, defer

from service.datasets.repository import DatasetRepository
from service.datasets.transforms import RecipeError, column_lineage
from service.db.tables import DatasetTable, ModelTable, SweepTable
from service.engine import CenterIndex
from service.errors import Conflict, InvalidInput
from service.models.repository import ModelRepository
from service.models.service import PREDICT_BATCH_ROWS, DatasetReader, ModelService, original_units
from service.plots.render import CentroidsPlot, ElbowPlot, Plot, ProjectionPlot, SizesPlot, StatesPlot
from service.plots.states import STATE_NAMES, state_code
from service.statuses import JobStatus
from service.storage import LocalArtifactStore
from service.streaming import ordered_map
from service.sweeps.repository import SweepRepository

ModelPlotKind = Literal["sizes", "centroids", "projection", "states"]
MODEL_PLOT_KINDS: tuple[ModelPlotKind, ...] = ("sizes", "centroids", "projection", "states")

#: Most rows the projection plots (a seeded sample beyond).
PROJECTION_SAMPLE_ROWS = 5_000
#: Row groups a sample is drawn from (more only while they hold fewer rows than the sample).
SAMPLE_ROW_GROUPS = 16
#: Rows decoded at a time while sampling a row group.
SAMPLE_BATCH_ROWS = 65_536
#: The seed of every sample (and of the PCA's randomized solver, when it uses one).
PLOT_SEED = 0
#: Bump when what a plot shows changes (it is part of every plot's ETag).
PLOT_VERSION = "1"


@dataclass(frozen=True)
class Sample:
    """Rows of a dataset's feature columns: all of them, or a seeded sample."""

    matrix: np.ndarray  # (n, d) float64, finite
    total_rows: int  # rows in the dataset
    rows_read: int  # rows decoded to take the sample
    row_groups_read: int
    row_groups: int

    def describe(self) -> str:
        """What the plot says about the rows it shows."""
        n = len(self.matrix)
        if n >= self.total_rows:
            return f"all {self.total_rows:,} rows"
        return (
            f"{n:,} of {self.total_rows:,} rows (a seeded sample from {self.row_groups_read:,} of "
            f"{self.row_groups:,} row groups)"
        )


class PlotService:
    """Loads what each plot needs; one per request (it holds the request's database session)."""

    def __init__(
        self,
        session: Session,
        store: LocalArtifactStore,
        *,
        sample_rows: int | None = None,
        rows_per_batch: int = PREDICT_BATCH_ROWS,
    ) -> None:
        self.store = store
        self.models = ModelRepository(session)
        self.datasets = DatasetRepository(session)
        self.sweeps = SweepRepository(session)
        self.assignments = ModelService(session, store, rows_per_batch=rows_per_batch)
        self.sample_rows = PROJECTION_SAMPLE_ROWS if sample_rows is None else max(1, sample_rows)

    # --- models ----------------------------------------------------------------------------------

    def model(self, model_id: str) -> ModelTable:
        """The model's row (404 if unknown); centroids and recipe are read only if a plot needs them."""
        return self.models.get(model_id, [defer(ModelTable.recipe)])

    def model_version(self, row: ModelTable, kind: ModelPlotKind) -> str:
        """What identifies the bytes of a model's plot: the model is immutable, so its id and
        artifact digest, the plot's kind, and the sampling for the projection."""
        sampling = (
            f"sample={self.sample_rows},groups={SAMPLE_ROW_GROUPS},seed={PLOT_SEED}" if kind == "projection" else ""
        )
        return "\x1f".join((row.id, row.artifact_sha256, kind, sampling, PLOT_VERSION))

    def model_plot(self, row: ModelTable, kind: ModelPlotKind) -> Plot:
        if kind == "sizes":
            return self.sizes(row)
        if kind == "centroids":
            return self.centroids(row)
        if kind == "projection":
            return self.projection(row)
        return self.states(row)

    def sizes(self, row: ModelTable) -> SizesPlot:
        """The stored cluster sizes; without them, every training row assigned (one pass)."""
        if row.cluster_sizes is not None and len(row.cluster_sizes) == row.k:
            sizes = np.asarray(row.cluster_sizes, dtype=np.int64)
            return SizesPlot(_model_label(row), sizes, "the training data, counted when the model was trained")
        dataset = self._training_dataset(row, "count its points per cluster")
        with _plottable(dataset):
            work = self.assignments.assignment_work(row, dataset.id, None)
            counts = np.zeros(row.k, dtype=np.int64)
            for batch in ordered_map(work.rows, work.reader.batches()):
                counts += np.bincount(batch.closest_cluster, minlength=row.k)[: row.k]
        return SizesPlot(_model_label(row), counts, f"dataset {dataset.name}, each row assigned now")

    def centroids(self, row: ModelTable) -> CentroidsPlot:
        """The centroids in original units when the training recipe says how to undo its scalings."""
        scaled = np.asarray(row.centroids, dtype=np.float64)
        features = list(row.feature_names)
        label = _model_label(row)
        if row.recipe is None:
            note = "no training recipe (an imported model): the centroids as the model holds them"
            return CentroidsPlot(label, features, scaled, False, note)
        try:
            units = original_units(row.recipe, features, scaled)
            lineage = column_lineage(row.recipe) if units is not None else {}
        except (RecipeError, KeyError, TypeError, ValueError):
            units, lineage = None, {}
        if units is None:
            note = (
                "the training recipe does not say how to undo its steps on every feature: the model's (scaled) "
                "units, as it was trained"
            )
            return CentroidsPlot(label, features, scaled, False, note)
        names = [
            raw if raw == name else f"{name} ({raw})" for name, raw in zip(features, units.feature_names, strict=True)
        ]
        scaled_features = [name for name in features if lineage[name].scalings]
        if scaled_features:
            shown = ", ".join(scaled_features[:4]) + (" ..." if len(scaled_features) > 4 else "")
            note = f"the training recipe's scaling undone on {shown}"
        else:
            note = "the training data was not scaled: these are its units"
        return CentroidsPlot(label, names, np.asarray(units.centroids, dtype=np.float64), True, note)

    def projection(self, row: ModelTable) -> ProjectionPlot:
        """A seeded sample of the training rows, projected on its first two principal components."""
        dataset = self._training_dataset(row, "project its training data")
        features = list(row.feature_names)
        with _plottable(dataset):
            sample = read_sample(self.store.path(dataset.storage_key), features, self.sample_rows, PLOT_SEED)
        if len(sample.matrix) == 0:
            raise Conflict(
                f"the training dataset {dataset.id!r} of model {row.id!r} has no rows to project",
                details={"model_id": row.id, "dataset_id": dataset.id, "reason": "no_rows"},
            )
        centroids = np.asarray(row.centroids, dtype=np.float64)
        labels = CenterIndex(centroids).nearest(sample.matrix)
        points, centers, explained, note = project(sample.matrix, centroids)
        return ProjectionPlot(_model_label(row), row.k, points, labels, centers, explained, sample.describe(), note)

    def states(self, row: ModelTable) -> StatesPlot:
        """The cluster of each state, when the training dataset's keys are US states (409 otherwise)."""
        dataset = self._training_dataset(row, "map it by state")
        limit = len(STATE_NAMES)
        where = f"the training dataset {dataset.id!r} of model {row.id!r}"
        if not dataset.key_column:
            raise _not_states(row, dataset, f"{where} has no key column; a state map needs rows keyed by US state")
        if dataset.row_count > limit:
            raise _not_states(
                row,
                dataset,
                f"{where} has {dataset.row_count:,} rows; a state map needs one row per US state (at most {limit}, "
                "the 50 states and DC)",
            )
        centroids = np.asarray(row.centroids, dtype=np.float64)
        index = CenterIndex(centroids)
        keys: list[Any] = []
        labels: list[int] = []
        with _plottable(dataset):
            reader = DatasetReader(self.store, dataset, list(row.feature_names))
            for item in reader.batches():
                batch = reader.feature_batch(item)
                keys.extend(batch.keys.to_pylist())
                labels.extend(index.nearest(batch.matrix).tolist())
        clusters: dict[str, int] = {}
        unknown: list[str] = []
        for key, label in zip(keys, labels, strict=True):
            code = state_code(str(key)) if key is not None else None
            if code is None:
                unknown.append(str(key))
            elif code in clusters:
                raise _not_states(
                    row, dataset, f"{where} has state {code} ({STATE_NAMES[code]}) more than once", keys=[str(key)]
                )
            else:
                clusters[code] = label
        if unknown or not clusters:
            shown = ", ".join(repr(key) for key in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise _not_states(
                row,
                dataset,
                f"the keys of {where} (column {dataset.key_column!r}) are not US state names or postal codes: "
                f"{shown or 'there are none'}",
                keys=unknown[:10],
            )
        return StatesPlot(_model_label(row), row.k, clusters)

    def _training_dataset(self, row: ModelTable, purpose: str) -> DatasetTable:
        if row.train_dataset_id is None:
            raise Conflict(
                f"model {row.id!r} was imported and has no training dataset to {purpose}",
                details={"model_id": row.id, "reason": "no_training_dataset"},
            )
        return self.datasets.get(row.train_dataset_id)

    # --- sweeps ----------------------------------------------------------------------------------

    def sweep(self, name: str) -> SweepTable:
        """A Completed sweep with results (404 if unknown, 409 while it is not Completed)."""
        sweep = self.sweeps.get(name)
        outcome = sweep.outcome or {}
        if sweep.status != JobStatus.COMPLETED or not outcome.get("results") or not outcome.get("recommendation"):
            raise Conflict(
                f"sweep {name!r} is {sweep.status}; its elbow plot exists once it is Completed",
                details={"name": name, "status": sweep.status},
            )
        return sweep

    def elbow(self, sweep: SweepTable) -> ElbowPlot:
        outcome = sweep.outcome or {}
        results = sorted(outcome["results"], key=lambda result: int(result["k"]))
        recommendation = outcome["recommendation"]
        silhouette = [np.nan if r.get("silhouette") is None else float(r["silhouette"]) for r in results]
        evaluated_on = "the test dataset" if outcome.get("evaluated_on") == "test" else "the training data"
        sample = outcome.get("sample_rows")
        if sample:
            evaluated_on += f" (silhouette on a sample of {int(sample):,} rows)"
        return ElbowPlot(
            sweep=sweep.name,
            ks=np.asarray([int(r["k"]) for r in results], dtype=np.int64),
            msd=np.asarray([float(r["msd"]) for r in results], dtype=np.float64),
            silhouette=np.asarray(silhouette, dtype=np.float64),
            recommended=int(recommendation["k"]),
            elbow_k=_optional_int(recommendation.get("elbow_k")),
            best_silhouette_k=_optional_int(recommendation.get("best_silhouette_k")),
            evaluated_on=evaluated_on,
        )


def sweep_version(sweep: SweepTable) -> str:
    """What identifies the bytes of a Completed sweep's elbow: the sweep (a name can be reused
    after a delete, so with its creation time) and a digest of what the plot shows (the outcome's
    ``models`` change when a k is registered, and are not shown)."""
    outcome = sweep.outcome or {}
    shown = {key: outcome.get(key) for key in ("results", "recommendation", "evaluated_on", "sample_rows")}
    digest = hashlib.sha256(json.dumps(shown, sort_keys=True, default=str).encode("utf-8")).hexdigest()
    return "\x1f".join((sweep.name, sweep.created_at.isoformat(), digest, PLOT_VERSION))


# --- sampling and projecting ------------------------------------------------------------------------


def sample_plan(group_rows: list[int], size: int, seed: int, max_groups: int = SAMPLE_ROW_GROUPS) -> dict[int, Any]:
    """Which rows of which row groups to read: ``{group: sorted positions in the group}``, or
    ``{group: None}`` for every row of every group when the dataset holds at most ``size`` rows.

    Row groups are taken in a seeded random order until there are ``max_groups`` of them and they
    hold at least ``size`` rows; ``size`` rows are then drawn uniformly (without replacement) from
    the rows of the groups taken. Groups left without a drawn row are not read.
    """
    sizes = np.asarray(group_rows, dtype=np.int64)
    groups = np.flatnonzero(sizes > 0)
    if int(sizes.sum()) <= size:
        return {int(group): None for group in groups}
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    pool = 0
    for group in groups[rng.permutation(len(groups))]:
        if len(chosen) >= max_groups and pool >= size:
            break
        chosen.append(int(group))
        pool += int(sizes[group])
    chosen.sort()
    picks = np.sort(rng.choice(pool, size=size, replace=False))
    bounds = np.concatenate(([0], np.cumsum(sizes[chosen])))
    plan: dict[int, Any] = {}
    for position, group in enumerate(chosen):
        low, high = np.searchsorted(picks, bounds[position : position + 2])
        if high > low:
            plan[group] = picks[low:high] - bounds[position]
    return plan


def read_sample(
    path: Path,
    features: list[str],
    size: int,
    seed: int,
    *,
    max_groups: int = SAMPLE_ROW_GROUPS,
    batch_rows: int = SAMPLE_BATCH_ROWS,
) -> Sample:
    """At most ``size`` rows of ``features`` from the Parquet file at ``path`` (see :func:`sample_plan`).

    Reads the footer, then only the planned row groups' feature columns, ``batch_rows`` at a time,
    stopping in each group after its last picked row. Rows with a missing or non-finite value are
    left out (a model's training rows have none). 400 for a feature the file lacks or that is not
    numeric (the caller turns it into a 409).
    """
    file = pq.ParquetFile(path, pre_buffer=False)
    schema = file.schema_arrow
    for name in features:
        if name not in schema.names:
            raise InvalidInput(f"the dataset has no column {name!r}", details={"column": name})
        kind = schema.field(name).type
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
            raise InvalidInput(f"column {name!r} is not numeric", details={"column": name})
    metadata = file.metadata
    group_rows = [metadata.row_group(group).num_rows for group in range(metadata.num_row_groups)]
    plan = sample_plan(group_rows, size, seed, max_groups)
    parts: list[np.ndarray] = []
    rows_read = 0
    for group, picks in plan.items():
        start = 0
        for batch in file.iter_batches(batch_size=batch_rows, row_groups=[group], columns=features, use_threads=False):
            rows = batch.num_rows
            rows_read += rows
            if picks is None:
                parts.append(_matrix(batch, features))
            else:
                low, high = np.searchsorted(picks, [start, start + rows])
                if high > low:
                    parts.append(_matrix(batch.take(pa.array(picks[low:high] - start)), features))
                if high >= len(picks):
                    break  # the group's last picked row is read: the rest of it is not
            start += rows
    matrix = np.vstack(parts) if parts else np.empty((0, len(features)), dtype=np.float64)
    matrix = matrix[np.isfinite(matrix).all(axis=1)]
    return Sample(matrix, int(sum(group_rows)), rows_read, len(plan), len(group_rows))


def _matrix(batch: pa.RecordBatch, features: list[str]) -> np.ndarray:
    matrix = np.empty((batch.num_rows, len(features)), dtype=np.float64)
    for index, name in enumerate(features):
        matrix[:, index] = np.asarray(batch.column(name).to_numpy(zero_copy_only=False), dtype=np.float64)
    return matrix


def project(points: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[float, float], str]:
    """The points and centroids on the points' first two principal components (scikit-learn's PCA
    fitted on the points), each component's share of the variance, and a note when there is no
    second component (one feature, or a single row)."""
    from sklearn.decomposition import PCA

    rows, dimensions = points.shape
    components = min(2, dimensions, rows - 1)
    if components < 1:
        return np.zeros((rows, 2)), np.zeros((len(centroids), 2)), (0.0, 0.0), "a single row: nothing to project"
    pca = PCA(n_components=components, random_state=PLOT_SEED)
    projected = pca.fit_transform(points)
    centers = pca.transform(centroids)
    ratios = np.nan_to_num(np.asarray(pca.explained_variance_ratio_, dtype=np.float64))
    if components == 2:
        return projected, centers, (float(ratios[0]), float(ratios[1])), ""
    note = "none: one feature" if dimensions == 1 else "none: too few rows"
    pad = np.zeros((rows, 1))
    return np.hstack([projected, pad]), np.hstack([centers, np.zeros((len(centers), 1))]), (float(ratios[0]), 0.0), note


# --- helpers ------------------------------------------------------------------------------------------


def _model_label(row: ModelTable) -> str:
    return f"model {row.name} (k = {row.k})"


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _not_states(row: ModelTable, dataset: DatasetTable, message: str, keys: list[str] | None = None) -> Conflict:
    details: dict[str, Any] = {
        "model_id": row.id,
        "dataset_id": dataset.id,
        "key_column": dataset.key_column,
        "reason": "keys_not_states",
    }
    if keys is not None:
        details["keys"] = keys
    return Conflict(message, details=details)


@contextmanager
def _plottable(dataset: DatasetTable) -> Iterator[None]:
    """A training dataset that cannot be read as the model's features is a state the plot cannot
    be drawn in (409), not a fault in the request (400)."""
    try:
        yield
    except InvalidInput as exc:
        raise Conflict(
            f"the training dataset {dataset.id!r} cannot be plotted: {exc.message}",
            details={"dataset_id": dataset.id, "reason": "dataset_not_plottable", "cause": exc.details},
        ) from exc
