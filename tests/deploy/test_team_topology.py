"""The README's Deploy section, tried as a new user would — minus Docker, which this machine lacks.

The compose topology as processes: an API (`serve --no-worker`) and two `centroid worker`s
sharing PostgreSQL and one artifact directory, with an admin key made by `centroid keys create`
and configured as CENTROID_API_KEYS. Then the README's two walk-throughs run as written, with the
`curl` function the Deploy section gives (it adds the bearer header).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import PG_ADMIN_URL
from tests.helpers import centroid_process, free_port, wait_for
from tests.test_readme import run_walkthrough, server_ready

pytestmark = [
    pytest.mark.skipif(not PG_ADMIN_URL, reason="needs PostgreSQL: set CENTROID_TEST_DATABASE_URL (CI does)"),
    pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed"),
    pytest.mark.parametrize("database_url", ["postgresql"], indirect=True),
]


def create_key() -> tuple[str, dict[str, str]]:
    printed = subprocess.run(
        [sys.executable, "-m", "service.cli", "keys", "create", "--name", "admin", "--scope", "admin"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    return printed[0].rsplit(" ", 1)[1], json.loads(printed[-1])


def test_deploy_section_against_api_and_two_workers(tmp_path: Path, database_url: str) -> None:
    key, entry = create_key()
    port = free_port()
    env = {
        "CENTROID_DATABASE_URL": database_url,
        "CENTROID_DATA_DIR": str(tmp_path / "data"),
        "CENTROID_ARTIFACT_DIR": str(tmp_path / "artifacts"),
        "CENTROID_API_KEYS": json.dumps([entry]),
        "CENTROID_WORKER_POLL_INTERVAL": "0.2",
    }
    api = centroid_process(["serve", "--port", str(port), "--no-worker"], env, tmp_path / "api.log")
    workers = [centroid_process(["worker"], env, tmp_path / f"worker{i}.log") for i in range(2)]
    processes = [api, *workers]
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: server_ready(base), lambda ok: ok, timeout=60, interval=0.2)
        assert httpx.get(f"{base}/datasets").status_code == 401
        # The Deploy section's curl function: every request carries the key.
        result = run_walkthrough(base, tmp_path, curl_headers=f'-H "Authorization: Bearer {key}"')
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert '"cluster_counts"' in result.stdout
        worker_logs = [(tmp_path / f"worker{i}.log").read_text() for i in range(2)]
        assert any("claimed training job" in log for log in worker_logs), "a worker process trained the model"
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(60)
    assert all(process.returncode in (0, -signal.SIGTERM) for process in processes)
