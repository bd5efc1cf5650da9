"""Model use cases: register a trained model, import a SageMaker artifact, read, delete."""

from __future__ import annotations

import hashlib
import io
import math
import struct
import tarfile
import zlib
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from schemas.models import Assignments, Centroids, OriginalUnits
from service.backends.base import ServedModel, TrainedModel
from service.datasets.online import CompiledRecipe
from service.datasets.parsing import check_column_names, non_numeric_cells
from service.datasets.repository import DatasetRepository
from service.datasets.transforms import Table, column_lineage, replay, require_numeric, unscale_column
from service.db.changes import bump_serving
from service.db.tables import DatasetTable, ModelTable, TrainingJobTable
from service.engine import CenterIndex, ModelFormatError, read_model_tar
from service.engine.mxnet_format import LIST_MAGIC, MAX_NDIM, MODEL_MEMBER, V1_MAGIC, V2_MAGIC, V3_MAGIC
from service.errors import Conflict, InvalidInput, NotFound
from service.ids import new_id
from service.jobs.repository import JobRepository
from service.models.repository import ModelRepository
from service.storage import LocalArtifactStore
from service.streaming import LineFormat, RowBatch, line_format, ordered_map, position_keys, stream_lines

MODEL_PREFIX = "models"
DEFAULT_MAX_MODEL_BYTES = 64 * 1024 * 1024  # Settings.max_model_bytes
DEFAULT_MAX_K = 10_000  # Settings.max_k
DEFAULT_MAX_CENTROID_VALUES = 1_000_000  # Settings.max_centroid_values
PEEK_BYTES = 64 * 1024  # decompressed bytes read to find the shape of an imported model
#: Most rows read, predicted and rendered at a time (fewer if the row groups are smaller): a few
#: batches in flight are what a dataset prediction holds in memory, whatever the dataset's size.
PREDICT_BATCH_ROWS = 32_768


def batch_rows(row_group_rows: int) -> int:
    """Rows per batch of a dataset prediction: ``CENTROID_PARQUET_ROW_GROUP_ROWS``, at most
    :data:`PREDICT_BATCH_ROWS`."""
    return max(1, min(row_group_rows, PREDICT_BATCH_ROWS))


def _trained_row(
    model_id: str, name: str, source: str, dataset: DatasetTable, feature_names: list[str], trained: TrainedModel
) -> ModelTable:
    """The model row of a trained model (its artifact stored under :func:`artifact_key`)."""
    return ModelTable(
        id=model_id,
        name=name,
        source=source,
        training_job_name=None,
        train_dataset_id=dataset.id,
        key_column=dataset.key_column,
        feature_names=list(feature_names),
        k=int(trained.centroids.shape[0]),
        feature_dim=int(trained.centroids.shape[1]),
        centroids=np.asarray(trained.centroids, dtype=np.float64).tolist(),
        hyperparameters={},
        recipe=dataset.recipe,
        metrics=trained.metrics,
        cluster_sizes=trained.cluster_sizes,
        engine_version=trained.engine_version,
        seed=trained.seed,
        artifact_key=artifact_key(model_id),
        artifact_sha256=hashlib.sha256(trained.artifact).hexdigest(),
        artifact_size=len(trained.artifact),
    )


def artifact_key(model_id: str) -> str:
    return f"{MODEL_PREFIX}/{model_id}.tar.gz"


