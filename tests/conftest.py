"""Shared fixtures: an isolated Centroid (own database, own artifact directory) per test.

Tests that touch the database run on SQLite, and also on PostgreSQL when
``CENTROID_TEST_DATABASE_URL`` points at a server (each test then gets a fresh database).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from service.main import create_app
from service.settings import Settings
from tests.ci_rules import pytest_sessionfinish, pytest_terminal_summary  # noqa: F401  (CI: a skip fails)

SAMPLE_DATA = Path(__file__).resolve().parent.parent / "service" / "sample_data"
PG_ADMIN_URL = os.environ.get("CENTROID_TEST_DATABASE_URL")


# Whole directories and modules of long tests (real servers, subprocesses, fault injection, load,
# fuzzing, memory measurements): every test in them is `slow`. Single long tests elsewhere carry
# @pytest.mark.slow. `make test-fast` runs the rest (`-m "not slow"`); `make test` runs everything.
SLOW_PATHS = (
    "tests/reliability/",
    "tests/sagemaker/",
    "tests/e2e/",
    "tests/deploy/test_serve_workers.py",
    "tests/deploy/test_team_topology.py",
    "tests/workers/test_many_workers.py",
    "tests/engine/test_memory.py",
    "tests/test_readme.py",
    "tests/test_app_lifecycle.py",
    "tests/test_ci_rules.py",
    "tests/api/test_boto3_clients.py",
    "tests/ui/",
)
ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.relative_to(ROOT).as_posix().startswith(SLOW_PATHS):
            item.add_marker(pytest.mark.slow)


def _database_backends() -> list[str]:
    return ["sqlite", "postgresql"] if PG_ADMIN_URL else ["sqlite"]


@pytest.fixture(params=_database_backends())
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database for one test."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'centroid.db'}"
        return
    yield from _fresh_postgres_database()


@pytest.fixture
def database_url_postgres() -> Iterator[str]:
    """A fresh PostgreSQL database for tests that need one whatever ``database_url`` is."""
    if not PG_ADMIN_URL:
        pytest.skip("needs PostgreSQL: set CENTROID_TEST_DATABASE_URL (CI does)")
    yield from _fresh_postgres_database()


def _fresh_postgres_database() -> Iterator[str]:
    assert PG_ADMIN_URL is not None
    admin_url = make_url(PG_ADMIN_URL)
    name = f"centroid_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        log_format="text",
        log_level="WARNING",
        embedded_worker=False,
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def sample_csv() -> dict[str, bytes]:
    return {name: (SAMPLE_DATA / f"{name}.csv").read_bytes() for name in ("crimes", "densities")}
