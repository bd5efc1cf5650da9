"""Sweeps through real processes: the whole flow against `centroid serve` (its embedded worker), and
a worker SIGKILLed mid-sweep that loses nothing."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
from fastapi.testclient import TestClient

from service.main import create_app
from service.settings import Settings
from tests.helpers import BLOBS_CSV, centroid_process, upload_csv, wait_for
from tests.workers.test_worker import slow_csv

SLOW = {"mini_batch_size": 20, "epochs": 1500, "seed": 2}  # seconds of streaming, stoppable at any point


def _upload(api: httpx.Client, name: str, data: bytes) -> str:
    response = api.post(
        "/datasets", files={"file": (f"{name}.csv", data, "text/csv")}, data={"name": name, "key_column": "id"}
    )
    assert response.status_code == 201, response.text
    return response.json()["id"]  # type: ignore[no-any-return]


def test_a_sweep_through_centroid_serve(api: httpx.Client) -> None:
    blobs = _upload(api, "blobs", BLOBS_CSV)
    # A long sweep shows progress and stops on request.
    slow = _upload(api, "slow", slow_csv(400))
    body = {"name": "long", "train_dataset_id": slow, "k": {"min": 2, "max": 5}, "hyperparameters": SLOW}
    assert api.post("/sweeps", json=body).status_code == 202
    running = wait_for(
        lambda: api.get("/sweeps/long").json(),
        lambda s: s["status"] == "InProgress" and s["rows_processed"] > 0,
        timeout=60,
        interval=0.05,
    )
    assert running["rows_processed"] < running["rows_total"]
    assert api.post("/sweeps/long/stop").json()["status"] in ("Stopping", "Stopped")
    stopped = wait_for(lambda: api.get("/sweeps/long").json(), lambda s: s["status"] == "Stopped", timeout=30)
    assert stopped["results"] is None and "stopped after" in stopped["status_message"]

    # The short one completes; its recommended k is registered, deployed and predicts.
    body = {"name": "which-k", "train_dataset_id": blobs, "k": [2, 3, 4, 5], "hyperparameters": {"seed": 1}}
    assert api.post("/sweeps", json=body).status_code == 202
    done = wait_for(lambda: api.get("/sweeps/which-k").json(), lambda s: s["status"] == "Completed", timeout=60)
    assert done["recommendation"]["k"] == 3
    model = api.post("/sweeps/which-k/models", json={}).json()
    assert model["k"] == 3 and model["source"] == "sweep"
    assert api.post("/endpoints", json={"name": "ep", "model_id": model["id"]}).status_code == 202
    wait_for(lambda: api.get("/endpoints/ep").json(), lambda e: e["status"] == "InService", timeout=30)
    answer = api.post("/endpoints/ep/invocations", json={"instances": [[10.1, 0.1], [0.1, 0.1], [0.1, 10.1]]})
    assert answer.status_code == 200, answer.text
    assert len({p["closest_cluster"] for p in answer.json()["predictions"]}) == 3


def test_sigkill_mid_sweep_then_restart_completes_exactly_once(settings: Settings, tmp_path: Path) -> None:
    env = {
        "CENTROID_DATA_DIR": str(settings.data_dir),
        "CENTROID_DATABASE_URL": settings.resolved_database_url,
        "CENTROID_LEASE_SECONDS": "1.5",
        "CENTROID_WORKER_POLL_INTERVAL": "0.1",
    }
    with TestClient(create_app(settings)) as client:
        dataset = upload_csv(client, "slow", slow_csv(400), "id")
        body = {"name": "crash", "train_dataset_id": dataset["id"], "k": {"min": 2, "max": 4}, "hyperparameters": SLOW}
        assert client.post("/sweeps", json=body).status_code == 202

        first = centroid_process(["worker"], env, tmp_path / "worker1.log")
        try:
            running = wait_for(
                lambda: client.get("/sweeps/crash").json(),
                lambda s: s["status"] == "InProgress" and s["rows_processed"] > 0,
                timeout=60,
                interval=0.05,
            )
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait(30)
        assert running["results"] is None
        orphaned = client.get("/sweeps/crash").json()
        assert orphaned["status"] == "InProgress" and orphaned["results"] is None

        second = centroid_process(["worker"], env, tmp_path / "worker2.log")
        try:
            done = wait_for(
                lambda: client.get("/sweeps/crash").json(), lambda s: s["status"] == "Completed", timeout=120
            )
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(30)
        assert second.returncode == 0, (tmp_path / "worker2.log").read_text()
        assert done["rows_processed"] == done["rows_total"]
        assert [r["k"] for r in done["results"]] == [2, 3, 4]
        with client.app.state.centroid.database.session() as session:
            from service.db.tables import SweepTable

            row = session.get(SweepTable, "crash")
            assert row is not None and row.attempts == 2