class ModelService:
    def __init__(
        self,
        session: Session,
        store: LocalArtifactStore,
        *,
        max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES,
        max_k: int = DEFAULT_MAX_K,
        max_centroid_values: int = DEFAULT_MAX_CENTROID_VALUES,
        rows_per_batch: int = PREDICT_BATCH_ROWS,
    ) -> None:
        self.session = session
        self.models = ModelRepository(session)
        self.datasets = DatasetRepository(session)
        self.store = store
        self.max_model_bytes = max_model_bytes
        self.max_k = max_k
        self.max_centroid_values = max_centroid_values
        self.rows_per_batch = rows_per_batch

    def register_trained(
        self, job: TrainingJobTable, trained: TrainedModel, worker_id: str, job_values: dict[str, Any]
    ) -> ModelTable | None:
        """Store the artifact and the model row, and complete the job, all or nothing.

        ``job_values`` are written to the job only while ``worker_id`` still holds its lease; if
        the worker lost the lease, nothing is registered (the job's new owner will do it).
        """
        dataset = self.datasets.get(job.train_dataset_id)
        model_id = new_id("mdl")
        key = artifact_key(model_id)
        with self.store.staged(key) as staged:
            staged.path.write_bytes(trained.artifact)
            row = _trained_row(model_id, job.name, "training", dataset, list(job.feature_columns), trained)
            row.training_job_name, row.hyperparameters = job.name, job.hyperparameters
            self.models.add(row)
            owned = JobRepository(self.session).finish_with_model(job.name, worker_id, job_values, model_id)
            if not owned:
                self.session.rollback()
                return None
            staged.publish()
            self.session.commit()
        return row

    def register_from_sweep(
        self,
        name: str,
        dataset: DatasetTable,
        feature_names: list[str],
        trained: TrainedModel,
        hyperparameters: dict[str, Any],
    ) -> ModelTable:
        """Store one k of a sweep as a model (its artifact written like a training job's), with the
        training dataset's recipe: deployable like any other. The caller commits."""
        model_id = new_id("mdl")
        key = artifact_key(model_id)
        with self.store.staged(key) as staged:
            staged.path.write_bytes(trained.artifact)
            row = _trained_row(model_id, name, "sweep", dataset, feature_names, trained)
            row.hyperparameters = hyperparameters  # the sweep's, with this k
            self.models.add(row)
            staged.publish()
        return row

    def import_artifact(self, name: str, data: bytes, feature_names: list[str], key_column: str | None) -> ModelTable:
        """A SageMaker KMeans model.tar.gz becomes a model that can be deployed locally.

        The shape is read from the archive's first few KiB and checked against the k and size
        ceilings before the centroids are: 16 million zero centroids (62 KB of gzip) are refused in
        milliseconds, without allocating them.
        """
        shape = peek_model_shape(data)
        if shape is not None:
            self.check_shape(*shape)
        try:
            # Capped: a gzip bomb or a member claiming gigabytes fails while streaming, unallocated.
            cap = self.max_model_bytes
            centroids = read_model_tar(data, max_member_bytes=cap, max_total_bytes=cap)
        except ModelFormatError as exc:
            raise InvalidInput(f"not a usable SageMaker KMeans model.tar.gz: {exc}") from exc
        self.check_shape(int(centroids.shape[0]), int(centroids.shape[1]))
        check_column_names(feature_names)
        if len(feature_names) != centroids.shape[1]:
            raise InvalidInput(
                f"the model has {centroids.shape[1]} features but {len(feature_names)} feature names were given",
                details={"feature_dim": int(centroids.shape[1]), "feature_names": feature_names},
            )
        if not np.all(np.isfinite(centroids)):
            raise InvalidInput("the model's centroids contain NaN or infinity")
        model_id = new_id("mdl")
        key = artifact_key(model_id)
        with self.store.staged(key) as staged:
            staged.path.write_bytes(data)
            row = ModelTable(
                id=model_id,
                name=name,
                source="import",
                key_column=key_column,
                feature_names=feature_names,
                k=int(centroids.shape[0]),
                feature_dim=int(centroids.shape[1]),
                centroids=centroids.astype(np.float64).tolist(),
                hyperparameters={"k": int(centroids.shape[0]), "feature_dim": int(centroids.shape[1])},
                metrics={},
                artifact_key=key,
                artifact_sha256=hashlib.sha256(data).hexdigest(),
                artifact_size=len(data),
            )
            self.models.add(row)
            staged.publish()
            self.session.commit()
        return row

    def check_shape(self, k: int, feature_dim: int) -> None:
        """Refuse (400) a model above ``CENTROID_MAX_K`` centroids or ``CENTROID_MAX_CENTROID_VALUES`` numbers."""
        check_model_shape(k, feature_dim, self.max_k, self.max_centroid_values)

    def get(self, model_id: str) -> ModelTable:
        return self.models.get(model_id)

    def page(self, offset: int, limit: int, name: str | None) -> tuple[list[ModelTable], int]:
        return self.models.page(offset, limit, name)

    def delete(self, model_id: str) -> None:
        """Delete a model no endpoint serves or is switching to; 409 naming the endpoints otherwise.

        Safe against a concurrent ``POST /endpoints`` or ``PUT /endpoints/{name}`` naming the model:
        on PostgreSQL the row is locked first, so the other request either commits before the check
        below (which then sees its endpoint) or waits and finds the model gone; on SQLite the
        foreign key refuses the delete, and the endpoints are read again to say why.
        """
        row = self.models.get(model_id)
        key = row.artifact_key
        if not self.models.lock(model_id, exclusive=True):
            raise NotFound(f"model {model_id!r} not found", details={"model_id": model_id})
        self._refuse_if_deployed(model_id)
        try:
            JobRepository(self.session).forget_model(model_id)
            self.models.delete(row)
            bump_serving(self.session)  # every process drops its cached reads of this model
            self.session.commit()
        except IntegrityError as exc:  # an endpoint started using it after the check
            self.session.rollback()
            self._refuse_if_deployed(model_id)
            raise Conflict(
                f"model {model_id!r} was taken into use by a concurrent request; retry", details={"model_id": model_id}
            ) from exc
        self.store.delete(key)

    def _refuse_if_deployed(self, model_id: str) -> None:
        endpoints = self.models.deployed_on(model_id)
        if endpoints:
            raise Conflict(
                f"model {model_id!r} is deployed on endpoint(s) {', '.join(endpoints)}; delete or switch them first",
                details={"endpoints": endpoints},
            )

    def artifact_path(self, row: ModelTable) -> Any:
        return self.store.path(row.artifact_key)

    def served(self, row: ModelTable) -> ServedModel:
        return served_model(row, self.store)

    def centroids(self, row: ModelTable) -> Centroids:
        scaled = np.asarray(row.centroids, dtype=np.float64)
        return Centroids(
            model_id=row.id,
            feature_names=row.feature_names,
            centroids=scaled.tolist(),
            original_units=original_units(row.recipe, row.feature_names, scaled),
        )

    def assignments(self, row: ModelTable, dataset_id: str | None, cluster: int | None) -> Assignments:
        return Assignments(**self.assignments_data(row, dataset_id, cluster))

    def assignments_data(self, row: ModelTable, dataset_id: str | None, cluster: int | None) -> dict[str, Any]:
        """The :class:`Assignments` fields as plain JSON-ready values, in its field order.

        Vectorised: each Parquet batch becomes two dicts through ``zip`` over numpy's lists, the
        cluster filter is a mask, the counts one ``bincount``; no Python loop per row.
        """
        work = self.assignment_work(row, dataset_id, cluster)
        clusters: dict[str, int] = {}
        distances: dict[str, float] = {}
        for batch in ordered_map(work.rows, work.reader.batches()):
            keys = batch.keys.to_pylist()
            clusters.update(zip(keys, batch.closest_cluster.tolist(), strict=True))
            distances.update(zip(keys, batch.distance_to_cluster.tolist(), strict=True))
        # Counted from the final map, so a repeated key counts once (the last row wins, as in the map).
        sizes = np.bincount(np.fromiter(clusters.values(), dtype=np.int64, count=len(clusters)))
        return {
            "model_id": row.id,
            "dataset_id": work.reader.dataset_id,
            "key_column": work.reader.key_column,
            "clusters": clusters,
            "distances": distances,
            "counts": {str(label): count for label, count in enumerate(sizes.tolist()) if count},
        }

    def assignments_stream(
        self, row: ModelTable, dataset_id: str | None, cluster: int | None, media_type: str, request_id: str | None
    ) -> StreamedAssignments:
        """The assignments as JSON Lines or CSV, one line per row (see :mod:`service.streaming`).

        Everything that can be checked is checked here, before the first byte: the cluster, the
        dataset, its columns and their types, and (from the Parquet statistics) nulls and non-finite
        values. The body reads the dataset a batch at a time; memory does not grow with its rows.
        """
        work = self.assignment_work(row, dataset_id, cluster)
        lines = line_format(media_type)
        body = stream_lines(
            ordered_map(lambda item: rendered(lines, work.rows(item)), work.reader.batches()),
            lines,
            header=lines.header(None),
            what=f"assignments of model {row.id!r} on {work.reader.what}",
            request_id=request_id,
        )
        return StreamedAssignments(row.id, row.artifact_sha256, work.reader.dataset_id, body)

    def assignment_work(self, row: ModelTable, dataset_id: str | None, cluster: int | None) -> AssignmentWork:
        """The dataset to assign (checked) and the per-batch work; 400 for a cluster out of range."""
        if cluster is not None and not 0 <= cluster < row.k:
            raise InvalidInput(f"cluster must be between 0 and {row.k - 1}", details={"k": row.k})
        dataset_id = dataset_id or row.train_dataset_id
        if dataset_id is None:
            raise InvalidInput(f"model {row.id!r} was imported and has no training dataset; pass dataset_id")
        dataset = self.datasets.get(dataset_id)
        reader = DatasetReader(self.store, dataset, list(row.feature_names), batch_rows=self.rows_per_batch)
        return AssignmentWork(reader, CenterIndex(np.asarray(row.centroids, dtype=np.float64)), cluster)


