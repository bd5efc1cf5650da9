"""Serving from the in-process catalog: bounded staleness across processes, no wait between steps.

* Two ``centroid serve`` processes on one PostgreSQL, both answering predictions under load while
  the endpoint is switched to another model and then deleted: after a switch or delete completes,
  no process answers from the old state later than the documented bound (1 s), and no request
  fails during the switch.
* Work is announced, not just polled for: with the poll interval set to 30 s, a job still starts
  and an endpoint still enters service at once — in-process for the embedded worker, through
  PostgreSQL ``LISTEN/NOTIFY`` for a separate worker process.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import PG_ADMIN_URL
from tests.helpers import centroid_process, free_port, wait_for
from tests.test_readme import server_ready

STALENESS_BOUND = 1.0
ROW = {"rows": [{"x": 1.0, "y": 2.0}]}
CSV = "id,x,y\n" + "".join(f"r{i},{(i % 7) * 1.5},{(i % 5) * 2.0}\n" for i in range(60))


def _setup_models(base: str, names: list[tuple[str, int]]) -> list[str]:
    dataset = httpx.post(
        f"{base}/datasets", files={"file": ("d.csv", CSV)}, data={"name": "d", "key_column": "id"}
    ).json()["id"]
    models = []
    for job, k in names:
        body = {"name": job, "train_dataset_id": dataset, "hyperparameters": {"k": k, "seed": 1}}
        assert httpx.post(f"{base}/training-jobs", json=body).status_code == 202
        done = wait_for(lambda job=job: httpx.get(f"{base}/training-jobs/{job}").json(),
                        lambda j: j["status"] == "Completed", timeout=60)
        models.append(done["model_id"])
    return models


def _in_service(base: str, name: str, model_id: str) -> bool:
    response = httpx.get(f"{base}/endpoints/{name}")
    return response.status_code == 200 and response.json()["status"] == "InService" and (
        response.json()["model_id"] == model_id
    )


@pytest.mark.skipif(not PG_ADMIN_URL, reason="needs PostgreSQL: set CENTROID_TEST_DATABASE_URL (CI does)")
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_two_api_processes_honour_a_switch_and_a_delete_within_the_bound(tmp_path: Path, database_url: str) -> None:
    env = {
        "CENTROID_DATABASE_URL": database_url,
        "CENTROID_ARTIFACT_DIR": str(tmp_path / "artifacts"),
        "CENTROID_WORKER_POLL_INTERVAL": "0.2",
        "CENTROID_LOG_LEVEL": "WARNING",
    }
    ports = [free_port(), free_port()]
    processes = [
        centroid_process(["serve", "--port", str(ports[0])], {**env, "CENTROID_DATA_DIR": str(tmp_path / "a")},
                         tmp_path / "a.log"),
        centroid_process(["serve", "--port", str(ports[1]), "--no-worker"],
                         {**env, "CENTROID_DATA_DIR": str(tmp_path / "b")}, tmp_path / "b.log"),
    ]
    bases = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        for base in bases:
            wait_for(lambda base=base: server_ready(base), lambda ok: ok, timeout=60, interval=0.2)
        first, second = _setup_models(bases[0], [("job-a", 2), ("job-b", 3)])
        assert httpx.post(f"{bases[0]}/endpoints", json={"name": "ep", "model_id": first}).status_code == 202
        wait_for(lambda: _in_service(bases[0], "ep", first), lambda ok: ok, timeout=30)
        for base in bases:  # both processes serve the first model
            wait_for(lambda base=base: httpx.post(f"{base}/endpoints/ep/predictions", json=ROW),
                     lambda r: r.status_code == 200, timeout=5)

        answers: list[tuple[float, int, int, str | None]] = []  # (sent at, process, status, model id)
        stop = threading.Event()

        def hammer(index: int) -> None:
            with httpx.Client(base_url=bases[index], timeout=10) as client:
                while not stop.is_set():
                    sent = time.monotonic()
                    response = client.post("/endpoints/ep/predictions", json=ROW)
                    model = response.json().get("model_id") if response.status_code == 200 else None
                    answers.append((sent, index, response.status_code, model))

        threads = [threading.Thread(target=hammer, args=(i,)) for i in (0, 1, 0, 1)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(0.5)
            assert httpx.put(f"{bases[1]}/endpoints/ep", json={"model_id": second}).status_code == 202
            wait_for(lambda: _in_service(bases[1], "ep", second), lambda ok: ok, timeout=30, interval=0.02)
            switched = time.monotonic()
            time.sleep(STALENESS_BOUND + 0.5)
            delete_sent = time.monotonic()
            assert httpx.delete(f"{bases[0]}/endpoints/ep").status_code == 202
            deleted = time.monotonic()
            time.sleep(STALENESS_BOUND + 0.5)
        finally:
            stop.set()
            for thread in threads:
                thread.join(10)

        during_switch = [a for a in answers if a[0] < delete_sent]
        assert during_switch and all(status == 200 for _, _, status, _ in during_switch), "no failed request"
        stale = [a for a in during_switch if a[0] > switched + STALENESS_BOUND and a[3] != second]
        assert not stale, f"answered from the old model after the bound: {stale[:3]}"
        for index in (0, 1):
            assert any(a[1] == index and a[3] == second for a in during_switch), "both processes switched"
        after_delete = [a for a in answers if a[0] > deleted + STALENESS_BOUND]
        assert after_delete and all(status in (404, 409) for _, _, status, _ in after_delete), after_delete[:3]
        assert {a[1] for a in after_delete} == {0, 1}
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(60)


def _workshop_seconds(base: str) -> tuple[float, float, float]:
    """(POST → job started, model → endpoint InService, whole POST job → 50 predictions)."""
    dataset = httpx.post(
        f"{base}/datasets", files={"file": ("d.csv", CSV)}, data={"name": "d", "key_column": "id"}
    ).json()["id"]
    started = time.monotonic()
    body = {"name": "quick", "train_dataset_id": dataset, "hyperparameters": {"k": 3, "seed": 1}}
    assert httpx.post(f"{base}/training-jobs", json=body).status_code == 202
    wait_for(lambda: httpx.get(f"{base}/training-jobs/quick").json(), lambda j: j["status"] != "Pending",
             timeout=20, interval=0.005)
    picked_up = time.monotonic() - started
    job = wait_for(lambda: httpx.get(f"{base}/training-jobs/quick").json(), lambda j: j["status"] == "Completed",
                   timeout=20, interval=0.005)
    loadable = time.monotonic()
    assert httpx.post(f"{base}/endpoints", json={"name": "quick", "model_id": job["model_id"]}).status_code == 202
    wait_for(lambda: _in_service(base, "quick", job["model_id"]), lambda ok: ok, timeout=20, interval=0.005)
    in_service = time.monotonic() - loadable
    rows = [{"id": f"r{i}", "x": float(i % 7), "y": float(i % 5)} for i in range(50)]
    response = httpx.post(f"{base}/endpoints/quick/predictions", json={"rows": rows})
    assert response.status_code == 200 and len(response.json()["predictions"]) == 50
    return picked_up, in_service, time.monotonic() - started


@pytest.mark.parametrize("topology", ["embedded", "separate worker on PostgreSQL"])
def test_work_is_announced_not_waited_for(tmp_path: Path, topology: str, request: Any) -> None:
    """With a 30 s poll interval, only the wake-ups can make these steps quick."""
    env: dict[str, Any] = {
        "CENTROID_DATA_DIR": str(tmp_path / "data"),
        "CENTROID_ARTIFACT_DIR": str(tmp_path / "artifacts"),
        "CENTROID_WORKER_POLL_INTERVAL": "30",
        "CENTROID_LOG_LEVEL": "WARNING",
    }
    args = ["serve", "--port", str(port := free_port())]
    processes = []
    if topology != "embedded":
        if not PG_ADMIN_URL:
            pytest.skip("needs PostgreSQL: set CENTROID_TEST_DATABASE_URL (CI does)")
        env["CENTROID_DATABASE_URL"] = request.getfixturevalue("database_url_postgres")
        args.append("--no-worker")
        processes.append(centroid_process(["worker"], env, tmp_path / "worker.log"))
    processes.append(centroid_process(args, env, tmp_path / "api.log"))
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: server_ready(base), lambda ok: ok, timeout=60, interval=0.2)
        time.sleep(1.0)  # the worker is idle, waiting out its 30 s poll
        picked_up, in_service, whole = _workshop_seconds(base)
        # Generous bounds for a loaded CI machine; the 30 s poll interval is what they rule out.
        # The tight figures (100 ms, workshop < 0.5 s) are measured by benchmarks/bench_serving.py.
        assert picked_up < 3.0, picked_up
        assert in_service < 3.0, in_service
        assert whole < 10.0, whole
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(60)
