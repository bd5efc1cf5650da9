"""The repository base every domain's repository builds on.

:class:`Repository` holds what every table's repository does the same way — add, find, get (or a
``NotFound`` naming the resource), exists, delete and a page of rows with the total count, in the
table's listing order — so a domain repository only adds the queries that are its own.
:class:`LeasedRepository` adds the worker's side of the lease protocol (:mod:`service.db.leases`)
for the tables workers claim rows from: training jobs, endpoints and dataset tasks.

A subclass names its table, what the resource is called in errors (``noun``), the key's name in
error details (``key_detail``) and the listing order (``listing_order()``). The key is the table's
one-column primary key.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Generic, TypeVar

from sqlalchemy import ColumnElement, Select, delete, func, select
from sqlalchemy.orm import InstrumentedAttribute, Session
from sqlalchemy.orm.interfaces import ORMOption

from service.db import leases
from service.db.session import rows_affected
from service.db.tables import Base
from service.db.types import utcnow
from service.errors import NotFound

RowT = TypeVar("RowT", bound=Base)


class Repository(Generic[RowT]):
    """Rows of one table, keyed by its primary key."""

    table: ClassVar[type[Any]]
    noun: ClassVar[str]  # "dataset", "training job": how errors name a row
    key_detail: ClassVar[str]  # "dataset_id", "name": the key's name in an error's details

    def __init__(self, session: Session) -> None:
        self.session = session

    @classmethod
    def key(cls) -> InstrumentedAttribute[str]:
        """The primary-key column (``id`` or ``name``)."""
        column: InstrumentedAttribute[str] = getattr(cls.table, cls.table.__mapper__.primary_key[0].key)
        return column

    @classmethod
    def listing_order(cls) -> tuple[Any, ...]:
        """Newest first, ties broken by key: the order of every listing."""
        return (cls.table.created_at.desc(), cls.key())

    def not_found(self, key: str) -> NotFound:
        return NotFound(f"{self.noun} {key!r} not found", details={self.key_detail: key})

    def add(self, row: RowT) -> None:
        self.session.add(row)
        self.session.flush()

    def find(self, key: str, options: Sequence[ORMOption] = ()) -> RowT | None:
        row: RowT | None = self.session.get(self.table, key, options=options)
        return row

    def get(self, key: str, options: Sequence[ORMOption] = ()) -> RowT:
        row = self.find(key, options)
        if row is None:
            raise self.not_found(key)
        return row

    def exists(self, key: str) -> bool:
        return self.session.scalar(select(self.key()).where(self.key() == key)) is not None

    def delete(self, row: RowT) -> None:
        self.session.delete(row)
        self.session.flush()

    def listing(
        self, offset: int, limit: int, *where: ColumnElement[bool], options: Sequence[ORMOption] = ()
    ) -> tuple[list[RowT], int]:
        """Rows ``offset`` .. ``offset + limit`` matching ``where``, in listing order, and how many match.

        The count selects from the table itself, not from the page query, so it reads no column
        (a model's centroids, a dataset's recipe) that ``options`` keeps out of the page."""
        total = self.session.scalar(select(func.count()).select_from(self.table).where(*where)) or 0
        query: Select[Any] = (
            select(self.table)
            .where(*where)
            .options(*options)
            .order_by(*self.listing_order())
            .offset(offset)
            .limit(limit)
        )
        return list(self.session.scalars(query).all()), total

    def page(self, offset: int, limit: int, status: str | None = None) -> tuple[list[RowT], int]:
        """A page of the listing, of rows in ``status`` when given."""
        return self.listing(offset, limit, *([] if status is None else [self.table.status == status]))


class LeasedRepository(Repository[RowT]):
    """A table whose rows workers claim under leases (see :mod:`service.db.leases`)."""

    def claim(
        self, condition: ColumnElement[bool], order_by: tuple[Any, ...], worker_id: str, lease_seconds: float
    ) -> RowT | None:
        """Lease the first row matching ``condition`` in ``order_by``; the fresh row, or None."""
        now = utcnow()
        key = leases.claim(
            self.session, self.key(), condition, order_by, worker_id, leases.lease_until(lease_seconds, now)
        )
        if key is None:
            return None
        row = self.get(key)
        self.session.refresh(row)
        return row

    def guarded_update(self, key: str, worker_id: str, values: dict[str, Any]) -> bool:
        """Write ``values`` only while ``worker_id`` holds the lease; the caller commits."""
        return leases.guarded_update(self.session, self.key(), key, worker_id, values)

    def heartbeat(self, key: str, worker_id: str, lease_seconds: float, values: dict[str, Any]) -> bool:
        """Extend the lease (and write progress) and commit; False when the lease is no longer ours."""
        owned = self.guarded_update(
            key, worker_id, {"lease_expires_at": leases.lease_until(lease_seconds, utcnow()), **values}
        )
        self.session.commit()
        return owned

    def delete_owned(self, key: str, worker_id: str) -> bool:
        """Remove a row while ``worker_id`` holds its lease; the caller commits."""
        statement = delete(self.table).where(self.key() == key, self.table.lease_owner == worker_id)
        return rows_affected(self.session.execute(statement)) > 0
