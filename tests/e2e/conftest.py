"""A `centroid serve` process for the end-to-end tests, on the test's database."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import centroid_process, free_port, wait_for


@pytest.fixture
def api(tmp_path: Path, database_url: str) -> Iterator[httpx.Client]:
    port = free_port()
    env = {
        "CENTROID_DATA_DIR": str(tmp_path / "data"),
        "CENTROID_DATABASE_URL": database_url,
        "CENTROID_WORKER_POLL_INTERVAL": "0.2",
    }
    process = centroid_process(["serve", "--host", "127.0.0.1", "--port", str(port)], env, tmp_path / "serve.log")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    try:
        wait_for(lambda: _ready(client, process, tmp_path), lambda ok: ok, timeout=60, interval=0.2)
        yield client
    finally:
        client.close()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def _ready(client: httpx.Client, process, tmp_path: Path) -> bool:  # type: ignore[no-untyped-def]
    assert process.poll() is None, (tmp_path / "serve.log").read_text()
    try:
        return client.get("/readyz").status_code == 200
    except httpx.TransportError:
        return False
