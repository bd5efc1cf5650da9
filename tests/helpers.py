"""Small HTTP helpers the API tests share."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from service.sample_data import WORKSHOP_FEATURES


def upload_csv(
    client: TestClient, name: str, data: bytes, key_column: str | None = None, expect: int = 201, **fields: str
) -> dict[str, Any]:
    form = {"name": name, **fields}
    if key_column is not None:
        form["key_column"] = key_column
    response = client.post("/datasets", files={"file": (f"{name}.csv", data, "text/csv")}, data=form)
    assert response.status_code == expect, response.text
    return response.json()  # type: ignore[no-any-return]


def derive(
    client: TestClient, dataset_id: str, name: str, steps: list[dict[str, Any]], expect: int = 201
) -> dict[str, Any]:
    response = client.post(f"/datasets/{dataset_id}/derive", json={"name": name, "steps": steps})
    assert response.status_code == expect, response.text
    return response.json()  # type: ignore[no-any-return]


def assert_error(response: Any, status: int, code: str, fragment: str = "") -> dict[str, Any]:
    """The one error shape, with the expected status, code and a message fragment."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "details", "request_id"}
    assert body["error"]["code"] == code, body
    assert fragment.lower() in body["error"]["message"].lower(), body
    return body["error"]  # type: ignore[no-any-return]


def workshop_dataset(client: TestClient, crimes: bytes, densities: bytes) -> dict[str, Any]:
    """The workshop's data prep: scale density to [-1, 1], inner-join on State, select 5 features."""
    crimes_ds = upload_csv(client, "crimes", crimes, "State")
    densities_ds = upload_csv(client, "densities", densities, "State")
    scaled = derive(
        client,
        densities_ds["id"],
        "densities-scaled",
        [{"op": "scale", "columns": ["DensityPerMile"], "method": "minmax", "feature_range": [-1, 1]}],
    )
    return derive(
        client,
        crimes_ds["id"],
        "workshop",
        [
            {"op": "join", "dataset_id": scaled["id"], "how": "inner"},
            {"op": "select", "columns": WORKSHOP_FEATURES},
        ],
    )


def run_worker_until_idle(app: Any, rounds: int = 20) -> None:
    """Drive an in-process worker until it finds nothing to do (deterministic, no threads)."""
    from workers.worker import Worker

    worker = Worker(app.state.centroid, worker_id="test-worker")
    for _ in range(rounds):
        if not worker.run_once():
            return
    raise AssertionError("worker still busy after many rounds")


def start_job(client: TestClient, name: str, dataset_id: str, expect: int = 202, **fields: Any) -> dict[str, Any]:
    body = {"name": name, "train_dataset_id": dataset_id, "hyperparameters": {"k": 3, "seed": 1}, **fields}
    response = client.post("/training-jobs", json=body)
    assert response.status_code == expect, response.text
    return response.json()  # type: ignore[no-any-return]


def trained_model(client: TestClient, dataset_id: str, name: str = "job", **fields: Any) -> dict[str, Any]:
    """Train to completion with an in-process worker; return the model."""
    start_job(client, name, dataset_id, **fields)
    run_worker_until_idle(client.app)
    job = client.get(f"/training-jobs/{name}").json()
    assert job["status"] == "Completed", job
    return client.get(f"/models/{job['model_id']}").json()  # type: ignore[no-any-return]


def deployed(client: TestClient, model_id: str, name: str = "ep") -> dict[str, Any]:
    response = client.post("/endpoints", json={"name": name, "model_id": model_id})
    assert response.status_code == 202, response.text
    run_worker_until_idle(client.app)
    endpoint = client.get(f"/endpoints/{name}").json()
    assert endpoint["status"] == "InService", endpoint
    return endpoint  # type: ignore[no-any-return]


BLOBS_CSV = (
    "id,x,y,label\n"
    + "".join(f"a{i},{0.1 * (i % 5)},{0.1 * (i % 3)},left\n" for i in range(20))
    + "".join(f"b{i},{10 + 0.1 * (i % 5)},{0.1 * (i % 3)},right\n" for i in range(20))
    + "".join(f"c{i},{0.1 * (i % 5)},{10 + 0.1 * (i % 3)},top\n" for i in range(20))
).encode()


class LiveServer:
    """The app served by a real uvicorn on 127.0.0.1 in a background thread."""

    def __init__(self, app: Any) -> None:
        import socket
        import threading

        import uvicorn

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None, access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        import time

        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def wait_for(fetch: Any, predicate: Any, timeout: float = 60.0, interval: float = 0.1) -> Any:
    """Poll ``fetch()`` until ``predicate(value)`` holds; return the value."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if predicate(value):
            return value
        assert time.monotonic() < deadline, f"timed out; last value: {value}"
        time.sleep(interval)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def centroid_process(args: list[str], env: dict[str, str], log_path: Any) -> Any:
    """Start ``centroid <args>`` as a subprocess (the real CLI), logging to ``log_path``."""
    import os
    import subprocess
    import sys

    full_env = {**os.environ, "CENTROID_LOG_FORMAT": "text", **env}
    log_file = open(log_path, "ab")  # noqa: SIM115 - closed with the process by the caller's cleanup
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", *args], env=full_env, stdout=log_file, stderr=log_file
    )
