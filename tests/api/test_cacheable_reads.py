"""Cacheable reads: ETag, Cache-Control and If-None-Match on immutable model reads; assignments
computed once per model, dataset and filter, then answered from memory without the database."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event

from schemas.models import Assignments
from service.http_cache import (
    CACHE_CONTROL,
    Rendered,
    RenderedCache,
    content_etag,
    etag_matches,
    parse_if_none_match,
    strong_etag,
)
from service.models.service import ModelService
from tests.helpers import BLOBS_CSV, assert_error, deployed, run_worker_until_idle, trained_model, upload_csv

READS = ["", "/centroids", "/artifact", "/assignments"]
CATALOG_THREAD = "centroid-serving-catalog"


@pytest.fixture
def model(client: TestClient) -> dict[str, Any]:
    blobs = upload_csv(client, "blobs", BLOBS_CSV, "id")
    return trained_model(client, blobs["id"])


@contextmanager
def statements(client: TestClient) -> Iterator[list[str]]:
    """SQL the app executes meanwhile, except the serving catalog's background generation poll."""
    engine = client.app.state.centroid.database.engine  # type: ignore[attr-defined]
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if threading.current_thread().name != CATALOG_THREAD:
            seen.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


@contextmanager
def counted_computations(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[Any, ...]]]:
    calls: list[tuple[Any, ...]] = []
    original = ModelService.assignments_data

    def counting(self: ModelService, row: Any, dataset_id: str | None, cluster: int | None) -> dict[str, Any]:
        calls.append((row.id, dataset_id, cluster))
        return original(self, row, dataset_id, cluster)

    monkeypatch.setattr(ModelService, "assignments_data", counting)
    yield calls


# --- HTTP ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", READS)
def test_immutable_reads_carry_etag_and_cache_control(client: TestClient, model: dict[str, Any], suffix: str) -> None:
    url = f"/models/{model['id']}{suffix}"
    first = client.get(url)
    assert first.status_code == 200, first.text
    etag = first.headers["etag"]
    assert etag.startswith('"') and etag.endswith('"') and not etag.startswith("W/")
    assert first.headers["cache-control"] == CACHE_CONTROL
    again = client.get(url)
    assert again.headers["etag"] == etag and again.content == first.content

    for header in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        revalidated = client.get(url, headers={"If-None-Match": header})
        assert revalidated.status_code == 304, header
        assert revalidated.content == b""
        assert revalidated.headers["etag"] == etag
        assert revalidated.headers["cache-control"] == CACHE_CONTROL

    changed = client.get(url, headers={"If-None-Match": '"not-this-one"'})
    assert changed.status_code == 200 and changed.content == first.content
    assert changed.headers["etag"] == etag


def test_etags_differ_between_representations(client: TestClient, model: dict[str, Any]) -> None:
    etags = {client.get(f"/models/{model['id']}{suffix}").headers["etag"] for suffix in READS}
    assert len(etags) == len(READS)


def test_model_etag_is_derived_from_id_and_artifact(client: TestClient, model: dict[str, Any]) -> None:
    expected = strong_etag(model["id"], model["artifact_sha256"], "model")
    assert client.get(f"/models/{model['id']}").headers["etag"] == expected


@pytest.mark.slow
def test_artifact_uses_our_etag_for_ranges_too(client: TestClient, model: dict[str, Any]) -> None:
    url = f"/models/{model['id']}/artifact"
    full = client.get(url)
    etag = full.headers["etag"]
    assert etag == strong_etag(model["id"], model["artifact_sha256"], "artifact")
    partial = client.get(url, headers={"Range": "bytes=0-9", "If-Range": etag})
    assert partial.status_code == 206 and partial.content == full.content[:10]
    assert partial.headers["etag"] == etag


def test_bodies_are_unchanged(client: TestClient, model: dict[str, Any]) -> None:
    """The cached assignments body is the pydantic Assignments model's JSON, value for value."""
    body = client.get(f"/models/{model['id']}/assignments").json()
    assert list(body) == list(Assignments.model_fields)
    assert Assignments.model_validate(body).model_dump(mode="json") == body
    assert set(client.get(f"/models/{model['id']}").json()) >= {"id", "artifact_sha256", "created_at"}


