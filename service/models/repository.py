"""Model rows."""

from __future__ import annotations

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session, defer

from service.db.tables import EndpointTable, ModelTable
from service.errors import NotFound


class ModelRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, row: ModelTable) -> None:
        self.session.add(row)
        self.session.flush()

    def get(self, model_id: str) -> ModelTable:
        """The model's row; its ``centroids`` are read only when used (describing a model never does)."""
        row = self.session.get(ModelTable, model_id, options=[defer(ModelTable.centroids)])
        if row is None:
            raise NotFound(f"model {model_id!r} not found", details={"model_id": model_id})
        return row

    def exists(self, model_id: str) -> bool:
        return self.session.scalar(select(ModelTable.id).where(ModelTable.id == model_id)) is not None

    def lock(self, model_id: str, *, exclusive: bool) -> bool:
        """Lock the model's row until the transaction ends; False if the row is gone.

        ``exclusive`` (``FOR UPDATE``) before deleting it; otherwise ``FOR KEY SHARE``, what a new
        reference to it (an endpoint, a switch) needs, so a delete waits for the reference to commit
        (and then sees it), or the reference waits for the delete (and then finds the row gone).
        PostgreSQL only: SQLite serialises writers, and a foreign-key failure is re-checked instead.
        """
        query = select(ModelTable.id).where(ModelTable.id == model_id)
        query = query.with_for_update() if exclusive else query.with_for_update(read=True, key_share=True)
        return self.session.scalar(query) is not None

    def page(self, offset: int, limit: int, name: str | None) -> tuple[list[ModelTable], int]:
        # Listings never read the centroids (k x d numbers) nor the recipe, the columns that grow with
        # a model: neither the page query nor the count names them.
        filters = [ModelTable.name == name] if name is not None else []
        total = self.session.scalar(select(func.count()).select_from(ModelTable).where(*filters)) or 0
        query = (
            select(ModelTable)
            .options(defer(ModelTable.centroids, raiseload=True), defer(ModelTable.recipe, raiseload=True))
            .where(*filters)
            .order_by(ModelTable.created_at.desc(), ModelTable.id)
            .offset(offset)
            .limit(limit)
        )
        return list(self.session.scalars(query).all()), total

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