@dataclass(frozen=True)
class StreamedAssignments:
    """A streamed assignments body and what identifies its bytes (for an ETag)."""

    model_id: str
    artifact_sha256: str
    dataset_id: str
    body: Generator[bytes, None, None]


@dataclass(frozen=True)
class AssignmentWork:
    """Assignments of one dataset: the checked reader and what one batch of it becomes."""

    reader: DatasetReader
    index: CenterIndex
    cluster: int | None

    def rows(self, item: RawBatch) -> RowBatch:
        """One batch's keys, clusters and distances, only the rows of ``cluster`` if one is given."""
        features = self.reader.feature_batch(item)
        prediction = self.index.predict(features.matrix)
        batch = RowBatch(features.keys, prediction.closest_cluster, prediction.distance_to_cluster)
        if self.cluster is None:
            return batch
        return batch.take(np.flatnonzero(batch.closest_cluster == self.cluster))


def rendered(lines: LineFormat, batch: RowBatch) -> tuple[bytes, int]:
    """A batch's lines and their number (what :func:`service.streaming.stream_lines` takes)."""
    return lines.rows(batch), len(batch)


def check_model_shape(k: int, feature_dim: int, max_k: int, max_values: int) -> None:
    """400 when a (k, feature_dim) model is above the k ceiling or the centroid-values ceiling."""
    if k > max_k:
        raise InvalidInput(
            f"the model has {k} centroids; at most {max_k} are accepted (CENTROID_MAX_K)",
            details={"k": k, "limit": max_k},
        )
    if k * feature_dim > max_values:
        raise InvalidInput(
            f"the model has {k} x {feature_dim} = {k * feature_dim} centroid values; at most {max_values} are "
            "accepted (CENTROID_MAX_CENTROID_VALUES)",
            details={"k": k, "feature_dim": feature_dim, "limit": max_values},
        )


