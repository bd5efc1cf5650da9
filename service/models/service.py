"""Model use cases: register a trained model, import a SageMaker artifact, read, delete."""

from __future__ import annotations

import hashlib
import io
import struct
import tarfile
import zlib
from collections.abc import Iterator
from itertools import compress
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from schemas.models import Assignments, Centroids, OriginalUnits
from service.backends.base import ServedModel, TrainedModel
from service.datasets.parsing import check_column_names
from service.datasets.repository import DatasetRepository
from service.datasets.transforms import Table, column_lineage, require_numeric, unscale_column
from service.db.changes import bump_serving
from service.db.session import rows_affected
from service.db.tables import DatasetTable, ModelTable, TrainingJobTable
from service.engine import ModelFormatError, Prediction, predict, read_model_tar
from service.engine.mxnet_format import LIST_MAGIC, MAX_NDIM, MODEL_MEMBER, V1_MAGIC
from service.errors import Conflict, InvalidInput, NotFound
from service.ids import new_id
from service.models.repository import ModelRepository
from service.storage import LocalArtifactStore

MODEL_PREFIX = "models"
DEFAULT_MAX_MODEL_BYTES = 64 * 1024 * 1024  # Settings.max_model_bytes
DEFAULT_MAX_K = 10_000  # Settings.max_k
DEFAULT_MAX_CENTROID_VALUES = 1_000_000  # Settings.max_centroid_values
PEEK_BYTES = 64 * 1024  # decompressed bytes read to find the shape of an imported model
PREDICT_BATCH_ROWS = 65_536


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
    ) -> None:
        self.session = session
        self.models = ModelRepository(session)
        self.datasets = DatasetRepository(session)
        self.store = store
        self.max_model_bytes = max_model_bytes
        self.max_k = max_k
        self.max_centroid_values = max_centroid_values

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
            row = ModelTable(
                id=model_id,
                name=job.name,
                source="training",
                training_job_name=job.name,
                train_dataset_id=dataset.id,
                key_column=dataset.key_column,
                feature_names=list(job.feature_columns),
                k=int(trained.centroids.shape[0]),
                feature_dim=int(trained.centroids.shape[1]),
                centroids=np.asarray(trained.centroids, dtype=np.float64).tolist(),
                hyperparameters=job.hyperparameters,
                recipe=dataset.recipe,
                metrics=trained.metrics,
                cluster_sizes=trained.cluster_sizes,
                engine_version=trained.engine_version,
                seed=trained.seed,
                artifact_key=key,
                artifact_sha256=hashlib.sha256(trained.artifact).hexdigest(),
                artifact_size=len(trained.artifact),
            )
            self.models.add(row)
            owned = rows_affected(
                self.session.execute(
                    update(TrainingJobTable)
                    .where(TrainingJobTable.name == job.name, TrainingJobTable.lease_owner == worker_id)
                    .values(**job_values, model_id=model_id)
                    .execution_options(synchronize_session=False)
                )
            )
            if not owned:
                self.session.rollback()
                return None
            staged.publish()
            self.session.commit()
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
            self.session.execute(
                update(TrainingJobTable).where(TrainingJobTable.model_id == model_id).values(model_id=None)
            )
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
        if cluster is not None and not 0 <= cluster < row.k:
            raise InvalidInput(f"cluster must be between 0 and {row.k - 1}", details={"k": row.k})
        dataset_id = dataset_id or row.train_dataset_id
        if dataset_id is None:
            raise InvalidInput(f"model {row.id!r} was imported and has no training dataset; pass dataset_id")
        dataset = self.datasets.get(dataset_id)
        clusters: dict[str, int] = {}
        distances: dict[str, float] = {}
        for keys, prediction in predict_dataset(self.store, dataset, row.feature_names, np.asarray(row.centroids)):
            labels = np.asarray(prediction.closest_cluster).astype(np.int64, copy=False)
            distance = np.asarray(prediction.distance_to_cluster).astype(np.float64, copy=False)
            if not len(keys) == len(labels) == len(distance):
                raise ValueError("predict_dataset yielded keys and predictions of different lengths")
            if cluster is not None:
                mask = labels == cluster
                keys = list(compress(keys, mask.tolist()))
                labels, distance = labels[mask], distance[mask]
            clusters.update(zip(keys, labels.tolist(), strict=True))
            distances.update(zip(keys, distance.tolist(), strict=True))
        # Counted from the final map, so a repeated key counts once (the last row wins, as in the map).
        sizes = np.bincount(np.fromiter(clusters.values(), dtype=np.int64, count=len(clusters)))
        return {
            "model_id": row.id,
            "dataset_id": dataset.id,
            "key_column": dataset.key_column,
            "clusters": clusters,
            "distances": distances,
            "counts": {str(label): count for label, count in enumerate(sizes.tolist()) if count},
        }


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


def predict_dataset(
    store: LocalArtifactStore, dataset: DatasetTable, features: list[str], centroids: np.ndarray
) -> Iterator[tuple[list[str], Prediction]]:
    """Predict every row of a dataset, one Parquet batch at a time; yields (keys, prediction)."""
    dtypes = {c["name"]: c["dtype"] for c in dataset.columns}
    missing = [name for name in features if name not in dtypes]
    if missing:
        raise InvalidInput(
            f"dataset {dataset.id!r} lacks the model's feature column(s) {', '.join(map(repr, missing))}",
            details={"missing": missing},
        )
    columns = [*features, dataset.key_column] if dataset.key_column else features
    parquet = pq.ParquetFile(store.path(dataset.storage_key))
    offset = 0
    for batch in parquet.iter_batches(batch_size=PREDICT_BATCH_ROWS, columns=columns):
        frame = batch.to_pandas()
        matrix = frame_matrix(frame, features, f"dataset {dataset.id!r}")
        keys = (
            frame[dataset.key_column].astype(str).tolist()
            if dataset.key_column
            else [str(offset + i) for i in range(len(frame))]
        )
        offset += len(frame)
        yield keys, predict(matrix, centroids)


def frame_matrix(frame: pd.DataFrame, features: list[str], what: str) -> np.ndarray:
    """The float64 feature matrix of a frame, refusing non-numeric, null or non-finite cells."""
    require_numeric(Table(frame, None), features, what)
    matrix = frame[features].to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(matrix)
    if bad.any():
        row, column = (int(i) for i in np.argwhere(bad)[0])
        raise InvalidInput(
            f"{what}: row {row} column {features[column]!r} is missing or not a finite number",
            details={"row": row, "column": features[column]},
        )
    return matrix
