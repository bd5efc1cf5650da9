"""GET /metrics: Prometheus text with request, invocation, job, endpoint and worker metrics."""

from __future__ import annotations

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

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
