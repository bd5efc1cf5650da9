"""Endpoint use cases: lifecycle, and predictions for a stored dataset (rows: see serving.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from schemas.endpoints import EndpointCreate, PredictionRequest
from service.backends import BackendRegistry
from service.datasets.online import NotCompilable
from service.datasets.repository import DatasetRepository
from service.datasets.transforms import replay
from service.db.changes import announce_work, bump_serving, work_committed
from service.db.tables import EndpointTable
from service.db.types import utcnow
from service.endpoints.cache import ServingCatalog
from service.endpoints.repository import EndpointRepository
from service.endpoints.serving import ServingService, render_predictions
from service.errors import Conflict, InvalidInput, PayloadTooLarge
from service.models.repository import ModelRepository
from service.models.service import frame_matrix
from service.storage import LocalArtifactStore


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
            announce_work(self.session)
            self.session.commit()
        except IntegrityError as exc:
            self.session.rollback()
            raise Conflict(f"endpoint {request.name!r} already exists", details={"name": request.name}) from exc
        work_committed()
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
        announce_work(self.session)
        self.session.commit()
        work_committed()
        return row

    def delete(self, name: str) -> EndpointTable:
        row = self.endpoints.get(name)
        if row.status != "Deleting":
            row.status, row.updated_at, row.next_poll_at = "Deleting", utcnow(), None
            bump_serving(self.session)
            announce_work(self.session)
            self.session.commit()
            self.catalog.changed()
            work_committed()
        return row

    # --- predictions for a stored dataset -----------------------------------------------------

    def dataset_predictions(self, name: str, request: PredictionRequest) -> bytes:
        if (request.rows is None) == (request.dataset_id is None):
            raise InvalidInput("send exactly one of `rows` or `dataset_id`")
        if request.rows is not None:
            return self.serving.predict_rows(name, request)
        entry = self.serving.entry(name)
        dataset = DatasetRepository(self.session).get(request.dataset_id or "")
        if dataset.row_count > self.settings.max_invocation_rows:
            raise PayloadTooLarge(
                f"dataset {dataset.id!r} has {dataset.row_count} rows; "
                f"at most {self.settings.max_invocation_rows} per request",
                details={"limit": self.settings.max_invocation_rows},
            )
        frame = pd.read_parquet(self.store.path(dataset.storage_key))
        keys = (
            frame[dataset.key_column].astype(str).tolist()
            if dataset.key_column
            else [str(i) for i in range(len(frame))]
        )
        what = f"dataset {dataset.id!r}"
        names = entry.model.served.feature_names
        if request.raw:
            compiled = entry.model.compiled_recipe
            if compiled is None:
                raise InvalidInput("this model has no preprocessing recipe (it was imported); send scaled rows")
            try:
                matrix = compiled.frame_matrix(frame, what)
            except NotCompilable:
                matrix = frame_matrix(replay(compiled.recipe or {}, frame), names, what)
        else:
            missing = [column for column in names if column not in frame.columns]
            if missing:
                raise InvalidInput(
                    f"{what} lack the model's feature(s) {', '.join(map(repr, missing))}",
                    details={"missing": missing, "feature_names": names},
                )
            matrix = frame_matrix(frame, names, what)
        prediction = self.serving.predict(entry, np.ascontiguousarray(matrix))
        self.serving.metrics.record_prediction(name, "predictions", len(keys))
        return render_predictions(
            name, entry, keys, prediction, matrix if request.include_distances else None, request.sort
        )
