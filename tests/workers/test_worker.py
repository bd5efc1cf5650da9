"""The worker's lease protocol: exclusive claims, takeover after expiry, stop, shutdown."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from service.db.tables import ModelTable, TrainingJobTable
from service.db.types import utcnow
from service.jobs.repository import JobRepository
from service.main import create_app
from service.settings import Settings
from tests.helpers import BLOBS_CSV, run_worker_until_idle, start_job, upload_csv, wait_for
from workers.worker import MAX_ATTEMPTS, Worker

SLOW = {"k": 4, "mini_batch_size": 20, "epochs": 2000, "seed": 1}  # minutes of training if left alone


def slow_csv(rows: int = 400) -> bytes:
    values = np.random.default_rng(0).normal(size=(rows, 3))
    return ("id,a,b,c\n" + "".join(f"r{i},{a},{b},{c}\n" for i, (a, b, c) in enumerate(values))).encode()


@pytest.fixture
def fast_lease(settings: Settings) -> Settings:
    return settings.model_copy(update={"lease_seconds": 0.6, "worker_poll_interval": 0.05})


@pytest.fixture
def app_client(fast_lease: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(fast_lease)) as client:
        yield client


def job(client: TestClient, name: str) -> dict:  # type: ignore[type-arg]
    return client.get(f"/training-jobs/{name}").json()  # type: ignore[no-any-return]


def background(worker: Worker) -> threading.Thread:
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    return thread


def test_each_job_is_claimed_by_exactly_one_worker(app_client: TestClient) -> None:
    dataset = upload_csv(app_client, "blobs", BLOBS_CSV, "id")
    for i in range(12):
        start_job(app_client, f"j{i}", dataset["id"])
    state = app_client.app.state.centroid
    claims: dict[str, list[str]] = {}
    lock = threading.Lock()

    def claimer(worker_id: str) -> None:
        while True:
            with state.database.session() as session:
                claimed = JobRepository(session).claim_next(worker_id, 3600, ["local"])
            if claimed is None:
                return
            with lock:
                claims.setdefault(claimed.name, []).append(worker_id)

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claims) == sorted(f"j{i}" for i in range(12))
    assert all(len(owners) == 1 for owners in claims.values())


def test_an_expired_lease_is_taken_over_and_the_old_owner_can_no_longer_write(app_client: TestClient) -> None:
    dataset = upload_csv(app_client, "blobs", BLOBS_CSV, "id")
    start_job(app_client, "j", dataset["id"])
    state = app_client.app.state.centroid
    with state.database.session() as session:
        stale = JobRepository(session).claim_next("dead-worker", 3600, ["local"])
        assert stale is not None
        assert JobRepository(session).claim_next("other", 3600, ["local"]) is None
        session.execute(update(TrainingJobTable).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
        session.commit()
    run_worker_until_idle(app_client.app)
    assert job(app_client, "j")["status"] == "Completed"
    with state.database.session() as session:
        assert not JobRepository(session).guarded_update("j", "dead-worker", {"status": "Failed"})
        models = session.scalars(select(ModelTable).where(ModelTable.training_job_name == "j")).all()
    assert len(models) == 1


def test_stop_is_honoured_between_mini_batches(app_client: TestClient) -> None:
    dataset = upload_csv(app_client, "slow", slow_csv(), "id")
    start_job(app_client, "slow", dataset["id"], hyperparameters=SLOW)
    worker = Worker(app_client.app.state.centroid)
    thread = background(worker)
    try:
        wait_for(lambda: job(app_client, "slow"), lambda j: j["progress"]["points_processed"] > 0)
        stopping = app_client.post("/training-jobs/slow/stop").json()
        assert stopping["status"] == "Stopping"
        stopped = wait_for(lambda: job(app_client, "slow"), lambda j: j["status"] == "Stopped", timeout=30)
    finally:
        worker.request_shutdown()
        thread.join(30)
    assert stopped["model_id"] is None and stopped["ended_at"]
    assert 0 < stopped["progress"]["points_processed"] < stopped["progress"]["points_total"]
    assert [t["status"] for t in stopped["status_transitions"]][-1] == "Stopped"


def test_shutdown_releases_the_running_job_for_another_worker(app_client: TestClient) -> None:
    dataset = upload_csv(app_client, "slow", slow_csv(), "id")
    start_job(app_client, "slow", dataset["id"], hyperparameters=SLOW)
    worker = Worker(app_client.app.state.centroid)
    thread = background(worker)
    wait_for(lambda: job(app_client, "slow"), lambda j: j["progress"]["points_processed"] > 0)
    worker.request_shutdown()
    thread.join(30)
    released = job(app_client, "slow")
    assert released["status"] == "Pending" and released["attempts"] == 0
    with app_client.app.state.centroid.database.session() as session:
        claimed = JobRepository(session).claim_next("next-worker", 60, ["local"])
    assert claimed is not None and claimed.name == "slow"


def test_a_job_that_keeps_killing_workers_fails_instead_of_looping(app_client: TestClient) -> None:
    dataset = upload_csv(app_client, "blobs", BLOBS_CSV, "id")
    start_job(app_client, "doomed", dataset["id"])
    with app_client.app.state.centroid.database.session() as session:
        session.execute(update(TrainingJobTable).values(status="InProgress", attempts=MAX_ATTEMPTS))
        session.commit()
    run_worker_until_idle(app_client.app)
    failed = job(app_client, "doomed")
    assert failed["status"] == "Failed" and "stopped unexpectedly 3 times" in failed["failure_reason"]


def test_worker_registers_itself_and_leaves_on_shutdown(app_client: TestClient) -> None:
    from service.db.tables import WorkerTable

    state = app_client.app.state.centroid
    worker = Worker(state, worker_id="w-visible")
    thread = background(worker)
    with state.database.session() as session:
        wait_for(lambda: session.get(WorkerTable, "w-visible", populate_existing=True), lambda row: row is not None)
    worker.request_shutdown()
    thread.join(30)
    with state.database.session() as session:
        assert session.get(WorkerTable, "w-visible") is None