def peek_model_shape(data: bytes) -> tuple[int, int] | None:
    """(k, feature_dim) of the centroids in a SageMaker ``model.tar.gz``, from its first KiB only.

    At most :data:`PEEK_BYTES` are decompressed, whatever the archive claims. None when the shape
    cannot be told that cheaply (another member first, an unusual layout, garbage): the full,
    capped reader then decides, and the shape is checked again after it.
    """
    try:
        if data[:2] == b"\x1f\x8b":
            head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data, PEEK_BYTES)
        else:
            head = data[:PEEK_BYTES]
        with tarfile.open(fileobj=io.BytesIO(head), mode="r|") as archive:
            for member in archive:
                if member.name in (MODEL_MEMBER, f"./{MODEL_MEMBER}") and member.isreg():
                    handle = archive.extractfile(member)
                    return _first_array_shape(handle.read(64 + 8 * MAX_NDIM)) if handle is not None else None
    except (tarfile.TarError, OSError, EOFError, zlib.error, struct.error, ValueError):
        return None
    return None


def _first_array_shape(head: bytes) -> tuple[int, int] | None:
    """The (k, d) shape of the first array of an MXNet NDArray list, from the file's first bytes."""
    magic, _reserved, count = struct.unpack_from("<QQQ", head, 0)
    if magic != LIST_MAGIC or count != 1:
        return None
    (array_magic,) = struct.unpack_from("<I", head, 24)
    if array_magic not in (V1_MAGIC, V2_MAGIC, V3_MAGIC):
        return None  # a legacy array (no magic): the full reader decides
    offset = 28 if array_magic == V1_MAGIC else 32  # V2/V3 carry a storage type
    (ndim,) = struct.unpack_from("<i", head, offset)
    if ndim != 2:
        return None
    k, d = struct.unpack_from("<2q", head, offset + 4)
    return (int(k), int(d)) if k > 0 and d > 0 else None


