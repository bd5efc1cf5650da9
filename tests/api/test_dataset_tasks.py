"""Background uploads and derives (`Prefer: respond-async`): dataset tasks run by workers under leases."""

from __future__ import annotations

import os
import threading
import time
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.datasets.progress import Progress
from service.datasets.service import TaskLeaseLost, build_dataset_service, sweep_orphan_files
from service.datasets.task_repository import DatasetTaskRepository, upload_key
from service.db.tables import DatasetTable, DatasetTaskTable
from service.db.types import utcnow
from tests.helpers import assert_error, derive, run_worker_until_idle, upload_csv
from workers.dataset_tasks import DatasetTaskDriver

ASYNC = {"Prefer": "respond-async"}
WORKSHOP_STEPS: list[dict[str, Any]] = [
    {"op": "scale", "columns": ["DensityPerMile"], "method": "minmax", "feature_range": [-1, 1]},
]


def _uploads(client: TestClient, sample_csv: dict[str, bytes]) -> tuple[dict[str, Any], dict[str, Any]]:
    crimes = upload_csv(client, "crimes", sample_csv["crimes"], "State")
    densities = upload_csv(client, "densities", sample_csv["densities"], "State")
    return crimes, densities


def _rows(client: TestClient, dataset_id: str) -> dict[str, Any]:
    response = client.get(f"/datasets/{dataset_id}/rows", params={"limit": 1000})
    assert response.status_code == 200, response.text
    return response.json()


def _task(client: TestClient, task_id: str) -> dict[str, Any]:
    response = client.get(f"/dataset-tasks/{task_id}")
    assert response.status_code == 200, response.text
    return response.json()


def _accepted(response: Any) -> dict[str, Any]:
    assert response.status_code == 202, response.text
    body = response.json()
    assert response.headers["location"] == f"/dataset-tasks/{body['id']}"
    assert response.headers["preference-applied"] == "respond-async"
    assert body["status"] == "Pending"
    assert body["dataset_id"] is None and body["error"] is None
    assert body["progress"]["stage"] == "queued" and body["progress"]["percent"] == 0
    return body


def _state(client: TestClient) -> Any:
    return client.app.state.centroid  # type: ignore[attr-defined]


def test_async_derive_makes_the_same_dataset_as_a_synchronous_one(
    client: TestClient, sample_csv: dict[str, bytes]
) -> None:
    crimes, densities = _uploads(client, sample_csv)
    steps = [
        {"op": "join", "dataset_id": densities["id"], "how": "inner"},
        {"op": "scale", "columns": ["Murder", "DensityPerMile"], "method": "standard"},
        {"op": "select", "columns": ["Murder", "Assault", "DensityPerMile"]},
    ]
    task = _accepted(
        client.post(f"/datasets/{crimes['id']}/derive", json={"name": "features", "steps": steps}, headers=ASYNC)
    )
    assert task["kind"] == "derive" and task["parent_id"] == crimes["id"] and task["name"] == "features"
    assert task["progress"]["stages"] == len(steps) + 2
    assert _task(client, task["id"])["status"] == "Pending"

    run_worker_until_idle(client.app)

    done = _task(client, task["id"])
    assert done["status"] == "Completed", done
    assert done["attempts"] == 1 and done["started_at"] and done["ended_at"]
    assert done["progress"]["stage"] == "done" and done["progress"]["percent"] == 100
    assert done["progress"]["rows_written"] == 50
    made = client.get(f"/datasets/{done['dataset_id']}").json()
    assert made["name"] == "features" and made["row_count"] == 50

    reference = derive(client, crimes["id"], "features", steps)
    assert _rows(client, done["dataset_id"])["rows"] == _rows(client, reference["id"])["rows"]
    ours = client.get(f"/datasets/{done['dataset_id']}").json()
    theirs = client.get(f"/datasets/{reference['id']}").json()
    assert ours["recipe"] == theirs["recipe"] and ours["columns"] == theirs["columns"]


