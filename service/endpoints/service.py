"""Endpoint use cases: lifecycle, SageMaker-style invocations, friendly predictions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from schemas.endpoints import EndpointCreate, PredictionRequest, PredictionResponse, RowPrediction
from service.backends import BackendRegistry
from service.backends.base import EndpointSpec, ServedModel
from service.datasets.parsing import frame_from_rows, type_columns
from service.datasets.repository import DatasetRepository
from service.datasets.transforms import replay
from service.db.tables import EndpointTable
from service.db.types import utcnow
from service.endpoints.cache import CachedModel, ModelCache
from service.endpoints.invocations import parse_features, render
from service.endpoints.repository import SERVING, EndpointRepository
from service.engine import Prediction, predict
from service.errors import Conflict, InvalidInput, PayloadTooLarge
from service.metrics import Metrics
from service.models.repository import ModelRepository
from service.models.service import frame_matrix, served_model
from service.settings import Settings
from service.storage import LocalArtifactStore


@dataclass(frozen=True)
class Target:
    """An endpoint able to serve, with the model it serves right now."""

    endpoint: EndpointTable
    cached: CachedModel

    @property
    def model(self) -> ServedModel:
        return self.cached.served

    @property
    def spec(self) -> EndpointSpec:
        return EndpointSpec(self.endpoint.name, self.model, self.endpoint.instance_config, self.endpoint.remote)


class EndpointService:
    def __init__(
        self,
        session: Session,
        store: LocalArtifactStore,
        backends: BackendRegistry,
        cache: ModelCache,
        settings: Settings,
        metrics: Metrics,
    ) -> None:
        self.session = session
        self.endpoints = EndpointRepository(session)
        self.models = ModelRepository(session)
        self.store = store
        self.backends = backends
        self.cache = cache
        self.settings = settings
        self.metrics = metrics

    # --- lifecycle ----------------------------------------------------------------------------

    def create(self, request: EndpointCreate) -> EndpointTable:
        if self.endpoints.find(request.name) is not None:
            raise Conflict(f"endpoint {request.name!r} already exists", details={"name": request.name})
        self.models.get(request.model_id)
        self.backends.usable(request.backend)
        instance_config = {
            key: value
            for key, value in {"instance_type": request.instance_type, "instance_count": request.instance_count}.items()
            if value is not None
        }
        row = EndpointTable(
            name=request.name,
            backend=request.backend,
            model_id=request.model_id,
            status="Creating",
            instance_config=instance_config,
            remote={},
        )
        try:
            self.endpoints.add(row)
            self.session.commit()
        except IntegrityError as exc:
            self.session.rollback()
            raise Conflict(f"endpoint {request.name!r} already exists", details={"name": request.name}) from exc
        return row

    def get(self, name: str) -> EndpointTable:
        return self.endpoints.get(name)

    def page(self, offset: int, limit: int, status: str | None) -> tuple[list[EndpointTable], int]:
        return self.endpoints.page(offset, limit, status)

    def switch_model(self, name: str, model_id: str) -> EndpointTable:
        """Start serving another model; the current one keeps answering until the new one is ready."""
        row = self.endpoints.get(name)
        self.models.get(model_id)
        if row.status not in ("InService", "Failed"):
            raise Conflict(
                f"endpoint {name!r} is {row.status}; wait until it is InService", details={"status": row.status}
            )
        if row.status == "Failed":
            row.model_id, row.pending_model_id, row.status = model_id, None, "Creating"
        else:
            row.pending_model_id, row.status = model_id, "Updating"
        row.failure_reason = None
        row.updated_at = utcnow()
        row.next_poll_at = None
        self.session.commit()
        return row

    def delete(self, name: str) -> EndpointTable:
        row = self.endpoints.get(name)
        if row.status != "Deleting":
            row.status, row.updated_at, row.next_poll_at = "Deleting", utcnow(), None
            self.session.commit()
        return row

    # --- serving ------------------------------------------------------------------------------

    def target(self, name: str) -> Target:
        endpoint = self.endpoints.get(name)
        if endpoint.status not in SERVING:
            raise Conflict(
                f"endpoint {name!r} is {endpoint.status}, not InService", details={"status": endpoint.status}
            )
        return Target(endpoint, self.cache.get(endpoint.model_id, lambda: self._load(endpoint.model_id)))

    def _load(self, model_id: str) -> CachedModel:
        row = self.models.get(model_id)
        return CachedModel(served_model(row, self.store), row.key_column, row.recipe, row.k)

    def invoke(self, name: str, body: bytes, request_kind: str, response_kind: str) -> bytes:
        target = self.target(name)
        features = parse_features(
            body, request_kind, len(target.model.feature_names), self.settings.max_invocation_rows
        )
        prediction = self._backend(target).invoke(target.spec, features)
        self.metrics.record_prediction(name, "invocations", len(features))
        return render(prediction, response_kind)

    def predictions(self, name: str, request: PredictionRequest) -> PredictionResponse:
        target = self.target(name)
        if (request.rows is None) == (request.dataset_id is None):
            raise InvalidInput("send exactly one of `rows` or `dataset_id`")
        if request.rows is not None:
            keys, matrix = self._rows_matrix(target, request.rows, request.raw)
            pieces = [(keys, matrix, self._backend(target).invoke(target.spec, matrix))]
        else:
            pieces = self._dataset_predictions(target, request.dataset_id or "", request.raw)
        predictions = [
            row
            for keys, matrix, prediction in pieces
            for row in _rows(keys, prediction, target.model.centroids, matrix if request.include_distances else None)
        ]
        self.metrics.record_prediction(name, "predictions", len(predictions))
        counts = {str(c): 0 for c in range(target.cached.k)}
        for row in predictions:
            counts[str(row.closest_cluster)] += 1
        return PredictionResponse(
            endpoint=name,
            model_id=target.model.model_id,
            predictions=sort_predictions(predictions, request.sort),
            cluster_counts=counts,
        )

    def _backend(self, target: Target):  # type: ignore[no-untyped-def]
        return self.backends.get(target.endpoint.backend)

    def _rows_matrix(self, target: Target, rows: list[dict], raw: bool) -> tuple[list[str], np.ndarray]:  # type: ignore[type-arg]
        if len(rows) > self.settings.max_invocation_rows:
            raise PayloadTooLarge(
                f"{len(rows)} rows; at most {self.settings.max_invocation_rows} per request",
                details={"limit": self.settings.max_invocation_rows},
            )
        columns = list(dict.fromkeys(name for row in rows for name in row))
        frame = type_columns(frame_from_rows(columns, [[row.get(c) for c in columns] for row in rows]), None).frame
        key_column = target.cached.key_column
        if key_column and key_column in frame.columns and frame[key_column].isna().any():
            row = int(np.flatnonzero(frame[key_column].isna().to_numpy())[0])
            raise InvalidInput(
                f"row {row} has no value for the key column {key_column!r}; label every row or none",
                details={"row": row, "key_column": key_column},
            )
        keys = (
            frame[key_column].astype(str).tolist()
            if key_column and key_column in frame.columns
            else [str(i) for i in range(len(frame))]
        )
        return keys, self._features(target, frame, raw, "rows")

    def _features(self, target: Target, frame: pd.DataFrame, raw: bool, what: str) -> np.ndarray:
        names = target.model.feature_names
        if raw:
            if target.cached.recipe is None:
                raise InvalidInput("this model has no preprocessing recipe (it was imported); send scaled rows")
            frame = replay(target.cached.recipe, frame)
        missing = [name for name in names if name not in frame.columns]
        if missing:
            raise InvalidInput(
                f"{what} lack the model's feature(s) {', '.join(map(repr, missing))}",
                details={"missing": missing, "feature_names": names},
            )
        return frame_matrix(frame, names, what)

    def _dataset_predictions(
        self, target: Target, dataset_id: str, raw: bool
    ) -> list[tuple[list[str], np.ndarray, Prediction]]:
        dataset = DatasetRepository(self.session).get(dataset_id)
        if dataset.row_count > self.settings.max_invocation_rows:
            raise PayloadTooLarge(
                f"dataset {dataset_id!r} has {dataset.row_count} rows; "
                f"at most {self.settings.max_invocation_rows} per request",
                details={"limit": self.settings.max_invocation_rows},
            )
        frame = pd.read_parquet(self.store.path(dataset.storage_key))
        keys = (
            frame[dataset.key_column].astype(str).tolist()
            if dataset.key_column
            else [str(i) for i in range(len(frame))]
        )
        matrix = self._features(target, frame, raw, f"dataset {dataset.id!r}")
        return [(keys, matrix, self._backend(target).invoke(target.spec, matrix))]


def _rows(
    keys: list[str], prediction: Prediction, centroids: np.ndarray, distances_for: np.ndarray | None
) -> list[RowPrediction]:
    """One response row per input row; distances to every centroid only when asked for."""
    everything = predict(distances_for, centroids, all_distances=True).distances if distances_for is not None else None
    return [
        RowPrediction(
            key=key,
            closest_cluster=int(cluster),
            distance_to_cluster=float(distance),
            distances=None if everything is None else everything[i].tolist(),
        )
        for i, (key, cluster, distance) in enumerate(
            zip(keys, prediction.closest_cluster, prediction.distance_to_cluster, strict=True)
        )
    ]


def sort_predictions(rows: list[RowPrediction], sort: str | None) -> list[RowPrediction]:
    """Stable multi-key sort, e.g. ``cluster,distance`` or ``-distance``."""
    if not sort:
        return rows
    attribute = {"key": "key", "cluster": "closest_cluster", "distance": "distance_to_cluster"}
    for part in reversed([p.strip() for p in sort.split(",")]):
        field = attribute[part.lstrip("-")]
        rows = sorted(rows, key=lambda row: getattr(row, field), reverse=part.startswith("-"))
    return rows
