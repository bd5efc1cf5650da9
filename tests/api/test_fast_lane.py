"""The fast lane answers the hot paths exactly as the FastAPI routes do, and hands on the rest."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.fast_lane import FastLane
from service.main import create_app
from service.settings import Settings
from tests.helpers import BLOBS_CSV, deployed, trained_model, upload_csv

CSV = {"content-type": "text/csv"}


@pytest.fixture
def served(settings: Settings) -> Iterator[tuple[TestClient, dict[str, Any]]]:
    with TestClient(create_app(settings)) as client:
        blobs = upload_csv(client, "blobs", BLOBS_CSV, "id")
        model = trained_model(client, blobs["id"])
        deployed(client, model["id"])
        yield client, {**model, "dataset_id": blobs["id"]}


def _without_lane(monkeypatch: pytest.MonkeyPatch) -> None:
    async def straight_through(self: FastLane, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)

    monkeypatch.setattr(FastLane, "__call__", straight_through)


REQUESTS: list[tuple[str, str, dict[str, str], Any]] = [
    ("POST", "/endpoints/ep/invocations", CSV, "0.1,0.2\n10,0.1\n"),
    ("POST", "/endpoints/ep/invocations", {**CSV, "accept": "text/csv"}, "0.1,0.2"),
    ("POST", "/endpoints/ep/invocations", {**CSV, "accept": "application/jsonlines"}, "0.1,0.2"),
    ("POST", "/endpoints/ep/invocations", {"content-type": "application/json"}, '{"instances": [[0, 10.5]]}'),
    ("POST", "/endpoints/ep/invocations", CSV, "0.1"),  # 400: one feature short
    ("POST", "/endpoints/ep/invocations", {"content-type": "text/plain"}, "0.1,0.2"),  # 415
    ("POST", "/endpoints/ep/invocations", {**CSV, "accept": "image/png"}, "0.1,0.2"),  # 406
    ("POST", "/endpoints/ep/predictions", {}, {"rows": [{"id": "p", "x": 0.1, "y": 10}], "sort": "cluster"}),
    ("POST", "/endpoints/ep/predictions", {}, {"rows": [{"x": 1, "zzz": 2}]}),  # 400: unknown key
    ("POST", "/endpoints/ep/predictions", {}, {"rows": [{"x": 1}], "include_distances": True}),  # 400: missing y
    ("POST", "/endpoints/ep/predictions", {"content-type": "text/csv"}, "x"),  # 415
    ("POST", "/endpoints/ep/predictions", {}, {"rows": "nope"}),  # 422
    ("GET", "/healthz", {}, None),
]


@pytest.mark.slow
@pytest.mark.parametrize(("method", "path", "headers", "body"), REQUESTS)
def test_the_lane_answers_like_the_routes(
    served: tuple[TestClient, dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    path: str,
    headers: dict[str, str],
    body: Any,
) -> None:
    client, _ = served

    def call() -> Any:
        kwargs: dict[str, Any] = {"headers": {**headers, "x-request-id": "same-id"}}
        if isinstance(body, dict):
            kwargs["json"] = body
        elif body is not None:
            kwargs["content"] = body
        return client.request(method, path, **kwargs)

    fast = call()
    _without_lane(monkeypatch)
    routed = call()
    assert fast.status_code == routed.status_code
    assert fast.content == routed.content
    assert fast.headers.get("content-type") == routed.headers.get("content-type")


def test_assignments_hits_come_from_the_lane_and_misses_from_the_route(
    served: tuple[TestClient, dict[str, Any]],
) -> None:
    client, model = served
    first = client.get(f"/models/{model['id']}/assignments")  # a miss: the route computes it
    second = client.get(f"/models/{model['id']}/assignments")  # a hit: the lane answers
    assert first.status_code == second.status_code == 200 and first.content == second.content
    assert first.headers["etag"] == second.headers["etag"]
    revalidated = client.get(f"/models/{model['id']}/assignments", headers={"if-none-match": first.headers["etag"]})
    assert revalidated.status_code == 304 and revalidated.content == b""
    invalid = client.get(f"/models/{model['id']}/assignments", params={"cluster": "-1"})
    assert invalid.status_code == 422


def test_large_and_streamed_bodies_are_handed_on_intact(served: tuple[TestClient, dict[str, Any]]) -> None:
    client, _ = served
    rows = "".join(f"{i % 7 * 0.5},{i % 3 * 5.0}\n" for i in range(4000))  # beyond what the lane inlines
    big = client.post("/endpoints/ep/invocations", content=rows, headers=CSV)
    assert big.status_code == 200 and len(big.json()["predictions"]) == 4000

    def chunks() -> Iterator[bytes]:
        yield b"0.1,"
        yield b"0.2\n10,"
        yield b"0.1\n"

    streamed = client.post("/endpoints/ep/invocations", content=chunks(), headers=CSV)
    assert streamed.status_code == 200 and len(streamed.json()["predictions"]) == 2


def test_dataset_predictions_go_on_to_the_route(served: tuple[TestClient, dict[str, Any]]) -> None:
    client, model = served
    response = client.post("/endpoints/ep/predictions", json={"dataset_id": model["dataset_id"]})
    assert response.status_code == 200 and len(response.json()["predictions"]) == 60


def test_unknown_endpoints_and_metrics_labels(served: tuple[TestClient, dict[str, Any]]) -> None:
    client, _ = served
    missing = client.post("/endpoints/nope/invocations", content="0,0", headers=CSV)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    client.post("/endpoints/ep/invocations", content="0,0", headers=CSV)
    client.get("/healthz")
    metrics = client.get("/metrics").text
    assert 'route="/endpoints/{name}/invocations",status="200"' in metrics
    assert 'route="/healthz",status="200"' in metrics
    assert 'route="/endpoints/{name}/invocations",status="404"' in metrics


@pytest.mark.slow
def test_a_client_that_disconnects_mid_body_is_not_answered_by_the_lane(
    served: tuple[TestClient, dict[str, Any]],
) -> None:
    client, _ = served
    app = client.app
    sent: list[dict[str, Any]] = []
    messages = [
        {"type": "http.request", "body": b"0.1,", "more_body": True},
        {"type": "http.disconnect"},
    ]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/endpoints/ep/invocations",
        "raw_path": b"/endpoints/ep/invocations",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"text/csv"), (b"content-length", b"100")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    with contextlib.suppress(Exception):  # the framework may raise on a disconnect; it must not be a 200
        asyncio.run(app(scope, receive, send))  # type: ignore[arg-type]
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert not starts or starts[0]["status"] != 200


def test_every_response_says_nosniff(served: tuple[TestClient, dict[str, Any]]) -> None:
    client, _ = served
    for response in (
        client.get("/healthz"),
        client.post("/endpoints/ep/invocations", content="0,0", headers=CSV),
        client.get("/datasets"),
        client.get("/nope"),
    ):
        assert response.headers["x-content-type-options"] == "nosniff"
