"""The worker's lease protocol: exclusive claims, takeover after expiry, stop, shutdown, presence."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from service.backends.base import BackendStatus, TrainingHooks, TrainingSpec, TrainingUpdate
from service.db.tables import ModelTable, TrainingJobTable
from service.db.types import utcnow
from service.jobs.repository import JobRepository
from service.main import create_app
from service.settings import Settings
from service.statuses import SecondaryStatus
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


def centroid(client: TestClient) -> Any:
    """The app's state (AppState)."""
    return client.app.state.centroid  # type: ignore[attr-defined]


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
    state = centroid(app_client)
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


@pytest.mark.slow
def test_an_expired_lease_is_taken_over_and_the_old_owner_can_no_longer_write(app_client: TestClient) -> None:
    dataset = upload_csv(app_client, "blobs", BLOBS_CSV, "id")
    start_job(app_client, "j", dataset["id"])
    state = centroid(app_client)
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
    worker = Worker(centroid(app_client))
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
    worker = Worker(centroid(app_client))
    thread = background(worker)
    wait_for(lambda: job(app_client, "slow"), lambda j: j["progress"]["points_processed"] > 0)
    worker.request_shutdown()
    thread.join(30)
    released = job(app_client, "slow")
    assert released["status"] == "Pending" and released["attempts"] == 0
    with centroid(app_client).database.session() as session:
        claimed = JobRepository(session).claim_next("next-worker", 60, ["local"])
    assert claimed is not None and claimed.name == "slow"


def test_a_job_that_keeps_killing_workers_fails_instead_of_looping(app_client: TestClient) -> None:
    dataset = upload_csv(app_client, "blobs", BLOBS_CSV, "id")
    start_job(app_client, "doomed", dataset["id"])
    with centroid(app_client).database.session() as session:
        session.execute(update(TrainingJobTable).values(status="InProgress", attempts=MAX_ATTEMPTS))
        session.commit()
    run_worker_until_idle(app_client.app)
    failed = job(app_client, "doomed")
    assert failed["status"] == "Failed" and "stopped unexpectedly 3 times" in failed["failure_reason"]


def test_worker_registers_itself_and_leaves_on_shutdown(app_client: TestClient) -> None:
    from service.db.tables import WorkerTable

    state = centroid(app_client)
    worker = Worker(state, worker_id="w-visible")
    thread = background(worker)
    with state.database.session() as session:
        wait_for(lambda: session.get(WorkerTable, "w-visible", populate_existing=True), lambda row: row is not None)
    worker.request_shutdown()
    thread.join(30)
    with state.database.session() as session:
        assert session.get(WorkerTable, "w-visible") is None


# --- dead workers' rows expire (issue 16, #13) ----------------------------------------------------


def add_worker_row(state: Any, worker_id: str, age_seconds: float) -> None:
    from service.db.tables import WorkerTable

    heartbeat = utcnow() - timedelta(seconds=age_seconds)
    with state.database.session() as session:
        session.add(WorkerTable(id=worker_id, hostname="gone", pid=1, started_at=heartbeat, heartbeat_at=heartbeat))
        session.commit()


def worker_ids(state: Any) -> set[str]:
    from service.db.tables import WorkerTable

    with state.database.session() as session:
        return set(session.scalars(select(WorkerTable.id)).all())


def test_a_live_worker_deletes_the_rows_of_dead_workers(app_client: TestClient) -> None:
    state = centroid(app_client)
    expiry = state.settings.resolved_worker_expiry_seconds
    assert expiry == pytest.approx(1.8)  # 3 x the 0.6 s lease
    add_worker_row(state, "dead", age_seconds=expiry + 1)
    add_worker_row(state, "slow-but-alive", age_seconds=expiry / 2)
    Worker(state, worker_id="live").run_once()
    assert worker_ids(state) == {"live", "slow-but-alive"}


def test_the_expiry_is_a_setting(settings: Settings) -> None:
    assert settings.resolved_worker_expiry_seconds == 180  # 3 x the default 60 s lease
    configured = settings.model_copy(update={"worker_expiry_seconds": 30.0, "lease_seconds": 600.0})
    assert configured.resolved_worker_expiry_seconds == 30
    with TestClient(create_app(configured)) as client:
        state = centroid(client)
        add_worker_row(state, "dead", age_seconds=31)
        add_worker_row(state, "alive", age_seconds=29)
        Worker(state, worker_id="live").run_once()
        assert worker_ids(state) == {"live", "alive"}


def test_metrics_count_only_live_workers_after_a_shutdown_that_timed_out(app_client: TestClient) -> None:
    """The reproduction: a worker whose shutdown timed out never unregistered; one worker is live."""
    from service.metrics import DatabaseCollector

    state = centroid(app_client)
    add_worker_row(state, "timed-out", age_seconds=3600)

    def scrape(collector: Any) -> dict[str, Any]:
        return {family.name: family for family in collector.collect()}

    # Excluded at scrape time, before any live worker has deleted the row.
    families = scrape(DatabaseCollector(state.database, worker_expiry_seconds=60))
    assert families["centroid_workers"].samples[0].value == 0
    assert families["centroid_worker_heartbeat_age_seconds"].samples == []
    assert "centroid_workers 0.0" in app_client.get("/metrics").text  # the app's default expiry: 180 s

    Worker(state, worker_id="live").run_once()
    assert worker_ids(state) == {"live"}
    families = scrape(DatabaseCollector(state.database, worker_expiry_seconds=60))
    assert families["centroid_workers"].samples[0].value == 1
    assert [s.labels["worker"] for s in families["centroid_worker_heartbeat_age_seconds"].samples] == ["live"]
    assert "centroid_workers 1.0" in app_client.get("/metrics").text


