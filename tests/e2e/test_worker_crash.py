"""A worker killed with SIGKILL mid-training loses nothing: the job completes exactly once."""

from __future__ import annotations

import signal
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import func, select

from service.db.tables import ModelTable
from service.main import create_app
from service.settings import Settings
from tests.helpers import centroid_process, start_job, upload_csv, wait_for
from tests.workers.test_worker import slow_csv

TRAINING = {"k": 4, "mini_batch_size": 20, "epochs": 1500, "seed": 2}  # about five seconds of training


def test_sigkill_mid_training_then_restart_completes_exactly_once(settings: Settings, tmp_path: Path) -> None:
    env = {
        "CENTROID_DATA_DIR": str(settings.data_dir),
        "CENTROID_DATABASE_URL": settings.resolved_database_url,
        "CENTROID_LEASE_SECONDS": "1.5",
        "CENTROID_WORKER_POLL_INTERVAL": "0.1",
    }
    with TestClient(create_app(settings)) as client:
        dataset = upload_csv(client, "slow", slow_csv(400), "id")
        start_job(client, "crash", dataset["id"], hyperparameters=TRAINING)

        first = centroid_process(["worker"], env, tmp_path / "worker1.log")
        try:
            running = wait_for(
                lambda: client.get("/training-jobs/crash").json(),
                lambda j: j["status"] == "InProgress" and j["progress"]["points_processed"] > 0,
                timeout=60,
                interval=0.05,
            )
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait(30)
        assert running["attempts"] == 1
        orphaned = client.get("/training-jobs/crash").json()
        assert orphaned["status"] == "InProgress" and orphaned["model_id"] is None

        second = centroid_process(["worker"], env, tmp_path / "worker2.log")
        try:
            done = wait_for(
                lambda: client.get("/training-jobs/crash").json(), lambda j: j["status"] == "Completed", timeout=120
            )
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(30)
        assert second.returncode == 0, (tmp_path / "worker2.log").read_text()
        assert done["attempts"] == 2
        assert done["progress"]["points_processed"] == done["progress"]["points_total"]
        with client.app.state.centroid.database.session() as session:
            models = session.scalar(
                select(func.count()).select_from(ModelTable).where(ModelTable.training_job_name == "crash")
            )
        assert models == 1
        assert client.get("/models").json()["total"] == 1
