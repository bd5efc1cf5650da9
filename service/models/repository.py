"""Model rows."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import or_, select
from sqlalchemy.orm import defer
from sqlalchemy.orm.interfaces import ORMOption

from service.db.repository import Repository
from service.db.tables import EndpointTable, ModelTable


class ModelRepository(Repository[ModelTable]):
    table = ModelTable
    noun = "model"
    key_detail = "model_id"

    def find(self, key: str, options: Sequence[ORMOption] = ()) -> ModelTable | None:
        """The model's row; its ``centroids`` are read only when used (describing a model never does)."""
        return super().find(key, [defer(ModelTable.centroids), *options])

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

    def page(self, offset: int, limit: int, name: str | None = None) -> tuple[list[ModelTable], int]:
        # Listings never read the centroids (k x d numbers) nor the recipe, the columns that grow with
        # a model: the page query does not load them and raises if anything tries.
        return self.listing(
            offset,
            limit,
            *([] if name is None else [ModelTable.name == name]),
            options=[defer(ModelTable.centroids, raiseload=True), defer(ModelTable.recipe, raiseload=True)],
        )

    def using_dataset(self, dataset_id: str) -> list[str]:
        return list(self.session.scalars(select(ModelTable.id).where(ModelTable.train_dataset_id == dataset_id)).all())

    def deployed_on(self, model_id: str) -> list[str]:
        query = select(EndpointTable.name).where(
            or_(EndpointTable.model_id == model_id, EndpointTable.pending_model_id == model_id)
        )
        return list(self.session.scalars(query).all())

    def artifact_keys(self) -> set[str]:
        return set(self.session.scalars(select(ModelTable.artifact_key)).all())