def test_a_refused_step_fails_the_task_with_the_synchronous_error(
    client: TestClient, sample_csv: dict[str, bytes]
) -> None:
    crimes, _ = _uploads(client, sample_csv)
    request = {"name": "bad", "steps": [{"op": "scale", "columns": ["Nope"], "method": "minmax"}]}
    task = _accepted(client.post(f"/datasets/{crimes['id']}/derive", json=request, headers=ASYNC))
    run_worker_until_idle(client.app)
    failed = _task(client, task["id"])
    assert failed["status"] == "Failed" and failed["dataset_id"] is None
    assert failed["progress"]["stage"] == "failed" and failed["progress"]["percent"] < 100
    synchronous = assert_error(client.post(f"/datasets/{crimes['id']}/derive", json=request), 400, "invalid_input")
    assert failed["error"] == {
        "code": "invalid_input",
        "message": synchronous["message"],
        "details": synchronous["details"],
    }
    assert client.get("/datasets", params={"name": "bad"}).json()["total"] == 0


def test_what_needs_no_data_is_refused_at_once(client: TestClient, sample_csv: dict[str, bytes]) -> None:
    crimes, _ = _uploads(client, sample_csv)
    assert_error(
        client.post("/datasets/ds-missing/derive", json={"name": "x", "steps": WORKSHOP_STEPS}, headers=ASYNC),
        404,
        "not_found",
    )
    join = {"name": "x", "steps": [{"op": "join", "dataset_id": "ds-gone", "how": "inner"}]}
    assert_error(client.post(f"/datasets/{crimes['id']}/derive", json=join, headers=ASYNC), 404, "not_found")
    assert client.get("/dataset-tasks").json()["total"] == 0
    assert_error(client.get("/dataset-tasks/dt-nope"), 404, "not_found", "dataset task")


@pytest.mark.parametrize("prefer", ["respond-async", "wait=10, respond-async", "RESPOND-ASYNC; x=1"])
def test_prefer_header_forms(client: TestClient, sample_csv: dict[str, bytes], prefer: str) -> None:
    _, densities = _uploads(client, sample_csv)
    response = client.post(
        f"/datasets/{densities['id']}/derive",
        json={"name": "s", "steps": WORKSHOP_STEPS},
        headers={"Prefer": prefer},
    )
    _accepted(response)


def test_without_the_preference_a_derive_answers_when_done(client: TestClient, sample_csv: dict[str, bytes]) -> None:
    _, densities = _uploads(client, sample_csv)
    response = client.post(
        f"/datasets/{densities['id']}/derive",
        json={"name": "s", "steps": WORKSHOP_STEPS},
        headers={"Prefer": "return=minimal"},
    )
    assert response.status_code == 201 and response.json()["id"].startswith("ds-")


def test_async_uploads_multipart_and_raw(client: TestClient, sample_csv: dict[str, bytes]) -> None:
    store = _state(client).store
    multipart = _accepted(
        client.post(
            "/datasets",
            files={"file": ("crimes.csv", sample_csv["crimes"], "text/csv")},
            data={"name": "crimes", "key_column": "State"},
            headers=ASYNC,
        )
    )
    raw = _accepted(
        client.post(
            "/datasets",
            params={"name": "densities", "key_column": "State"},
            content=sample_csv["densities"],
            headers={**ASYNC, "Content-Type": "text/csv"},
        )
    )
    for task in (multipart, raw):
        assert task["kind"] == "upload" and task["parent_id"] is None
        assert store.path(upload_key(task["id"])).is_file()  # the CSV waits for its worker
    run_worker_until_idle(client.app)
    for task, name, data in ((multipart, "crimes", sample_csv["crimes"]), (raw, "densities", sample_csv["densities"])):
        done = _task(client, task["id"])
        assert done["status"] == "Completed", done
        assert done["progress"]["unit"] == "bytes" or done["progress"]["stage"] == "done"
        assert not store.path(upload_key(task["id"])).exists()
        reference = upload_csv(client, name, data, "State")
        assert _rows(client, done["dataset_id"])["rows"] == _rows(client, reference["id"])["rows"]
        made = client.get(f"/datasets/{done['dataset_id']}").json()
        assert made["columns"] == reference["columns"] and made["key_column"] == "State"
        assert made["recipe"]["filename"] == (f"{name}.csv" if task is multipart else None)


def test_async_upload_checks_what_it_can_before_answering(client: TestClient) -> None:
    response = client.post(
        "/datasets",
        files={"file": ("x.csv", b"a,b\n1,2\n", "text/csv")},
        data={"name": "x", "key_column": "nope"},
        headers=ASYNC,
    )
    assert_error(response, 400, "invalid_input", "nope")
    assert_error(
        client.post(
            "/datasets",
            files={"file": ("x.csv", b"a,b\n1,\x002\n", "text/csv")},
            data={"name": "x"},
            headers=ASYNC,
        ),
        400,
        "invalid_input",
    )
    assert client.get("/dataset-tasks").json()["total"] == 0
    uploads = _state(client).store.path("uploads")
    assert not uploads.exists() or not any(uploads.iterdir())


