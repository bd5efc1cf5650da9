"""GET /metrics: Prometheus text with request, invocation, job, endpoint and worker metrics."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.db.session import Database
from service.metrics import Metrics
from tests.helpers import BLOBS_CSV, deployed, trained_model, upload_csv


def scrape(client: TestClient) -> dict[str, list]:  # type: ignore[type-arg]
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {family.name: family.samples for family in text_string_to_metric_families(response.text)}


def value(samples: list, **labels: str) -> float:  # type: ignore[type-arg]
    matches = [s.value for s in samples if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(matches) == 1, (labels, samples)
    return float(matches[0])


def test_metrics_follow_the_workflow(client: TestClient) -> None:
    blobs = upload_csv(client, "blobs", BLOBS_CSV, "id")
    model = trained_model(client, blobs["id"])
    deployed(client, model["id"])
    client.post("/endpoints/ep/invocations", content="0,0\n10,0\n0,10\n", headers={"content-type": "text/csv"})
    client.post("/endpoints/ep/predictions", json={"rows": [{"x": 0, "y": 0}]})
    client.get("/datasets/ds-missing")
    families = scrape(client)

    requests = families["centroid_http_requests"]
    assert value(requests, method="GET", route="/datasets/{dataset_id}", status="404") == 1
    assert value(requests, method="POST", route="/endpoints/{name}/invocations", status="200") == 1
    latency = families["centroid_http_request_duration_seconds"]
    assert value([s for s in latency if s.name.endswith("_count")], method="POST", route="/datasets") == 1

    assert value(families["centroid_endpoint_invocations"], endpoint="ep", api="invocations") == 1
    assert value(families["centroid_endpoint_invocations"], endpoint="ep", api="predictions") == 1
    assert value(families["centroid_rows_predicted"], endpoint="ep") == 4

    assert value(families["centroid_training_jobs"], status="Completed") == 1
    assert value(families["centroid_training_jobs"], status="Pending") == 0
    assert value(families["centroid_endpoints"], status="InService") == 1
    durations = families["centroid_training_duration_seconds"]
    assert value([s for s in durations if s.name.endswith("_count")]) == 1
    assert value(families["centroid_workers"]) == 1
    assert value(families["centroid_worker_heartbeat_age_seconds"], worker="test-worker") >= 0
    assert value(families["centroid_database_up"]) == 1


def test_unknown_routes_are_one_label_not_one_per_path(client: TestClient) -> None:
    for i in range(3):
        client.get(f"/nothing-here-{i}")
    assert value(scrape(client)["centroid_http_requests"], method="GET", route="unmatched", status="404") == 3


def test_labelled_children_are_looked_up_once_per_label_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """observe_request and record_prediction run on every request: after the first call per label
    set they are a dict lookup and an increment, never another ``.labels()``."""
    metrics = Metrics(Database(f"sqlite:///{tmp_path / 'metrics.db'}"))
    calls: list[tuple[str, ...]] = []
    for counter in (metrics.requests, metrics.latency, metrics.invocations, metrics.rows_predicted):
        original = counter.labels

        def counting(*labels: str, _original: Any = original) -> Any:
            calls.append(labels)
            return _original(*labels)

        monkeypatch.setattr(counter, "labels", counting)
    for _ in range(50):
        metrics.observe_request("GET", "/healthz", 200, 0.001)
        metrics.observe_request("GET", "/healthz", 503, 0.002)
        metrics.record_prediction("ep", "invocations", 3)
    assert len(calls) == 2 + 2 + 2  # (counter, histogram) x 2 statuses, (invocations, rows) x 1 endpoint

    families = {f.name: f.samples for f in text_string_to_metric_families(metrics.render().decode())}
    assert value(families["centroid_http_requests"], route="/healthz", status="200") == 50
    assert value(families["centroid_http_requests"], route="/healthz", status="503") == 50
    latency_counts = [s for s in families["centroid_http_request_duration_seconds"] if s.name.endswith("_count")]
    assert value(latency_counts, route="/healthz") == 100
    assert value(families["centroid_endpoint_invocations"], endpoint="ep", api="invocations") == 50
    assert value(families["centroid_rows_predicted"], endpoint="ep") == 150


_COUNT_REQUESTS = """
import sys
from service.db.session import Database
from service.metrics import Metrics
metrics = Metrics(Database(sys.argv[1]))
assert metrics.multiprocess_dir, "PROMETHEUS_MULTIPROC_DIR is set: multiprocess mode"
for _ in range(int(sys.argv[2])):
    metrics.observe_request("GET", "/healthz", 200, 0.001)
metrics.record_prediction("ep", "predictions", 7)
sys.stdout.buffer.write(metrics.render())
"""


@pytest.mark.slow
def test_multiprocess_mode_adds_up_every_process(tmp_path: Path) -> None:
    """With PROMETHEUS_MULTIPROC_DIR (what `centroid serve --workers N` sets), a scrape answered by
    any process counts the requests of all of them, exited ones included; database gauges still come."""
    shared = tmp_path / "prometheus"
    shared.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(shared)}
    url = f"sqlite:///{tmp_path / 'metrics.db'}"
    outputs = [
        subprocess.run(
            [sys.executable, "-c", _COUNT_REQUESTS, url, str(count)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parents[2],
        ).stdout
        for count in (3, 4, 5)
    ]
    families = {f.name: f.samples for f in text_string_to_metric_families(outputs[-1])}
    assert value(families["centroid_http_requests"], route="/healthz", status="200") == 3 + 4 + 5
    latency_counts = [s for s in families["centroid_http_request_duration_seconds"] if s.name.endswith("_count")]
    assert value(latency_counts, route="/healthz") == 12
    assert value(families["centroid_endpoint_invocations"], endpoint="ep", api="predictions") == 3
    assert value(families["centroid_rows_predicted"], endpoint="ep") == 21
    assert "centroid_database_up" in families
    assert len({path.name for path in shared.glob("counter_*.db")}) == 3, "one file per process"


def test_one_process_keeps_a_registry_per_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    database = Database(f"sqlite:///{tmp_path / 'metrics.db'}")
    first, second = Metrics(database), Metrics(database)
    first.observe_request("GET", "/healthz", 200, 0.001)
    assert first.multiprocess_dir is None
    samples = {f.name: f.samples for f in text_string_to_metric_families(second.render().decode())}
    assert not [s for s in samples["centroid_http_requests"] if s.value], "apps do not share counters"