def sweep_orphan_artifacts(session: Session, store: LocalArtifactStore, grace_seconds: float) -> list[str]:
    """Remove model artifacts no row names (a crash between writing and committing)."""
    return store.sweep_orphans(MODEL_PREFIX, ModelRepository(session).artifact_keys(), grace_seconds)


def served_model(row: ModelTable, store: LocalArtifactStore) -> ServedModel:
    key = row.artifact_key
    return ServedModel(
        model_id=row.id,
        centroids=np.asarray(row.centroids, dtype=np.float64),
        feature_names=list(row.feature_names),
        artifact=lambda: store.read_bytes(key),
    )


def original_units(recipe: dict[str, Any] | None, features: list[str], scaled: np.ndarray) -> OriginalUnits | None:
    """Undo the training recipe's scalings on each centroid coordinate, when the recipe says how."""
    if recipe is None:
        return None
    lineage = column_lineage(recipe)
    if not all(name in lineage for name in features):
        return None
    columns = [unscale_column(scaled[:, i], lineage[name]) for i, name in enumerate(features)]
    return OriginalUnits(
        feature_names=[lineage[name].raw_name for name in features],
        centroids=np.column_stack(columns).tolist(),
    )


RawBatch = tuple[pa.RecordBatch, int]  # a batch as read, and the position of its first row


@dataclass(frozen=True)
class FeatureBatch:
    """A batch of a dataset: its rows' keys (text) and the model's finite float64 feature matrix."""

    keys: pa.Array
    matrix: np.ndarray
    first_row: int


