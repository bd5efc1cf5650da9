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
from service.db.tables import EndpointTable, ModelTable
from service.db.types import utcnow
from service.endpoints.cache import ServingCatalog
from service.endpoints.limits import check_distances_budget
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
        if row.status not in ("InService", "Failed"):
            raise Conflict(
                f"endpoint {name!r} is {row.status}; wait until it is InService", details={"status": row.status}
            )
        if not allow_feature_change:
            self._refuse_feature_change(row, new_model)
        if not self.models.lock(model_id, exclusive=False):
            raise model_deleted(model_id, f"endpoint {name!r} was being switched to it")
        if row.status == "Failed":
            row.model_id, row.pending_model_id, row.status = model_id, None, "Creating"
        else:
            row.pending_model_id, row.status = model_id, "Updating"
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
        if request.include_distances:
            check_distances_budget(dataset.row_count, entry.model.k, self.settings.max_distance_cells)
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


def model_deleted(model_id: str, while_: str) -> Conflict:
    return Conflict(
        f"model {model_id!r} was deleted while {while_}", details={"model_id": model_id, "reason": "model_deleted"}
    )
