"""Model rows."""

from __future__ import annotations

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from service.db.pagination import paginate
from service.db.tables import EndpointTable, ModelTable
from service.errors import NotFound


class ModelRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, row: ModelTable) -> None:
        self.session.add(row)
        self.session.flush()

    def get(self, model_id: str) -> ModelTable:
        row = self.session.get(ModelTable, model_id)
        if row is None:
            raise NotFound(f"model {model_id!r} not found", details={"model_id": model_id})
        return row

    def page(self, offset: int, limit: int, name: str | None) -> tuple[list[ModelTable], int]:
        query = select(ModelTable)
        if name is not None:
            query = query.where(ModelTable.name == name)
        return paginate(
            self.session,
            query,
            (
                ModelTable.created_at.desc(),
                ModelTable.id,
            ),
            offset,
            limit,
        )

    def using_dataset(self, dataset_id: str) -> list[str]:
        return list(self.session.scalars(select(ModelTable.id).where(ModelTable.train_dataset_id == dataset_id)).all())

    def deployed_on(self, model_id: str) -> list[str]:
        query = select(EndpointTable.name).where(
            or_(EndpointTable.model_id == model_id, EndpointTable.pending_model_id == model_id)
        )
        return list(self.session.scalars(query).all())

    def delete(self, row: ModelTable) -> None:
        self.session.delete(row)
        self.session.flush()

    def artifact_keys(self) -> set[str]:
        return set(self.session.scalars(select(ModelTable.artifact_key)).all())
