"""Endpoint rows, with the same lease protocol as training jobs for worker transitions."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from service.db.tables import EndpointTable
from service.db.types import utcnow
from service.errors import NotFound

TRANSITIONAL = ("Creating", "Updating", "Deleting")
SERVING = ("InService", "Updating")


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

    def list(self, offset: int, limit: int, status: str | None) -> tuple[list[EndpointTable], int]:
        query = select(EndpointTable)
        if status is not None:
            query = query.where(EndpointTable.status == status)
        total = self.session.scalar(select(func.count()).select_from(query.subquery())) or 0
        rows = self.session.scalars(
            query.order_by(EndpointTable.created_at.desc(), EndpointTable.name).offset(offset).limit(limit)
        ).all()
        return list(rows), total

    def count_by_status(self) -> dict[str, int]:
        rows = self.session.execute(select(EndpointTable.status, func.count()).group_by(EndpointTable.status)).all()
        return {status: count for status, count in rows}

    def claim_next(self, worker_id: str, lease_seconds: float, backends: list[str]) -> EndpointTable | None:
        now = utcnow()
        due = and_(
            EndpointTable.status.in_(TRANSITIONAL),
            EndpointTable.backend.in_(backends),
            or_(EndpointTable.lease_expires_at.is_(None), EndpointTable.lease_expires_at < now),
            or_(EndpointTable.next_poll_at.is_(None), EndpointTable.next_poll_at <= now),
        )
        name = self.session.scalar(
            select(EndpointTable.name).where(due).order_by(EndpointTable.updated_at).limit(1).with_for_update(skip_locked=True)
        )
        if name is None:
            return None
        taken = self.session.execute(
            update(EndpointTable)
            .where(EndpointTable.name == name, due)
            .values(lease_owner=worker_id, lease_expires_at=now + timedelta(seconds=lease_seconds))
            .execution_options(synchronize_session=False)
        ).rowcount
        self.session.commit()
        if taken != 1:
            return None
        row = self.get(name)
        self.session.refresh(row)
        return row

    def guarded_update(self, name: str, worker_id: str, values: dict[str, Any]) -> bool:
        result = self.session.execute(
            update(EndpointTable)
            .where(EndpointTable.name == name, EndpointTable.lease_owner == worker_id)
            .values(**values, updated_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        return result.rowcount == 1
