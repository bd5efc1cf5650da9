"""Progress pushed as Server-Sent Events: GET /training-jobs/{name}/events and /sweeps/{name}/events,
over a real server on 127.0.0.1."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
from fastapi.testclient import TestClient
from sqlalchemy import delete

from service.db.tables import TrainingJobTable
from service.main import create_app
from service.settings import Settings
from tests.helpers import BLOBS_CSV, LiveServer, run_worker_until_idle, start_job, upload_csv


def events(response: httpx.Response) -> Iterator[tuple[str, Any]]:
    """(event, parsed data) per SSE message; comments are yielded as ("comment", text)."""
    event, data = None, []
    for line in response.iter_lines():
        if line.startswith(":"):
            yield "comment", line[1:].strip()
        elif line.startswith("event: "):
            event = line[len("event: ") :]
        elif line.startswith("data: "):
            data.append(line[len("data: ") :])
        elif line == "" and event is not None:
            yield event, json.loads("\n".join(data))
            event, data = None, []


def app_of(server: LiveServer) -> Any:
    return server.server.config.app


def live(settings: Settings, **overrides: Any) -> LiveServer:
    return LiveServer(create_app(settings.model_copy(update={"event_poll_seconds": 0.02, **overrides})))


def test_a_job_is_followed_from_pending_to_completed(settings: Settings) -> None:
    with live(settings) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        dataset = http.post("/datasets", files={"file": ("b.csv", BLOBS_CSV)}, data={"name": "b", "key_column": "id"})
        body = {"name": "followed", "train_dataset_id": dataset.json()["id"], "hyperparameters": {"k": 3, "seed": 1}}
        assert http.post("/training-jobs", json=body).status_code == 202
        received: list[tuple[str, Any]] = []
        with http.stream("GET", "/training-jobs/followed/events") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["cache-control"] == "no-store"
            # the first message is there before any worker ran: the job as it is now
            stream = events(response)
            received.append(next(stream))
            assert received[0][0] == "progress" and received[0][1]["status"] == "Pending"
            worker = threading.Thread(target=run_worker_until_idle, args=(app_of(server),))
            worker.start()
            received.extend(stream)
            worker.join(30)
    kinds = [kind for kind, _ in received]
    assert kinds[-1] == "end" and set(kinds[:-1]) <= {"progress", "comment"}
    final = received[-1][1]
    assert final["status"] == "Completed" and final["model_id"] and final["name"] == "followed"
    statuses = [data["status"] for kind, data in received if kind == "progress"]
    assert statuses == sorted(set(statuses), key=statuses.index)  # each change sent once, in order
    bodies = [json.dumps(data, sort_keys=True) for kind, data in received if kind == "progress"]
    assert len(bodies) == len(set(bodies))  # nothing sent while nothing changed


def test_an_ended_job_answers_its_end_only(client: TestClient) -> None:
    dataset = upload_csv(client, "blobs", BLOBS_CSV, "id")
    start_job(client, "done", dataset["id"])
    run_worker_until_idle(client.app)
    with client.stream("GET", "/training-jobs/done/events") as response:
        received = list(events(response))
    assert [kind for kind, _ in received] == ["end"]
    assert received[0][1] == client.get("/training-jobs/done").json()


def test_unknown_names_are_404_not_streams(client: TestClient) -> None:
    for path in ("/training-jobs/nope/events", "/sweeps/nope/events"):
        response = client.get(path)
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_streams_are_bounded_per_process_and_in_time(settings: Settings) -> None:
    server = live(settings, max_event_streams=1, event_stream_seconds=0.5)
    with server, httpx.Client(base_url=server.url, timeout=30) as http:
        dataset = http.post("/datasets", files={"file": ("b.csv", BLOBS_CSV)}, data={"name": "b", "key_column": "id"})
        body = {"name": "waiting", "train_dataset_id": dataset.json()["id"], "hyperparameters": {"k": 3}}
        assert http.post("/training-jobs", json=body).status_code == 202  # no worker: it stays Pending
        with http.stream("GET", "/training-jobs/waiting/events") as first:
            second = http.get("/training-jobs/waiting/events")
            assert second.status_code == 503 and second.headers["retry-after"]
            assert "CENTROID_MAX_EVENT_STREAMS" in second.json()["error"]["message"]
            received = list(events(first))
        assert [kind for kind, _ in received if kind != "comment"] == ["progress", "timeout"]
        assert received[-1][1]["status"] == "Pending"
        with http.stream("GET", "/training-jobs/waiting/events") as again:  # the slot was given back
            assert again.status_code == 200


def test_a_client_that_goes_away_gives_its_slot_back(settings: Settings) -> None:
    server = live(settings, max_event_streams=1)
    with server, httpx.Client(base_url=server.url, timeout=30) as http:
        dataset = http.post("/datasets", files={"file": ("b.csv", BLOBS_CSV)}, data={"name": "b", "key_column": "id"})
        body = {"name": "waiting", "train_dataset_id": dataset.json()["id"], "hyperparameters": {"k": 3}}
        assert http.post("/training-jobs", json=body).status_code == 202
        for _ in range(3):
            with http.stream("GET", "/training-jobs/waiting/events") as response:
                assert response.status_code == 200
                next(response.iter_lines())  # read a little, then hang up


def test_a_job_deleted_while_followed_ends_the_stream(settings: Settings) -> None:
    server = live(settings)
    with server, httpx.Client(base_url=server.url, timeout=30) as http:
        dataset = http.post("/datasets", files={"file": ("b.csv", BLOBS_CSV)}, data={"name": "b", "key_column": "id"})
        body = {"name": "vanishing", "train_dataset_id": dataset.json()["id"], "hyperparameters": {"k": 3}}
        assert http.post("/training-jobs", json=body).status_code == 202
        with http.stream("GET", "/training-jobs/vanishing/events") as response:
            stream = events(response)
            assert next(stream)[0] == "progress"
            database = app_of(server).state.centroid.database
            with database.session() as session:
                session.execute(delete(TrainingJobTable).where(TrainingJobTable.name == "vanishing"))
                session.commit()
            rest = [item for item in stream if item[0] != "comment"]
    assert rest[0][0] == "gone" and "vanishing" in rest[0][1]["message"]


def test_a_sweep_is_followed_to_its_results(settings: Settings) -> None:
    with live(settings) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        dataset = http.post("/datasets", files={"file": ("b.csv", BLOBS_CSV)}, data={"name": "b", "key_column": "id"})
        body = {"name": "which", "train_dataset_id": dataset.json()["id"], "k": [2, 3, 4]}
        assert http.post("/sweeps", json=body).status_code == 202
        with http.stream("GET", "/sweeps/which/events") as response:
            stream = events(response)
            assert next(stream)[1]["status"] == "Pending"
            worker = threading.Thread(target=run_worker_until_idle, args=(app_of(server),))
            worker.start()
            received = [item for item in stream if item[0] != "comment"]
            worker.join(30)
    assert received[-1][0] == "end"
    final = received[-1][1]
    assert final["status"] == "Completed" and final["recommendation"]["k"] == 3
    assert [r["k"] for r in final["results"]] == [2, 3, 4]


def test_a_background_upload_is_followed_to_its_dataset(settings: Settings) -> None:
    with live(settings) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        accepted = http.post(
            "/datasets",
            files={"file": ("b.csv", BLOBS_CSV)},
            data={"name": "b", "key_column": "id"},
            headers={"Prefer": "respond-async"},
        )
        assert accepted.status_code == 202, accepted.text
        task_id = accepted.json()["id"]
        with http.stream("GET", f"/dataset-tasks/{task_id}/events") as response:
            stream = events(response)
            assert next(stream)[1]["status"] == "Pending"
            worker = threading.Thread(target=run_worker_until_idle, args=(app_of(server),))
            worker.start()
            received = [item for item in stream if item[0] != "comment"]
            worker.join(30)
        assert received[-1][0] == "end"
        final = received[-1][1]
        assert final["status"] == "Completed" and final["dataset_id"]
        assert http.get(f"/datasets/{final['dataset_id']}").json()["row_count"] == 60
        assert http.get("/dataset-tasks/nope/events").status_code == 404
