"""Migration 0007: datasets gain ``location`` (a dataset in S3); the rows before it stay stored datasets."""

from __future__ import annotations

from alembic import command
from sqlalchemy import inspect, text
from sqlalchemy.orm import Session

from service.db.migrate import alembic_config, current_revision, upgrade_to_head
from service.db.session import Database
from service.db.tables import DatasetTable


def test_0007_adds_location_and_keeps_older_datasets_stored(database_url: str) -> None:
    database = Database(database_url)
    try:
        config = alembic_config(database_url)
        with database.engine.connect() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "0006")
            connection.commit()
            connection.execute(
                text(
                    "INSERT INTO datasets (id, name, key_column, columns, row_count, size_bytes, storage_key, "
                    "recipe, created_at) VALUES ('ds-old', 'old', NULL, '[]', 1, 1, 'datasets/ds-old.parquet', "
                    '\'{"source": "upload", "columns": []}\', \'2026-01-01 00:00:00\')'
                )
            )
            connection.commit()
        assert "location" not in {c["name"] for c in inspect(database.engine).get_columns("datasets")}

        upgrade_to_head(database.engine)
        assert current_revision(database.engine) >= "0007"
        assert "location" in {c["name"] for c in inspect(database.engine).get_columns("datasets")}
        with Session(database.engine) as session:
            old = session.get(DatasetTable, "ds-old")
            assert old is not None and old.location is None and not old.in_s3
            assert old.storage_key == "datasets/ds-old.parquet"

        with database.engine.connect() as connection:  # and back
            config.attributes["connection"] = connection
            command.downgrade(config, "0006")
            connection.commit()
        assert "location" not in {c["name"] for c in inspect(database.engine).get_columns("datasets")}
        with database.engine.connect() as connection:
            assert (
                connection.execute(text("SELECT storage_key FROM datasets")).scalar_one() == "datasets/ds-old.parquet"
            )
    finally:
        database.dispose()