@pytest.mark.slow
def test_a_training_worker_keeps_its_row_fresh(app_client: TestClient) -> None:
    """A long training must not make its own worker look dead: the heartbeat thread keeps it fresh."""
    from service.db.tables import WorkerTable

    state = centroid(app_client)
    dataset = upload_csv(app_client, "slow", slow_csv(), "id")
    start_job(app_client, "slow", dataset["id"], hyperparameters=SLOW)
    worker = Worker(state, worker_id="busy")
    thread = background(worker)
    try:
        wait_for(lambda: job(app_client, "slow"), lambda j: j["progress"]["points_processed"] > 0)
        time.sleep(state.settings.resolved_worker_expiry_seconds + 0.5)
        Worker(state, worker_id="other").run_once()  # expires dead rows, if any
        with state.database.session() as session:
            row = session.get(WorkerTable, "busy")
        assert row is not None and row.current_job == "slow"
    finally:
        worker.request_shutdown()
        thread.join(30)


# --- remote steps run under the lease heartbeat (issue 13, part 7) ---------------------------------


class SlowRemote:
    """A remote backend whose first step (an upload, say) takes ``seconds``, asking the worker's
    hooks whether to go on, as the SageMaker upload does between pieces."""

    name = "sagemaker"
    trains_in_process = False

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = threading.Event()
        self.abandoned = False

    def status(self) -> BackendStatus:
        return BackendStatus(self.name, True, "a slow fake")

    def ensure_configured(self) -> None:
        """Always usable."""

    def advance_training(self, spec: TrainingSpec, hooks: TrainingHooks) -> TrainingUpdate:
        self.started.set()
        deadline = time.monotonic() + self.seconds
        while time.monotonic() < deadline:
            if hooks.should_stop():
                self.abandoned = True
                return TrainingUpdate.stopped("abandoned the upload")
            time.sleep(0.02)
        return TrainingUpdate.running(
            SecondaryStatus.STARTING,
            message="submitted",
            remote={"training_job_name": spec.job_name},
            poll_after_seconds=3600,
        )

    def stop_training(self, spec: TrainingSpec) -> None:
        """Nothing was submitted."""


@pytest.fixture
def slow_remote(app_client: TestClient, monkeypatch: pytest.MonkeyPatch) -> SlowRemote:
    """The `sagemaker` backend replaced by :class:`SlowRemote`, taking 4 leases (2.4 s) per step."""
    from service.backends.local import LocalBackend
    from service.backends.registry import BackendRegistry

    remote = SlowRemote(4 * centroid(app_client).settings.lease_seconds)
    monkeypatch.setattr(centroid(app_client), "backends", BackendRegistry([LocalBackend(), remote]))  # type: ignore[list-item]
    dataset = upload_csv(app_client, "blobs", BLOBS_CSV, "id")
    start_job(app_client, "remote", dataset["id"], backend="sagemaker")
    return remote


@pytest.mark.slow
def test_a_remote_step_longer_than_the_lease_keeps_it(app_client: TestClient, slow_remote: SlowRemote) -> None:
    state = centroid(app_client)
    first, second = Worker(state, worker_id="first"), Worker(state, worker_id="second")
    thread = threading.Thread(target=first.jobs.step)
    thread.start()
    slow_remote.started.wait(10)
    claims = []
    while thread.is_alive():
        with state.database.session() as session:
            claims.append(JobRepository(session).claim_next("second", 60, ["sagemaker"]))
        time.sleep(0.05)
    thread.join()
    assert len(claims) > 20 and not any(claims)
    assert not second.jobs.step()  # after the step: released with the next poll an hour away
    submitted = job(app_client, "remote")
    assert (submitted["status"], submitted["status_message"], submitted["attempts"]) == ("InProgress", "submitted", 1)
    assert submitted["progress"]["points_processed"] == 0  # the heartbeat wrote no progress of its own


def test_a_remote_step_that_lost_its_lease_writes_nothing(app_client: TestClient, slow_remote: SlowRemote) -> None:
    state = centroid(app_client)
    thread = threading.Thread(target=Worker(state, worker_id="first").jobs.step)
    thread.start()
    slow_remote.started.wait(10)
    with state.database.session() as session:  # as if the lease had run out and another worker claimed it
        session.execute(
            update(TrainingJobTable)
            .where(TrainingJobTable.name == "remote")
            .values(lease_owner="thief", lease_expires_at=utcnow() + timedelta(hours=1))
        )
        session.commit()
    thread.join(30)
    assert slow_remote.abandoned  # the step heard of the lost lease and gave up
    with state.database.session() as session:
        row = session.get(TrainingJobTable, "remote")
        assert row is not None
        assert (row.lease_owner, row.status, row.status_message) == ("thief", "InProgress", "waiting for a worker")


@pytest.mark.slow
@pytest.mark.parametrize("interruption", ["stop", "shutdown"])
def test_a_remote_step_is_abandoned_on_stop_or_shutdown(
    app_client: TestClient, slow_remote: SlowRemote, interruption: str
) -> None:
    worker = Worker(centroid(app_client), worker_id="first")
    thread = threading.Thread(target=worker.jobs.step)
    thread.start()
    slow_remote.started.wait(10)
    if interruption == "stop":
        app_client.post("/training-jobs/remote/stop")
    else:
        worker.request_shutdown()
    started = time.monotonic()
    thread.join(30)
    assert time.monotonic() - started < slow_remote.seconds / 2 and slow_remote.abandoned
    ended = job(app_client, "remote")
    if interruption == "stop":
        assert (ended["status"], ended["status_message"]) == ("Stopped", "abandoned the upload")
    else:  # given back, as a local training is on shutdown
        assert (ended["status"], ended["attempts"]) == ("Pending", 0)
        assert ended["status_message"].startswith("released by a worker that shut down")
