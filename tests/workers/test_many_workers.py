"""Four real `centroid worker` processes share 100 queued jobs on PostgreSQL: each runs exactly once.

SQLite serialises writers, so only PostgreSQL (row locks with SKIP LOCKED) is a real test of many
claimers racing; the test is skipped without a server (CI sets CENTROID_TEST_DATABASE_URL).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from service.db.tables import ModelTable, TrainingJobTable
from service.main import create_app
from service.settings import Settings
from tests.conftest import PG_ADMIN_URL
from tests.helpers import BLOBS_CSV, centroid_process, start_job, upload_csv, wait_for

WORKERS = 4
JOBS = 100

pytestmark = [
    pytest.mark.skipif(
        not PG_ADMIN_URL,
        reason="needs PostgreSQL: set CENTROID_TEST_DATABASE_URL (CI does); SQLite cannot host many worker processes",
    ),
    # Only the PostgreSQL flavour of the `database_url` fixture.
    pytest.mark.parametrize("database_url", ["postgresql"], indirect=True),
]


def _claims(log_paths: list[Path]) -> list[dict[str, Any]]:
    """Every 'claimed training job' record in the workers' JSON logs."""
    claims = []
    for path in log_paths:
        for line in path.read_text().splitlines():
            if not line.startswith("{"):
                continue
            record = json.loads(line)
            if record.get("msg") == "claimed training job":
                claims.append(record)
    return claims


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def test_four_workers_run_a_hundred_jobs_exactly_once(settings: Settings, tmp_path: Path) -> None:
    env = {
        "CENTROID_DATA_DIR": str(settings.data_dir),
        "CENTROID_DATABASE_URL": settings.resolved_database_url,
        "CENTROID_WORKER_POLL_INTERVAL": "0.05",
        "CENTROID_LEASE_SECONDS": "30",  # long enough that no tiny job is ever taken over
        "CENTROID_LOG_FORMAT": "json",  # claim records carry the job name and the worker id
        "CENTROID_LOG_LEVEL": "INFO",
    }
    log_paths = [tmp_path / f"worker{i}.log" for i in range(WORKERS)]
    app = create_app(settings)
    with TestClient(app) as client:
        dataset = upload_csv(client, "blobs", BLOBS_CSV, "id")
        names = [f"job-{i:03d}" for i in range(JOBS)]
        for name in names:
            start_job(client, name, dataset["id"])
        database = app.state.centroid.database

        def statuses() -> Counter[str]:
            with database.session() as session:
                return Counter(session.scalars(select(TrainingJobTable.status)).all())

        assert statuses() == {"Pending": JOBS}

        processes = [centroid_process(["worker"], env, path) for path in log_paths]
        started = time.monotonic()
        try:
            wait_for(statuses, lambda counts: counts == {"Completed": JOBS}, timeout=120, interval=0.2)
            elapsed = time.monotonic() - started
        finally:
            _stop(processes)
        logs = "\n".join(path.read_text() for path in log_paths)
        assert all(process.returncode == 0 for process in processes), logs[-5000:]

        with database.session() as session:
            jobs = session.scalars(select(TrainingJobTable)).all()
            models = session.scalars(select(ModelTable)).all()

    # Exactly once: one model per job, every job on its first attempt, no lease left behind.
    assert sorted(job.name for job in jobs) == names
    assert all(job.attempts == 1 for job in jobs), {job.name: job.attempts for job in jobs if job.attempts != 1}
    assert all(job.lease_owner is None and job.lease_expires_at is None for job in jobs)
    assert len(models) == JOBS
    assert sorted(model.training_job_name for model in models) == names
    assert {job.name: job.model_id for job in jobs} == {model.training_job_name: model.id for model in models}
    assert "Traceback" not in logs and "database unavailable" not in logs, logs[-5000:]

    # The workers' own records agree: each job claimed once, and the work was shared.
    claims = _claims(log_paths)
    assert Counter(claim["job"] for claim in claims) == Counter(names)
    per_worker = Counter(claim["worker_id"] for claim in claims)
    pids = {str(process.pid) for process in processes}
    assert {worker_id.split("-")[-2] for worker_id in per_worker} <= pids
    assert len(per_worker) > 1, f"only one worker did any work: {per_worker}"
    print(f"{JOBS} jobs on {WORKERS} workers in {elapsed:.1f}s; claims per worker: {sorted(per_worker.values())}")
