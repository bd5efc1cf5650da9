"""The lease protocol shared by every table a worker claims rows from (jobs, endpoints).

A worker *claims* a row by setting ``lease_owner`` and ``lease_expires_at`` with a conditional
UPDATE that only succeeds while the row is still due (compare-and-swap: atomic on SQLite and
PostgreSQL alike; PostgreSQL also skips rows another claimer has locked, so claimers don't queue
behind each other). Every later write is guarded by ``lease_owner = me``, so a worker that lost
its lease can no longer change the row.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, or_, select, update
from sqlalchemy.orm import InstrumentedAttribute, Session

from service.db.session import rows_affected

CLAIM_ATTEMPTS = 5


def due(table: Any, statuses: tuple[str, ...], now: datetime) -> ColumnElement[bool]:
    """Rows in ``statuses`` whose lease ran out (or never existed) and whose next poll is due."""
    return and_(
        table.status.in_(statuses),
        or_(table.lease_expires_at.is_(None), table.lease_expires_at < now),
        or_(table.next_poll_at.is_(None), table.next_poll_at <= now),
    )


def claim(
    session: Session,
    key: InstrumentedAttribute[str],
    condition: ColumnElement[bool],
    order_by: tuple[Any, ...],
    worker_id: str,
    lease_until: datetime,
) -> str | None:
    """Lease the first row matching ``condition``; its key, or None when nothing is due."""
    table = key.class_
    for _ in range(CLAIM_ATTEMPTS):
        candidate = session.scalar(
            select(key).where(condition).order_by(*order_by).limit(1).with_for_update(skip_locked=True)
        )
        if candidate is None:
            session.rollback()
            return None
        taken = rows_affected(
            session.execute(
                update(table)
                .where(key == candidate, condition)
                .values(lease_owner=worker_id, lease_expires_at=lease_until, next_poll_at=None)
                .execution_options(synchronize_session=False)
            )
        )
        if taken == 1:
            session.commit()
            return candidate
        session.rollback()
    return None


def lease_until(seconds: float, now: datetime) -> datetime:
    return now + timedelta(seconds=seconds)


def guarded_update(
    session: Session, key: InstrumentedAttribute[str], value: str, worker_id: str, values: dict[str, Any]
) -> bool:
    """Write ``values`` only while ``worker_id`` holds the lease; the caller commits."""
    table = key.class_
    result = session.execute(
        update(table)
        .where(key == value, table.lease_owner == worker_id)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return rows_affected(result) == 1
