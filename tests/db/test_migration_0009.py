"""Migration 0009: sweeps gain ``remote`` (a SageMaker sweep's state between polls); sweeps from
before it get an empty one and read as local sweeps always did."""

from __future__ import annotations

from alembic import command
from sqlalchemy import inspect, text
from sqlalchemy.orm import Session

from service.db.migrate import alembic_config, current_revision, upgrade_to_head
from service.db.session import Database
from service.db.tables import SweepTable
from service.sweeps.service import sweep_view


def test_0009_adds_remote_and_keeps_older_sweeps(database_url: str) -> None:
    database = Database(database_url)
    try:
        config = alembic_config(database_url)
        with database.engine.connect() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "0008")
            connection.commit()
            connection.execute(
                text(
                    "INSERT INTO datasets (id, name, key_column, columns, row_count, size_bytes, storage_key, "
                    "recipe, created_at) VALUES ('ds-old', 'old', NULL, '[]', 1, 1, 'datasets/ds-old.parquet', "
                    '\'{"source": "upload", "columns": []}\', \'2026-01-01 00:00:00\')'
                )
            )
            connection.execute(
                text(
                    "INSERT INTO sweeps (name, backend, status, train_dataset_id, feature_columns, k_values, "
                    "hyperparameters, sample_size, rows_processed, rows_total, created_at, stop_requested, attempts) "
                    "VALUES ('old-sweep', 'local', 'Pending', 'ds-old', '[\"x\"]', '[2, 3]', '{\"k\": 3}', 4000, 0, "
                    "10, '2026-01-01 00:00:00', false, 0)"
                )
            )
            connection.commit()
        assert "remote" not in {c["name"] for c in inspect(database.engine).get_columns("sweeps")}

        upgrade_to_head(database.engine)
        assert current_revision(database.engine) >= "0009"
        columns = {c["name"]: c for c in inspect(database.engine).get_columns("sweeps")}
        assert "remote" in columns and columns["remote"]["default"] is None  # the default only filled old rows
        with Session(database.engine) as session:
            old = session.get(SweepTable, "old-sweep")
            assert old is not None and old.remote == {}
            assert sweep_view(old).training_jobs is None

        with database.engine.connect() as connection:  # and back
            config.attributes["connection"] = connection
            command.downgrade(config, "0008")
            connection.commit()
        assert "remote" not in {c["name"] for c in inspect(database.engine).get_columns("sweeps")}
    finally:
        database.dispose()
