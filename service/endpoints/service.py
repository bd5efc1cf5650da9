"""Endpoint use cases: lifecycle, and predictions for a stored dataset (rows: see serving.py)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from schemas.endpoints import EndpointCreate, PredictionRequest
from service.backends.registry import BackendRegistry
from service.datasets.repository import DatasetRepository
from service.datasets.service import WORK_PREFIX
from service.db.changes import announce_work, bump_serving, work_committed
from service.db.tables import EndpointTable, ModelTable
from service.db.types import utcnow
from service.endpoints.cache import ServingCatalog, ServingEntry
from service.endpoints.limits import check_distances_budget
from service.endpoints.repository import EndpointRepository
from service.endpoints.serving import ServingService, render_predictions, sort_order
from service.engine import Prediction
from service.engine.predict import euclidean_distances
from service.errors import Conflict, InvalidInput, PayloadTooLarge
from service.models.repository import ModelRepository
from service.models.service import DatasetReader, RawBatch, batch_rows, rendered
from service.statuses import EndpointStatus
from service.storage import LocalArtifactStore
from service.streaming import (
    CSV,
    JSONLINES,
    LineFormat,
    RowBatch,
    concat_rows,
    external_sort,
    line_format,
    ordered_map,
    slices,
    stream_lines,
)


class EndpointService:
    def __init__(
        self,
        session: Session,
        store: LocalArtifactStore,
        backends: BackendRegistry,
        catalog: ServingCatalog,
        serving: ServingService,
    ) -> None:
        self.session = session
        self.endpoints = EndpointRepository(session)
        self.models = ModelRepository(session)
        self.store = store
        self.backends = backends
        self.catalog = catalog
        self.serving = serving
        self.settings = serving.settings

    # --- lifecycle ----------------------------------------------------------------------------

    def create(self, request: EndpointCreate) -> EndpointTable:
        """A new endpoint, ``Creating``; 409 if the name is taken or the model is deleted meanwhile.

        The model's row is held (PostgreSQL) from the check to the commit, so a concurrent
        ``DELETE /models`` either sees this endpoint or has removed the model first; a foreign-key
        failure (SQLite) is read again to answer with its true reason, never a 500.
        """
        if self.endpoints.find(request.name) is not None:
            raise Conflict(f"endpoint {request.name!r} already exists", details={"name": request.name})
        self.models.get(request.model_id)
        self.backends.usable(request.backend)
        instance_config = {
            key: value
            for key, value in {"instance_type": request.instance_type, "instance_count": request.instance_count}.items()
            if value is not None
        }
        if not self.models.lock(request.model_id, exclusive=False):
            raise model_deleted(request.model_id, f"endpoint {request.name!r} was being created")
        row = EndpointTable(
            name=request.name,
            backend=request.backend,
            model_id=request.model_id,
            status=EndpointStatus.CREATING,
            instance_config=instance_config,
            remote={},
        )
        try:
            self.endpoints.add(row)
            announce_work(self.session)
            self.session.commit()
        except IntegrityError as exc:
            self.session.rollback()
            raise self._integrity_conflict(
                request.name, request.model_id, f"endpoint {request.name!r} was being created"
            ) from exc
        work_committed()
        return row

    def _integrity_conflict(self, new_name: str | None, model_id: str, while_: str) -> Conflict:
        """The true reason a write failed on a constraint, read again after the rollback."""
        if new_name is not None and self.endpoints.exists(new_name):
            return Conflict(f"endpoint {new_name!r} already exists", details={"name": new_name})
        if not self.models.exists(model_id):
            return model_deleted(model_id, while_)
        return Conflict(f"a concurrent change conflicted while {while_}; retry", details={"model_id": model_id})

    def get(self, name: str) -> EndpointTable:
        return self.endpoints.get(name)

    def page(self, offset: int, limit: int, status: str | None) -> tuple[list[EndpointTable], int]:
        return self.endpoints.page(offset, limit, status)

    def switch_model(self, name: str, model_id: str, *, allow_feature_change: bool = False) -> EndpointTable:
        """Start serving another model; the current one keeps answering until the new one is ready.

        A model with other feature names than the endpoint serves now is refused (409) unless
        ``allow_feature_change``. The endpoint's row is locked (PostgreSQL) and the model's held, so a
        concurrent switch or ``DELETE /models`` is answered 409 with its reason, never 500.
        """
        row = self.endpoints.get_for_update(name)
        new_model = self.models.get(model_id)
        if row.status not in (EndpointStatus.IN_SERVICE, EndpointStatus.FAILED):
            raise Conflict(
                f"endpoint {name!r} is {row.status}; wait until it is InService", details={"status": row.status}
            )
        if not allow_feature_change:
            self._refuse_feature_change(row, new_model)
        if not self.models.lock(model_id, exclusive=False):
            raise model_deleted(model_id, f"endpoint {name!r} was being switched to it")
        if row.status == EndpointStatus.FAILED:
            row.model_id, row.pending_model_id, row.status = model_id, None, EndpointStatus.CREATING
        else:
            row.pending_model_id, row.status = model_id, EndpointStatus.UPDATING
        row.failure_reason = None
        row.updated_at = utcnow()
        row.next_poll_at = None
        try:
            announce_work(self.session)
            self.session.commit()
        except IntegrityError as exc:
            self.session.rollback()
            raise self._integrity_conflict(None, model_id, f"endpoint {name!r} was being switched to it") from exc
        work_committed()
        return row

    def _refuse_feature_change(self, row: EndpointTable, new_model: ModelTable) -> None:
        """409 when the new model expects other features (names or order) than the endpoint serves."""
        if row.model_id == new_model.id:
            return
        current = list(self.models.get(row.model_id).feature_names)
        proposed = list(new_model.feature_names)
        if current == proposed:
            return
        raise Conflict(
            f"model {new_model.id!r} has features {proposed} but endpoint {row.name!r} serves {current}; "
            'its clients would break. Send "allow_feature_change": true to switch anyway',
            details={
                "endpoint_feature_names": current,
                "model_feature_names": proposed,
                "allow_feature_change": False,
            },
        )

    def delete(self, name: str) -> EndpointTable:
        row = self.endpoints.get(name)
        if row.status != EndpointStatus.DELETING:
            row.status, row.updated_at, row.next_poll_at = EndpointStatus.DELETING, utcnow(), None
            bump_serving(self.session)
            announce_work(self.session)
            self.session.commit()
            self.catalog.changed()
            work_committed()
        return row

    # --- predictions for a stored dataset -----------------------------------------------------

    def dataset_predictions(self, name: str, request: PredictionRequest) -> bytes:
        """The JSON form (``PredictionResponse``): at most ``CENTROID_MAX_INVOCATION_ROWS`` rows,
        413 above with the advice to stream instead."""
        if (request.rows is None) == (request.dataset_id is None):
            raise InvalidInput("send exactly one of `rows` or `dataset_id`")
        if request.rows is not None:
            return self.serving.predict_rows(name, request)
        work = self._dataset_work(name, request)
        limit = self.settings.max_invocation_rows
        if work.reader.rows > limit:
            raise PayloadTooLarge(
                f"{work.reader.what} has {work.reader.rows} rows; the JSON form holds at most {limit} "
                f"(CENTROID_MAX_INVOCATION_ROWS). Send `Accept: {JSONLINES}` or `Accept: {CSV}` to stream "
                "every row, one line each, whatever the dataset's size",
                details={"rows": work.reader.rows, "limit": limit, "streamed_media_types": [JSONLINES, CSV]},
            )
        if request.include_distances:
            check_distances_budget(work.reader.rows, work.entry.model.k, self.settings.max_distance_cells)
        rows = work.all_rows()
        self.serving.metrics.record_prediction(name, "predictions", len(rows))
        prediction = Prediction(rows.closest_cluster, rows.distance_to_cluster, rows.distances)
        return render_predictions(name, work.entry, rows.keys.to_pylist(), prediction, request.sort)

    def stream_dataset_predictions(
        self, name: str, request: PredictionRequest, media_type: str, request_id: str | None
    ) -> Iterator[bytes]:
        """JSON Lines or CSV, one line per row of the dataset, any number of rows (see
        :mod:`service.streaming`). Everything checkable is checked before this returns (before the
        first byte). ``include_distances`` is bounded per batch: batches hold at most
        ``CENTROID_MAX_DISTANCE_CELLS`` / k rows. ``sort`` needs every row: it is
        sorted in memory up to ``CENTROID_MAX_INVOCATION_ROWS`` rows, and by an external sort above
        (nothing is sent until every row is predicted)."""
        if request.dataset_id is None or request.rows is not None:
            raise InvalidInput(f"{media_type} is answered for a `dataset_id`; rows are answered in JSON")
        k = self.serving.entry(name).model.k
        rows = batch_rows(self.settings.parquet_row_group_rows)
        if request.include_distances:
            check_distances_budget(1, k, self.settings.max_distance_cells)
            rows = min(rows, self.settings.max_distance_cells // k)
        work = self._dataset_work(name, request, rows)
        lines = line_format(media_type)
        if request.sort:
            chunks = self._sorted_chunks(work, lines, request.sort, rows)
        else:
            chunks = ordered_map(lambda item: rendered(lines, work.row_batch(item)), work.reader.batches())
        return stream_lines(
            chunks,
            lines,
            header=lines.header(k if request.include_distances else None),
            what=f"predictions of endpoint {name!r} on {work.reader.what}",
            request_id=request_id,
            on_done=lambda rows: self.serving.metrics.record_prediction(name, "predictions", rows),
        )

    def _sorted_chunks(
        self, work: DatasetWork, lines: LineFormat, sort: str, rows_per_batch: int
    ) -> Iterator[tuple[bytes, int]]:
        """Rows in ``sort`` order: up to ``CENTROID_MAX_INVOCATION_ROWS`` rows sorted in memory (as the
        JSON form does), more by an external sort (DuckDB over a spill file in the artifact store)."""
        if work.reader.rows > self.settings.max_invocation_rows:
            k = work.entry.model.k if work.include_distances else None
            predicted = ordered_map(work.row_batch, work.reader.batches())
            scratch = self.store.path(WORK_PREFIX)  # emptied of leftovers at start-up
            scratch.mkdir(parents=True, exist_ok=True)
            ordered = external_sort(predicted, sort, k, rows_per_batch, scratch)
            return (rendered(lines, batch) for batch in ordered)

        def in_memory() -> Iterator[tuple[bytes, int]]:
            rows = work.all_rows()
            order = sort_order(rows.keys.to_pylist(), rows.closest_cluster, rows.distance_to_cluster, sort)
            for piece in slices(rows.take(order), rows_per_batch):
                yield rendered(lines, piece)

        return in_memory()

    def _dataset_work(self, name: str, request: PredictionRequest, rows_per_batch: int | None = None) -> DatasetWork:
        """The endpoint, and the dataset opened and checked for its model (and recipe, if raw)."""
        entry = self.serving.entry(name)
        dataset = DatasetRepository(self.session).get(request.dataset_id or "")
        recipe = None
        if request.raw:
            recipe = entry.model.compiled_recipe
            if recipe is None:
                raise InvalidInput("this model has no preprocessing recipe (it was imported); send scaled rows")
        names = list(entry.model.served.feature_names)
        rows = rows_per_batch or batch_rows(self.settings.parquet_row_group_rows)
        reader = DatasetReader(self.store, dataset, names, recipe=recipe, batch_rows=rows)
        return DatasetWork(self.serving, entry, reader, request.include_distances)


@dataclass(frozen=True)
class DatasetWork:
    """Predictions of one dataset on one endpoint: the checked reader and the per-batch work."""

    serving: ServingService
    entry: ServingEntry
    reader: DatasetReader
    include_distances: bool

    def row_batch(self, item: RawBatch) -> RowBatch:
        """One batch predicted (by the endpoint's backend), with every distance if asked for."""
        features = self.reader.feature_batch(item)
        prediction = self.serving.predict(self.entry, features.matrix)
        every = (
            euclidean_distances(features.matrix, self.entry.model.served.centroids) if self.include_distances else None
        )
        return RowBatch(features.keys, prediction.closest_cluster, prediction.distance_to_cluster, every)

    def all_rows(self) -> RowBatch:
        """Every row in one batch (for the JSON form and sorting, both bounded by the row cap)."""
        return concat_rows(list(ordered_map(self.row_batch, self.reader.batches())))


def model_deleted(model_id: str, while_: str) -> Conflict:
    return Conflict(
        f"model {model_id!r} was deleted while {while_}", details={"model_id": model_id, "reason": "model_deleted"}
    )
