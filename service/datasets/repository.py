"""Dataset rows in the database (metadata only; the data is a Parquet file in the store, or S3
objects for a dataset registered from S3)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import defer

from service.db.repository import Repository
from service.db.tables import DatasetTable


class DatasetRepository(Repository[DatasetTable]):
    table = DatasetTable
    noun = "dataset"
    key_detail = "dataset_id"

    def page(self, offset: int, limit: int, name: str | None = None) -> tuple[list[DatasetTable], int]:
        """A page of datasets without their recipes (``recipe_summary`` stands in for them)."""
        return self.listing(
            offset,
            limit,
            *([] if name is None else [DatasetTable.name == name]),
            options=[defer(DatasetTable.recipe, raiseload=True)],
        )

    def storage_keys(self) -> set[str]:
        """The artifact-store keys of every stored dataset's file (a dataset in S3 has none)."""
        query = select(DatasetTable.stored_key).where(DatasetTable.stored_key != "")
        return set(self.session.scalars(query).all())