class DatasetReader:
    """A stored dataset read a batch at a time, as keys and the model's feature matrix.

    Only the columns needed are read (the features, or with a recipe the raw columns it reads, and
    the key). The file is opened and checked on construction, which is meant to happen before a
    response starts: columns present, numeric types (from the file's schema), and nulls or
    non-finite values from the row groups' statistics (``null_count``, ``min``/``max``). The first
    row group the statistics show a problem in is computed at once, so its error, with the row and
    column, is an ordinary 400. Every batch is checked again as it is computed (statistics may be
    absent, and a recipe may produce a non-finite value); an error then names the row in the whole
    dataset. Opening the file early also keeps it readable if the dataset is deleted meanwhile.

    :meth:`batches` reads sequentially; :meth:`feature_batch` is pure CPU work, safe to run on several
    batches at once in other threads.
    """

    def __init__(
        self,
        store: LocalArtifactStore,
        dataset: DatasetTable,
        features: list[str],
        *,
        recipe: CompiledRecipe | None = None,
        batch_rows: int = PREDICT_BATCH_ROWS,
    ) -> None:
        self.dataset_id = dataset.id
        self.key_column: str | None = dataset.key_column
        self.rows = int(dataset.row_count)
        self.what = f"dataset {dataset.id!r}"
        self.features = features
        self.recipe = recipe
        self.batch_rows = max(1, batch_rows)
        self._file = pq.ParquetFile(store.path(dataset.storage_key), pre_buffer=False)
        schema = self._file.schema_arrow
        self._inputs = self._input_columns(schema.names)
        self._check_numeric(schema)
        key = [self.key_column] if self.key_column and self.key_column not in self._inputs else []
        self._columns = [*self._inputs, *key]
        self._check_statistics()

    # --- what is read -------------------------------------------------------------------------

    def _input_columns(self, present: list[str]) -> list[str]:
        """The columns the feature matrix is computed from; 400 naming any the dataset lacks."""
        if self.recipe is None:
            missing = [name for name in self.features if name not in present]
            if missing:
                raise self._lacks(missing, missing)
            return list(self.features)
        if self.recipe.programs is None:  # replayed: every raw column the recipe may read
            return [name for name in present if name in self.recipe.accepted and name != self.key_column]
        raw = list(dict.fromkeys(program.raw_name for program in self.recipe.programs))
        absent = [name for name in raw if name not in present]
        if absent:
            features = [program.feature for program in self.recipe.programs if program.raw_name in absent]
            raise self._lacks(features, absent)
        return raw

    def _lacks(self, features: list[str], columns: list[str]) -> InvalidInput:
        shown = ", ".join(map(repr, features))
        also = "" if columns == features else f" (raw column(s) {', '.join(map(repr, columns))})"
        return InvalidInput(
            f"{self.what} lacks the model's feature(s) {shown}{also}",
            details={"missing": features, "missing_columns": columns, "feature_names": self.features},
        )

    def _check_numeric(self, schema: pa.Schema) -> None:
        """400 for a key column used as a feature or a column that is not numbers (from the schema)."""
        for name in self._inputs:
            if self.recipe is None and name == self.key_column:
                raise InvalidInput(f"{self.what}: {name!r} is the key column, not a feature", details={"column": name})
            kind = schema.field(name).type
            if not (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
                bad = self._non_numeric_cells(name)
                example = f": row {bad[0]['row']} holds {bad[0]['value']!r}" if bad else ""
                raise InvalidInput(
                    f"{self.what}: column {name!r} is not numeric{example}", details={"column": name, "cells": bad}
                )

    def _non_numeric_cells(self, name: str) -> list[dict[str, object]]:
        """Examples of a text column's non-numbers, from its first row group."""
        if self._file.metadata.num_row_groups == 0:
            return []
        frame = self._file.read_row_group(0, columns=[name]).to_pandas()
        return non_numeric_cells(frame, name)

    # --- checks from the row groups' statistics -------------------------------------------------

    def _guarded_columns(self) -> list[str]:
        """Columns whose null or non-finite value is certain to fail (no fill step replaces it)."""
        if self.recipe is None:
            return list(self._inputs)
        if self.recipe.programs is None:
            return []
        filled = {p.raw_name for p in self.recipe.programs if any(step.op == "fill" for step in p.steps)}
        return [name for name in self._inputs if name not in filled]

    def _check_statistics(self) -> None:
        """Compute, now, the first row group whose statistics show a null or a non-finite value."""
        metadata = self._file.metadata
        positions = {name: index for index, name in enumerate(metadata.schema.names)}
        guarded = [positions[name] for name in self._guarded_columns() if name in positions]
        first = 0
        for group in range(metadata.num_row_groups):
            statistics = metadata.row_group(group)
            if any(_suspect(statistics.column(index).statistics) for index in guarded):
                table = self._file.read_row_group(group, columns=self._columns)
                for batch in table.to_batches(max_chunksize=self.batch_rows):
                    self.feature_batch((batch, first))  # raises the row's error
                    first += batch.num_rows
                return  # the statistics were conservative; every batch is checked anyway
            first += statistics.num_rows

    # --- reading and computing ------------------------------------------------------------------

    def batches(self) -> Iterator[RawBatch]:
        """The needed columns, ``batch_rows`` rows at a time, with each batch's first row."""
        first = 0
        for batch in self._file.iter_batches(batch_size=self.batch_rows, columns=self._columns):
            yield batch, first
            first += batch.num_rows

    def feature_batch(self, item: RawBatch) -> FeatureBatch:
        """A batch's keys (the key column's text, or row positions) and feature matrix (checked)."""
        batch, first = item
        if self.key_column:
            keys = batch.column(self.key_column)
            keys = keys if pa.types.is_string(keys.type) else keys.cast(pa.string())
        else:
            keys = position_keys(first, batch.num_rows)
        return FeatureBatch(keys, self._matrix(batch, first), first)

    def _matrix(self, batch: pa.RecordBatch, first: int) -> np.ndarray:
        if self.recipe is None:
            matrix = np.empty((batch.num_rows, len(self.features)), dtype=np.float64)
            for index, name in enumerate(self.features):
                matrix[:, index] = _column_values(batch.column(name))
            return check_finite_matrix(matrix, self.features, self.what, first)
        if self.recipe.programs is None:
            frame = replay(self.recipe.recipe or {}, batch.select(self._inputs).to_pandas())
            return frame_matrix(frame, self.features, self.what, first)
        matrix = np.empty((batch.num_rows, len(self.recipe.programs)), dtype=np.float64)
        raw: dict[str, np.ndarray] = {}
        for index, program in enumerate(self.recipe.programs):
            values = raw.get(program.raw_name)
            if values is None:  # the steps below return new arrays: the raw column is shared
                values = raw[program.raw_name] = _column_values(batch.column(program.raw_name))
            for step in program.steps:  # the compiled recipe's own steps, in order: bit for bit
                values = step.apply(values)
            matrix[:, index] = values
        return check_finite_matrix(matrix, [p.feature for p in self.recipe.programs], self.what, first)


def _column_values(column: pa.Array) -> np.ndarray:
    """A numeric Arrow column as float64, nulls as NaN."""
    return np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.float64)