def test_assignments_are_computed_once_and_hits_touch_no_database(
    client: TestClient, model: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"/models/{model['id']}/assignments"
    with counted_computations(monkeypatch) as calls:
        with statements(client) as miss_sql:
            first = client.get(url)
        assert miss_sql, "the listener sees the queries of a miss"
        assert first.status_code == 200 and first.headers["content-type"] == "application/json"
        assert first.headers["etag"] == content_etag(first.content)
        with statements(client) as sql:
            hits = [client.get(url) for _ in range(5)]
            revalidated = client.get(url, headers={"If-None-Match": first.headers["etag"]})
        assert sql == []
    assert len(calls) == 1
    assert all(hit.content == first.content and hit.headers["etag"] == first.headers["etag"] for hit in hits)
    assert revalidated.status_code == 304 and revalidated.content == b""


def test_filters_and_datasets_are_cached_separately(
    client: TestClient, model: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"/models/{model['id']}/assignments"
    other = upload_csv(client, "blobs-again", BLOBS_CSV.replace(b"a1,", b"z1,"), "id")
    with counted_computations(monkeypatch) as calls:
        everything = client.get(url).json()
        cluster = everything["clusters"]["c3"]
        only = client.get(url, params={"cluster": cluster})
        elsewhere = client.get(url, params={"dataset_id": other["id"]})
        for _ in range(3):
            assert client.get(url).json() == everything
            assert client.get(url, params={"cluster": cluster}).content == only.content
            assert client.get(url, params={"dataset_id": other["id"]}).content == elsewhere.content
    assert len(calls) == 3
    assert set(only.json()["clusters"]) == {f"c{i}" for i in range(20)}
    assert only.json()["counts"] == {str(cluster): 20}
    assert only.headers["etag"] != client.get(url).headers["etag"]
    moved = elsewhere.json()
    assert moved["dataset_id"] == other["id"] and "z1" in moved["clusters"] and "a1" not in moved["clusters"]
    assert moved["clusters"]["z1"] == everything["clusters"]["a1"]


def test_errors_are_not_cached(client: TestClient, model: dict[str, Any]) -> None:
    url = f"/models/{model['id']}/assignments"
    for _ in range(2):
        assert_error(client.get(url, params={"cluster": 3}), 400, "invalid_input", "between 0 and 2")
        assert_error(client.get(url, params={"dataset_id": "ds-missing"}), 404, "not_found")
    assert_error(client.get("/models/mdl-missing/assignments"), 404, "not_found")
    assert client.get(url).status_code == 200


def test_deleting_the_model_drops_its_cached_assignments(client: TestClient, model: dict[str, Any]) -> None:
    url = f"/models/{model['id']}/assignments"
    assert client.get(url).status_code == 200
    deployed(client, model["id"])
    assert client.get(url).status_code == 200
    assert client.delete("/endpoints/ep").status_code == 202
    run_worker_until_idle(client.app)
    assert client.get(url).status_code == 200  # cached again after the endpoint's changes
    assert client.delete(f"/models/{model['id']}").status_code == 204
    assert_error(client.get(url), 404, "not_found")
    etag_less = client.get(url, headers={"If-None-Match": "*"})
    assert_error(etag_less, 404, "not_found")
    for suffix in READS[:3]:
        assert_error(client.get(f"/models/{model['id']}{suffix}"), 404, "not_found")


def test_deleting_another_dataset_drops_its_cached_assignments(client: TestClient, model: dict[str, Any]) -> None:
    other = upload_csv(client, "blobs-again", BLOBS_CSV, "id")
    url = f"/models/{model['id']}/assignments"
    assert client.get(url, params={"dataset_id": other["id"]}).status_code == 200
    assert client.delete(f"/datasets/{other['id']}").status_code == 204
    client.app.state.centroid.catalog.changed()  # type: ignore[attr-defined]  # or wait for the poll
    assert_error(client.get(url, params={"dataset_id": other["id"]}), 404, "not_found")
    assert client.get(url).status_code == 200


@pytest.mark.slow
@pytest.mark.parametrize(
    ("params", "loc", "kind"),
    [
        ({"cluster": "-1"}, ["query", "cluster"], "greater_than_equal"),
        ({"cluster": "one"}, ["query", "cluster"], "int_parsing"),
        ({"cluster": ""}, ["query", "cluster"], "int_parsing"),
        ({"dataset_id": "d" * 41}, ["query", "dataset_id"], "string_too_long"),
    ],
)
def test_assignments_query_is_validated(
    client: TestClient, model: dict[str, Any], params: dict[str, str], loc: list[str], kind: str
) -> None:
    error = assert_error(client.get(f"/models/{model['id']}/assignments", params=params), 422, "validation_error")
    assert [(d["loc"], d["type"]) for d in error["details"]] == [(loc, kind)]


def test_assignments_query_values_are_parsed(client: TestClient, model: dict[str, Any]) -> None:
    url = f"/models/{model['id']}/assignments"
    everything = client.get(url).json()
    cluster = everything["clusters"]["b0"]
    only = client.get(f"{url}?cluster=0&cluster={cluster}&unrelated=1").json()  # the last value wins
    assert set(only["clusters"]) == {f"b{i}" for i in range(20)}
    assert client.get(url, params={"dataset_id": ""}).json() == everything  # empty: the training dataset
    named = client.get(url, params={"dataset_id": model["train_dataset_id"]})
    assert named.json() == everything


def test_openapi_documents_the_cache_headers(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for suffix in READS:
        responses = paths["/models/{model_id}" + suffix]["get"]["responses"]
        assert {"ETag", "Cache-Control"} <= set(responses["200"]["headers"])
        assert all(header["description"] for header in responses["200"]["headers"].values())
        assert "content" not in responses["304"] and "ETag" in responses["304"]["headers"]
    artifact = paths["/models/{model_id}/artifact"]["get"]["responses"]["200"]
    assert "application/gzip" in artifact["content"]
    parameters = paths["/models/{model_id}/assignments"]["get"]["parameters"]
    assert [(p["name"], p["in"]) for p in parameters] == [
        ("model_id", "path"),
        ("cluster", "query"),
        ("dataset_id", "query"),
    ]


# --- units --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "tags"),
    [
        (None, []),
        ("", []),
        ("*", None),
        ("  *  ", None),
        ('"abc"', ['"abc"']),
        ('W/"abc"', ['"abc"']),
        ('"a", W/"b",   "c"', ['"a"', '"b"', '"c"']),
        ('"a,b", "c"', ['"a,b"', '"c"']),
        ('""', ['""']),
        ("abc", []),
        ('garbage, "ok"', ['"ok"']),
    ],
)
def test_if_none_match_parsing(header: str | None, tags: list[str] | None) -> None:
    assert parse_if_none_match(header) == tags


def test_if_none_match_uses_weak_comparison() -> None:
    etag = '"v1"'
    assert etag_matches('"v1"', etag)
    assert etag_matches('W/"v1"', etag)
    assert etag_matches('"v0", W/"v1"', etag)
    assert etag_matches("*", etag)
    assert etag_matches('"v1"', 'W/"v1"')
    assert not etag_matches('"v2"', etag)
    assert not etag_matches('"V1"', etag)
    assert not etag_matches(None, etag)
    assert not etag_matches("", etag)
    assert not etag_matches("v1", etag)


def test_strong_etags_are_quoted_and_distinct() -> None:
    tags = {strong_etag("mdl-1", "aa", kind) for kind in ("model", "centroids", "artifact")}
    assert len(tags) == 3 and all(t.startswith('"') and t.endswith('"') and len(t) == 34 for t in tags)
    assert strong_etag("a", "bc") != strong_etag("ab", "c")
    assert content_etag(b"x") == content_etag(b"x") != content_etag(b"y")


def test_rendered_cache_lru_bounds_and_generations() -> None:
    cache = RenderedCache(max_bytes=10, max_entries=3)
    assert cache.put(("a",), Rendered('"a"', b"1234", 1)) and cache.put(("b",), Rendered('"b"', b"1234", 1))
    assert cache.get(("a",), 1) is not None  # a is now the most recently used
    assert cache.put(("c",), Rendered('"c"', b"1234", 1))  # 12 bytes > 10: b (least recent) goes
    assert cache.get(("b",), 1) is None and cache.get(("a",), 1) is not None and cache.total_bytes == 8
    assert not cache.put(("huge",), Rendered('"h"', b"x" * 11, 1))
    for key in ("d", "e", "f"):
        cache.put((key,), Rendered(f'"{key}"', b"1", 1))
    assert len(cache) == 3
    assert cache.get(("f",), 2) is None and cache.get(("f",), 1) is None  # another generation: dropped
    cache.put(("g",), Rendered('"g"', b"1", 2))  # the generation moved: every older entry goes
    assert len(cache) == 1 and cache.total_bytes == 1
    assert not cache.put(("late",), Rendered('"l"', b"1", 1))  # computed before the change
    assert cache.discard(lambda key: key == ("g",)) == 1 and len(cache) == 0


def test_rendered_cache_computes_a_key_once_across_threads() -> None:
    cache = RenderedCache()
    computed: list[int] = []
    gate = threading.Barrier(8)

    def read() -> bytes:
        gate.wait()
        with cache.flight(("k",)):
            hit = cache.get(("k",), 0)
            if hit is None:
                computed.append(1)
                hit = Rendered('"k"', orjson.dumps({"k": 1}), 0)
                cache.put(("k",), hit)
            return hit.body

    threads = [threading.Thread(target=read) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert computed == [1] and cache._flights == {}
