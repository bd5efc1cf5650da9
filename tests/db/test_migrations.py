"""Alembic migrations: an empty database upgrades to head, matches the ORM tables, and re-upgrading is a no-op."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect

from service.db.migrate import alembic_config, current_revision, upgrade_to_head
from service.db.session import Database
from service.db.tables import Base

ROOT = Path(__file__).resolve().parents[2]


def _head() -> str:
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head


def _drift(engine: Engine) -> list[Any]:
    """What autogenerate would put in a new migration: must be nothing."""
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True, "compare_server_default": True})
        return list(compare_metadata(context, Base.metadata))


def _schema(engine: Engine) -> dict[str, Any]:
    inspector = inspect(engine)
    return {
        table: (
            [(column["name"], str(column["type"]), column["nullable"]) for column in inspector.get_columns(table)],
            sorted(index["name"] or "" for index in inspector.get_indexes(table)),
        )
        for table in sorted(inspector.get_table_names())
    }


def test_an_empty_database_upgrades_to_head_without_drift(database_url: str) -> None:
    database = Database(database_url)
    try:
        assert current_revision(database.engine) is None
        upgrade_to_head(database.engine)
        assert current_revision(database.engine) == _head()
        assert set(Base.metadata.tables) <= set(inspect(database.engine).get_table_names())
        assert _drift(database.engine) == []
    finally:
        database.dispose()


def _db_upgrade(database_url: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    # The real CLI in a subprocess: get_settings() is cached per process, so it reads this env.
    env = {**os.environ, "CENTROID_DATABASE_URL": database_url, "CENTROID_DATA_DIR": str(data_dir)}
    return subprocess.run(
        [sys.executable, "-m", "service.cli", "db", "upgrade"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_centroid_db_upgrade_is_idempotent(database_url: str, tmp_path: Path) -> None:
    first = _db_upgrade(database_url, tmp_path / "data")
    assert first.returncode == 0, first.stderr
    assert f"database at revision {_head()}" in first.stdout

    database = Database(database_url)
    try:
        schema = _schema(database.engine)
        second = _db_upgrade(database_url, tmp_path / "data")
        assert second.returncode == 0, second.stderr
        assert f"database at revision {_head()}" in second.stdout
        assert _schema(database.engine) == schema
        assert _drift(database.engine) == []
    finally:
        database.dispose()