def _suspect(statistics: Any) -> bool:
    """Whether a column chunk's statistics show a null or a non-finite value (False if unknown)."""
    if statistics is None:
        return False
    if statistics.has_null_count and statistics.null_count > 0:
        return True
    if not statistics.has_min_max:
        return False
    try:
        low, high = float(statistics.min), float(statistics.max)
    except (TypeError, ValueError, OverflowError):
        return False
    return not (math.isfinite(low) and math.isfinite(high))


def frame_matrix(frame: pd.DataFrame, features: list[str], what: str, first_row: int = 0) -> np.ndarray:
    """The float64 feature matrix of a frame, refusing non-numeric, null or non-finite cells.

    ``first_row`` is the position of the frame's first row in what ``what`` names (error messages).
    """
    require_numeric(Table(frame, None), features, what)
    matrix = frame[features].to_numpy(dtype=np.float64, na_value=np.nan)
    return check_finite_matrix(matrix, features, what, first_row)


def check_finite_matrix(matrix: np.ndarray, features: list[str], what: str, first_row: int = 0) -> np.ndarray:
    """``matrix``, or 400 naming the first missing or non-finite cell (row ``first_row`` + i)."""
    bad = ~np.isfinite(matrix)
    if bad.any():
        local, column = (int(i) for i in np.argwhere(bad)[0])
        row = first_row + local
        raise InvalidInput(
            f"{what}: row {row} column {features[column]!r} is missing or not a finite number",
            details={"row": row, "column": features[column]},
        )
    return matrix
