"""Dataset rows in the database (metadata only; the data is a Parquet file in the store, or S3
objects for a dataset registered from S3)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session, defer

from service.db.pagination import paginate
from service.db.tables import DatasetTable
from service.errors import NotFound


class DatasetRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, row: DatasetTable) -> None:
        self.session.add(row)
        self.session.flush()

    def get(self, dataset_id: str) -> DatasetTable:
        row = self.session.get(DatasetTable, dataset_id)
        if row is None:
            raise NotFound(f"dataset {dataset_id!r} not found", details={"dataset_id": dataset_id})
        return row

    def page(self, offset: int, limit: int, name: str | None = None) -> tuple[list[DatasetTable], int]:
        """A page of datasets without their recipes (``recipe_summary`` stands in for them)."""
        query = select(DatasetTable).options(defer(DatasetTable.recipe, raiseload=True))
        if name is not None:
            query = query.where(DatasetTable.name == name)
        return paginate(
            self.session,
            query,
            (
                DatasetTable.created_at.desc(),
                DatasetTable.id,
            ),
            offset,
            limit,
        )

    def delete(self, row: DatasetTable) -> None:
        self.session.delete(row)
        self.session.flush()

    def storage_keys(self) -> set[str]:
        """The artifact-store keys of every stored dataset's file (a dataset in S3 has none)."""
        query = select(DatasetTable.stored_key).where(DatasetTable.stored_key != "")
        return set(self.session.scalars(query).all())
