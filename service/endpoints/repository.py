"""Endpoint rows, with the same lease protocol as training jobs (see :mod:`service.db.leases`)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, delete, select
from sqlalchemy.orm import Session

from service.db import leases
from service.db.pagination import paginate
from service.db.session import rows_affected
from service.db.tables import EndpointTable
from service.db.types import utcnow
from service.errors import NotFound
from service.statuses import EndpointStatus

TRANSITIONAL = tuple(status for status in EndpointStatus if status.busy)
SERVING = (EndpointStatus.IN_SERVICE, EndpointStatus.UPDATING)


class EndpointRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, row: EndpointTable) -> None:
        self.session.add(row)
        self.session.flush()

    def find(self, name: str) -> EndpointTable | None:
        return self.session.get(EndpointTable, name)

    def get(self, name: str) -> EndpointTable:
        row = self.find(name)
        if row is None:
            raise NotFound(f"endpoint {name!r} not found", details={"name": name})
        return row

    def get_for_update(self, name: str) -> EndpointTable:
        """The endpoint's row, fresh and locked until the transaction ends (``FOR UPDATE`` on PostgreSQL)."""
        query = (
            select(EndpointTable)
            .where(EndpointTable.name == name)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
        row = self.session.scalars(query).one_or_none()
        if row is None:
            raise NotFound(f"endpoint {name!r} not found", details={"name": name})
        return row

    def exists(self, name: str) -> bool:
        return self.session.scalar(select(EndpointTable.name).where(EndpointTable.name == name)) is not None

    def page(self, offset: int, limit: int, status: str | None) -> tuple[list[EndpointTable], int]:
        query = select(EndpointTable)
        if status is not None:
            query = query.where(EndpointTable.status == status)
        return paginate(
            self.session,
            query,
            (
                EndpointTable.created_at.desc(),
                EndpointTable.name,
            ),
            offset,
            limit,
        )

    def claim_next(self, worker_id: str, lease_seconds: float, backends: list[str]) -> EndpointTable | None:
        """Take the endpoint waiting longest for a transition (see :mod:`service.db.leases`)."""
        now = utcnow()
        name = leases.claim(
            self.session,
            EndpointTable.name,
            and_(leases.due(EndpointTable, TRANSITIONAL, now), EndpointTable.backend.in_(backends)),
            (EndpointTable.updated_at,),
            worker_id,
            leases.lease_until(lease_seconds, now),
        )
        if name is None:
            return None
        row = self.get(name)
        self.session.refresh(row)
        return row

    def guarded_update(self, name: str, worker_id: str, values: dict[str, Any]) -> bool:
        return leases.guarded_update(
            self.session, EndpointTable.name, name, worker_id, {**values, "updated_at": utcnow()}
        )

    def delete_owned(self, name: str, worker_id: str) -> bool:
        """Remove an endpoint whose delete has finished, while ``worker_id`` holds its lease; the
        caller commits."""
        return (
            rows_affected(
                self.session.execute(
                    delete(EndpointTable).where(EndpointTable.name == name, EndpointTable.lease_owner == worker_id)
                )
            )
            > 0
        )