def test_async_upload_failing_while_parsing(client: TestClient) -> None:
    data = b"k,v\na,1\nb,2\na,3\n"
    task = _accepted(
        client.post(
            "/datasets",
            files={"file": ("d.csv", data, "text/csv")},
            data={"name": "dupes", "key_column": "k"},
            headers=ASYNC,
        )
    )
    run_worker_until_idle(client.app)
    failed = _task(client, task["id"])
    synchronous = assert_error(
        client.post("/datasets", files={"file": ("d.csv", data, "text/csv")}, data={"name": "d", "key_column": "k"}),
        400,
        "invalid_input",
    )
    assert failed["status"] == "Failed"
    assert failed["error"]["message"] == synchronous["message"]
    assert not _state(client).store.path(upload_key(task["id"])).exists()


def test_a_dataset_waits_for_the_tasks_reading_it(client: TestClient, sample_csv: dict[str, bytes]) -> None:
    crimes, densities = _uploads(client, sample_csv)
    request = {"name": "j", "steps": [{"op": "join", "dataset_id": densities["id"], "how": "inner"}]}
    task = _accepted(client.post(f"/datasets/{crimes['id']}/derive", json=request, headers=ASYNC))
    for dataset_id in (crimes["id"], densities["id"]):
        error = assert_error(client.delete(f"/datasets/{dataset_id}"), 409, "conflict", task["id"])
        assert error["details"]["used_by"] == [f"dataset task {task['id']!r}"]
    run_worker_until_idle(client.app)
    done = _task(client, task["id"])
    assert client.delete(f"/datasets/{densities['id']}").status_code == 204
    assert client.get(f"/dataset-tasks/{task['id']}").json()["status"] == "Completed"
    assert client.get(f"/datasets/{done['dataset_id']}").status_code == 200


def test_listing_with_status_filter(client: TestClient, sample_csv: dict[str, bytes]) -> None:
    _, densities = _uploads(client, sample_csv)
    first = _accepted(
        client.post(f"/datasets/{densities['id']}/derive", json={"name": "a", "steps": WORKSHOP_STEPS}, headers=ASYNC)
    )
    run_worker_until_idle(client.app)
    second = _accepted(
        client.post(f"/datasets/{densities['id']}/derive", json={"name": "b", "steps": WORKSHOP_STEPS}, headers=ASYNC)
    )
    listing = client.get("/dataset-tasks").json()
    assert [item["id"] for item in listing["items"]] == [second["id"], first["id"]] and listing["total"] == 2
    pending = client.get("/dataset-tasks", params={"status": "Pending"}).json()
    assert [item["id"] for item in pending["items"]] == [second["id"]]
    assert_error(client.get("/dataset-tasks", params={"status": "Done"}), 422, "validation_error")


def _expire(client: TestClient, task_id: str, attempts: int) -> None:
    """As if a worker had claimed the task and died mid-run."""
    with _state(client).database.session() as session:
        row = session.get(DatasetTaskTable, task_id)
        assert row is not None
        row.status, row.attempts = "InProgress", attempts
        row.lease_owner, row.lease_expires_at = "dead-worker", utcnow() - timedelta(seconds=1)
        row.started_at = utcnow() - timedelta(seconds=30)
        session.commit()


def test_a_task_whose_worker_died_runs_again(client: TestClient, sample_csv: dict[str, bytes]) -> None:
    _, densities = _uploads(client, sample_csv)
    task = _accepted(
        client.post(f"/datasets/{densities['id']}/derive", json={"name": "a", "steps": WORKSHOP_STEPS}, headers=ASYNC)
    )
    _expire(client, task["id"], attempts=1)
    run_worker_until_idle(client.app)
    done = _task(client, task["id"])
    assert done["status"] == "Completed" and done["attempts"] == 2
    assert client.get("/datasets", params={"name": "a"}).json()["total"] == 1


