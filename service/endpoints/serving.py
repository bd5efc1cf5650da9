"""The hot paths: SageMaker-style invocations and predictions for rows, without the database.

An endpoint is resolved from the in-process :class:`~service.endpoints.cache.ServingCatalog`;
only a name the catalog does not know (a typo, or an endpoint that entered service in another
process less than a refresh ago) is looked up in the database, to answer 404/409 precisely or to
serve it. Bodies go straight to float64 matrices, the model's recipe is pre-compiled to numpy,
the nearest-center index is built once per model, and responses are rendered with orjson.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson

from schemas.endpoints import PredictionRequest
from service.backends.registry import BackendRegistry
from service.datasets.online import (
    CompiledRecipe,
    NotCompilable,
    check_row_keys,
    identity_recipe,
    row_keys,
)
from service.datasets.transforms import replay
from service.db.session import Database
from service.endpoints.cache import SERVING, ServingCatalog, ServingEntry, serving_entry
from service.endpoints.invocations import parse_features, render
from service.endpoints.limits import check_distances_budget
from service.endpoints.repository import EndpointRepository
from service.engine import Prediction
from service.engine.predict import euclidean_distances
from service.errors import Conflict, InvalidInput, PayloadTooLarge
from service.metrics import Metrics
from service.settings import Settings

SORT_ATTRIBUTES = {"key": "key", "cluster": "closest_cluster", "distance": "distance_to_cluster"}


class ServingService:
    def __init__(
        self,
        catalog: ServingCatalog,
        backends: BackendRegistry,
        settings: Settings,
        metrics: Metrics,
        database: Database,
    ) -> None:
        self.catalog = catalog
        self.backends = backends
        self.settings = settings
        self.metrics = metrics
        self.database = database

    def entry(self, name: str) -> ServingEntry:
        """The endpoint with the model it serves; 404 if unknown, 409 if it is not serving."""
        entry = self.catalog.lookup(name)
        return entry if entry is not None else self._from_database(name)

    def _from_database(self, name: str) -> ServingEntry:
        with self.database.session() as session:
            row = EndpointRepository(session).get(name)
            if row.status not in SERVING:
                raise Conflict(f"endpoint {name!r} is {row.status}, not InService", details={"status": row.status})
            try:
                model = self.catalog.model(row.model_id)
            except LookupError as exc:  # deleted between the two reads
                raise Conflict(f"endpoint {name!r} is changing; retry", details={"status": row.status}) from exc
            return serving_entry(row, model)

    def predict(self, entry: ServingEntry, features: np.ndarray) -> Prediction:
        return self.backends.get(entry.backend).invoke(entry.spec, features)

    # --- SageMaker's contract -----------------------------------------------------------------

    def invoke(self, name: str, body: bytes, request_kind: str, response_kind: str) -> bytes:
        entry = self.entry(name)
        features = parse_features(
            body, request_kind, len(entry.model.served.feature_names), self.settings.max_invocation_rows
        )
        prediction = self.predict(entry, features)
        self.metrics.record_prediction(name, "invocations", len(features))
        return render(prediction, response_kind)

    # --- friendly predictions for rows --------------------------------------------------------

    def predict_rows(self, name: str, request: PredictionRequest) -> bytes:
        entry = self.entry(name)
        rows = request.rows or []
        if len(rows) > self.settings.max_invocation_rows:
            raise PayloadTooLarge(
                f"{len(rows)} rows; at most {self.settings.max_invocation_rows} per request",
                details={"limit": self.settings.max_invocation_rows},
            )
        if request.include_distances:
            check_distances_budget(len(rows), entry.model.k, self.settings.max_distance_cells)
        matrix = self.rows_matrix(entry, rows, request.raw)
        keys = row_keys(rows, entry.model.key_column)
        prediction = self.predict(entry, matrix)
        if request.include_distances:
            every = euclidean_distances(matrix, entry.model.served.centroids)
            prediction = Prediction(prediction.closest_cluster, prediction.distance_to_cluster, every)
        self.metrics.record_prediction(name, "predictions", len(rows))
        return render_predictions(name, entry, keys, prediction, request.sort)

    def rows_matrix(self, entry: ServingEntry, rows: Sequence[dict[str, Any]], raw: bool) -> np.ndarray:
        model = entry.model
        if raw:
            compiled = model.compiled_recipe
            if compiled is None:
                raise InvalidInput("this model has no preprocessing recipe (it was imported); send scaled rows")
        else:
            compiled = identity_recipe(model.served.feature_names, model.key_column)
        check_row_keys(rows, compiled.accepted)
        try:
            return compiled.matrix(rows)
        except NotCompilable:
            return _replayed_matrix(compiled, rows, model.served.feature_names)


def _replayed_matrix(compiled: CompiledRecipe, rows: Sequence[dict[str, Any]], names: list[str]) -> np.ndarray:
    """The DataFrame replay, for a recipe that could not be compiled."""
    from service.datasets.parsing import frame_from_rows, type_columns
    from service.models.service import frame_matrix

    columns = list(dict.fromkeys(name for row in rows for name in row))
    frame = type_columns(frame_from_rows(columns, [[row.get(c) for c in columns] for row in rows]), None).frame
    frame = replay(compiled.recipe or {}, frame)
    missing = [name for name in names if name not in frame.columns]
    if missing:
        raise InvalidInput(
            f"rows lack the model's feature(s) {', '.join(map(repr, missing))}",
            details={"missing": missing, "feature_names": names},
        )
    return frame_matrix(frame, names, "rows")


def sort_order(keys: list[str], clusters: np.ndarray, distances: np.ndarray, sort: str | None) -> np.ndarray:
    """Row order for ``sort`` (e.g. ``cluster,distance`` or ``-distance``): stable, like a chain of
    stable sorts from the last field to the first; descending keeps ties in input order."""
    order = np.arange(len(keys))
    if not sort:
        return order
    for part in reversed([p.strip() for p in sort.split(",")]):
        field = part.lstrip("-")
        if field == "key":
            values = np.unique(np.array(keys, dtype=object), return_inverse=True)[1].astype(np.float64)
        else:
            values = clusters.astype(np.float64) if field == "cluster" else distances
        current = values[order]
        order = order[np.argsort(-current if part.startswith("-") else current, kind="stable")]
    return order


def render_predictions(
    name: str, entry: ServingEntry, keys: list[str], prediction: Prediction, sort: str | None
) -> bytes:
    """The PredictionResponse body, rendered with orjson (same fields, same order); every row's
    ``distances`` are ``prediction.distances`` (null when None)."""
    clusters = prediction.closest_cluster
    distances = prediction.distance_to_cluster
    order = sort_order(keys, clusters, distances, sort)
    every = prediction.distances[order].tolist() if prediction.distances is not None else None
    cluster_list = clusters[order].tolist()
    distance_list = distances[order].tolist()
    rows = [
        {
            "key": keys[i],
            "closest_cluster": cluster_list[position],
            "distance_to_cluster": distance_list[position],
            "distances": None if every is None else every[position],
        }
        for position, i in enumerate(order.tolist())
    ]
    counts = np.bincount(clusters, minlength=entry.model.k)
    return orjson.dumps(
        {
            "endpoint": name,
            "model_id": entry.model.served.model_id,
            "predictions": rows,
            "cluster_counts": {str(c): int(n) for c, n in enumerate(counts.tolist())},
        }
    )
