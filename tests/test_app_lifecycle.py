"""Start-up: migrations, orphan sweep, health probes, logs; and the CLI."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, inspect

from service.cli import build_parser
from service.db.migrate import current_revision
from service.db.tables import Base
from service.logging_setup import JsonFormatter
from service.main import create_app
from service.settings import Settings
from tests.helpers import upload_csv


def test_start_up_migrates_an_empty_database_to_head(settings: Settings) -> None:
    with TestClient(create_app(settings)):
        engine = create_engine(settings.resolved_database_url)
        assert current_revision(engine) is not None
        assert set(Base.metadata.tables) <= set(inspect(engine).get_table_names())
        engine.dispose()


def test_start_up_sweeps_orphan_dataset_files(settings: Settings) -> None:
    settings = settings.model_copy(update={"orphan_grace_seconds": 0})
    with TestClient(create_app(settings)) as client:
        kept = upload_csv(client, "kept", b"k,v\na,1\n", "k")
    datasets = settings.resolved_artifact_dir / "datasets"
    (datasets / "ds-orphan.parquet").write_bytes(b"half written")
    (datasets / ".tmp-123-ds-x.parquet").write_bytes(b"partial")
    with TestClient(create_app(settings)) as client:
        assert client.get(f"/datasets/{kept['id']}/rows").status_code == 200
    assert sorted(p.name for p in datasets.iterdir()) == [f"{kept['id']}.parquet"]


def test_healthz_and_readyz(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "checks": {}}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "artifact_store": "ok"}


def test_readyz_reports_an_unwritable_artifact_directory(settings: Settings) -> None:
    app = create_app(settings)
    with TestClient(app) as client:
        app.state.centroid.store.root = Path("/proc/centroid-cannot-write-here")
        response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["artifact_store"] == "not writable"


def test_json_log_lines_carry_the_request_id() -> None:
    from service.request_context import reset_request_id, set_request_id

    token = set_request_id("req-1")
    try:
        record = logging.LogRecord("centroid.access", logging.INFO, __file__, 1, "GET %s", ("/x",), None)
        record.status = 200
        line = json.loads(JsonFormatter().format(record))
    finally:
        reset_request_id(token)
    assert line["msg"] == "GET /x" and line["request_id"] == "req-1" and line["status"] == 200


def test_cli_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "serve" in out and "db" in out
    args = build_parser().parse_args(["serve", "--port", "9001"])
    assert (args.host, args.port) == ("127.0.0.1", 9001)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_centroid_serve_runs_a_real_server(tmp_path: Path) -> None:
    """The README's run command, as a subprocess on 127.0.0.1."""
    port = _free_port()
    env = {**os.environ, "CENTROID_DATA_DIR": str(tmp_path / "data"), "CENTROID_LOG_LEVEL": "WARNING"}
    env.pop("CENTROID_DATABASE_URL", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1)
                break
            except httpx.TransportError:
                assert process.poll() is None, process.stdout.read().decode() if process.stdout else ""
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.2)
        assert response.status_code == 200
        assert (tmp_path / "data" / "centroid.db").is_file()
    finally:
        process.terminate()
        process.wait(timeout=30)
    # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status tells why.
    assert process.returncode in (0, -15)
    output = process.stdout.read().decode() if process.stdout else ""
    assert "Traceback" not in output, output


def test_db_upgrade_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.cli import main
    from service.settings import get_settings

    monkeypatch.setenv("CENTROID_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("CENTROID_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    try:
        assert main(["db", "upgrade"]) == 0
    finally:
        get_settings.cache_clear()
    assert "database at revision" in capsys.readouterr().out
    assert (tmp_path / "centroid.db").is_file()


def test_unexpected_errors_are_500_in_the_error_shape_with_the_request_id(settings: Settings) -> None:
    app = create_app(settings)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret internals")

    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/boom", headers={"X-Request-ID": "req-500"})
    assert response.status_code == 500
    assert response.json() == {
        "error": {
            "code": "internal_error",
            "message": "internal server error",
            "details": None,
            "request_id": "req-500",
        }
    }
    assert response.headers["x-request-id"] == "req-500"


def test_renamed_columns_must_be_valid_names(client: TestClient) -> None:
    dataset = upload_csv(client, "r", b"k,a,b\nx,1,2\n", "k")
    response = client.post(
        f"/datasets/{dataset['id']}/derive",
        json={"name": "r2", "steps": [{"op": "rename", "mapping": {"a": "bad\tname"}}]},
    )
    assert response.status_code == 400 and "control characters" in response.json()["error"]["message"]
