"""Endpoint rows, with the same lease protocol as training jobs (see :mod:`service.db.leases`)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, select

from service.db import leases
from service.db.repository import LeasedRepository
from service.db.tables import EndpointTable
from service.db.types import utcnow
from service.statuses import EndpointStatus

TRANSITIONAL = tuple(status for status in EndpointStatus if status.busy)
SERVING = (EndpointStatus.IN_SERVICE, EndpointStatus.UPDATING)


class EndpointRepository(LeasedRepository[EndpointTable]):
    table = EndpointTable
    noun = "endpoint"
    key_detail = "name"

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
            raise self.not_found(name)
        return row

    def claim_next(self, worker_id: str, lease_seconds: float, backends: list[str]) -> EndpointTable | None:
        """Take the endpoint waiting longest for a transition (see :mod:`service.db.leases`)."""
        condition = and_(leases.due(EndpointTable, TRANSITIONAL, utcnow()), EndpointTable.backend.in_(backends))
        return self.claim(condition, (EndpointTable.updated_at,), worker_id, lease_seconds)

    def guarded_update(self, key: str, worker_id: str, values: dict[str, Any]) -> bool:
        """Write ``values`` (and the time of the change) only while ``worker_id`` holds the lease."""
        return super().guarded_update(key, worker_id, {**values, "updated_at": utcnow()})