def test_a_task_that_keeps_killing_workers_fails(client: TestClient, sample_csv: dict[str, bytes]) -> None:
    _, densities = _uploads(client, sample_csv)
    task = _accepted(
        client.post(f"/datasets/{densities['id']}/derive", json={"name": "a", "steps": WORKSHOP_STEPS}, headers=ASYNC)
    )
    _expire(client, task["id"], attempts=3)
    run_worker_until_idle(client.app)
    failed = _task(client, task["id"])
    assert failed["status"] == "Failed" and "stopped unexpectedly 3 times" in failed["error"]["message"]
    assert client.get("/datasets", params={"name": "a"}).json()["total"] == 0


@pytest.mark.slow
def test_a_lost_lease_commits_nothing(client: TestClient, sample_csv: dict[str, bytes]) -> None:
    _, densities = _uploads(client, sample_csv)
    task = _accepted(
        client.post(f"/datasets/{densities['id']}/derive", json={"name": "a", "steps": WORKSHOP_STEPS}, headers=ASYNC)
    )
    state = _state(client)
    with state.database.session() as session:
        row = DatasetTaskRepository(session).get(task["id"])
        service = build_dataset_service(session, state.settings, state.store)
        with pytest.raises(TaskLeaseLost):
            service.run_task(row, Progress(), lambda: False)
        assert session.get(DatasetTable, row.dataset_id) is None
        assert not state.store.path(f"datasets/{row.dataset_id}.parquet").exists()
    run_worker_until_idle(client.app)  # the task itself is untouched and still runs
    assert _task(client, task["id"])["status"] == "Completed"


@pytest.mark.slow
def test_progress_is_written_while_the_task_runs(client: TestClient, sample_csv: dict[str, bytes]) -> None:
    _, densities = _uploads(client, sample_csv)
    task = _accepted(
        client.post(f"/datasets/{densities['id']}/derive", json={"name": "a", "steps": WORKSHOP_STEPS}, headers=ASYNC)
    )
    state = _state(client)
    with state.database.session() as session:
        assert DatasetTaskRepository(session).claim_next("beating-worker", 30.0) is not None
    driver = DatasetTaskDriver(state, "beating-worker", lambda: None)
    progress = Progress(3)
    progress.stage("step 1 of 1: scale")
    progress.stage("writing", total=200)
    progress.advance(50)
    progress.rows_written(50)
    finished = threading.Event()
    beat = threading.Thread(target=driver._heartbeat, args=(task["id"], progress, finished))
    beat.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            seen = _task(client, task["id"])["progress"]
            if seen["stage"] == "writing":
                break
            time.sleep(0.05)
    finally:
        finished.set()
        beat.join()
    assert seen == {
        "stage": "writing",
        "stage_index": 2,
        "stages": 3,
        "done": 50,
        "total": 200,
        "unit": "rows",
        "rows_written": 50,
        "percent": pytest.approx(41.7),
    }


def test_percent_never_goes_back() -> None:
    progress = Progress(4)
    seen = [progress.snapshot()["percent"]]
    progress.stage("step 1 of 2: join")
    live = [0.0]
    progress.live(lambda: live[0])
    for value in (0.2, 0.9, -1.0, 0.5):
        live[0] = value
        seen.append(progress.snapshot()["percent"])
    progress.stage("step 2 of 2: scale")
    seen.append(progress.snapshot()["percent"])
    progress.stage("writing", total=10)
    for done in (0, 5, 10):
        progress.advance(done)
        seen.append(progress.snapshot()["percent"])
    progress.stage("checking the result")
    seen.append(progress.snapshot()["percent"])
    assert seen == sorted(seen) and seen[0] == 0 and max(seen) < 100
    assert progress.snapshot()["stage_index"] == 4


def test_the_sweep_keeps_waiting_uploads_only(client: TestClient, sample_csv: dict[str, bytes]) -> None:
    task = _accepted(
        client.post(
            "/datasets",
            files={"file": ("c.csv", sample_csv["crimes"], "text/csv")},
            data={"name": "c"},
            headers=ASYNC,
        )
    )
    state = _state(client)
    waiting = state.store.path(upload_key(task["id"]))
    orphan = state.store.path(upload_key("dt-crashed"))
    orphan.write_bytes(b"a\n1\n")
    old = time.time() - 3600
    for path in (waiting, orphan):
        os.utime(path, (old, old))
    with state.database.session() as session:
        removed = sweep_orphan_files(session, state.store, grace_seconds=60)
    assert upload_key("dt-crashed") in removed and not orphan.exists()
    assert waiting.exists()
    run_worker_until_idle(client.app)
    assert _task(client, task["id"])["status"] == "Completed"
