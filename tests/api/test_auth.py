"""API keys: bearer auth, scopes, open paths, constant-time comparison of hashed keys."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from service.auth import Authenticator, generate_key, hash_key, required_scope
from service.cli import main as cli_main
from service.main import create_app
from service.settings import ApiKeyEntry, Settings
from tests.helpers import BLOBS_CSV, assert_error

ADMIN, READER = generate_key(), generate_key()


@pytest.fixture
def secured(settings: Settings) -> Iterator[TestClient]:
    keys = [
        ApiKeyEntry(name="ops", scope="admin", sha256=hash_key(ADMIN)),
        ApiKeyEntry(name="dashboard", scope="read", sha256=hash_key(READER)),
    ]
    with TestClient(create_app(settings.model_copy(update={"api_keys": keys}))) as client:
        yield client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_missing_or_wrong_key_is_401_without_hints(secured: TestClient) -> None:
    for headers in ({}, bearer("cnt_wrong"), {"Authorization": "Basic abc"}, {"Authorization": "Bearer "}):
        response = secured.get("/datasets", headers=headers)
        error = assert_error(response, 401, "unauthorized")
        assert response.headers["www-authenticate"] == "Bearer"
        assert "ops" not in error["message"] and "dashboard" not in error["message"]


def test_open_paths_need_no_key(secured: TestClient) -> None:
    for path in ("/healthz", "/readyz", "/docs", "/openapi.json"):
        assert secured.get(path).status_code == 200, path


def test_read_scope_reads_and_predicts_but_cannot_change_anything(secured: TestClient) -> None:
    assert secured.get("/datasets", headers=bearer(READER)).status_code == 200
    assert secured.get("/metrics", headers=bearer(READER)).status_code == 200
    upload = secured.post("/datasets", files={"file": ("b.csv", BLOBS_CSV)}, data={"name": "b"}, headers=bearer(READER))
    assert_error(upload, 403, "forbidden", "needs an `admin` key")
    response = secured.post(
        "/endpoints/none/invocations", content="1,2", headers={**bearer(READER), "content-type": "text/csv"}
    )
    assert_error(response, 404, "not_found")
    assert_error(secured.delete("/datasets/ds-x", headers=bearer(READER)), 403, "forbidden")


def test_admin_scope_does_everything(secured: TestClient) -> None:
    upload = secured.post(
        "/datasets", files={"file": ("b.csv", BLOBS_CSV)}, data={"name": "b", "key_column": "id"}, headers=bearer(ADMIN)
    )
    assert upload.status_code == 201
    assert secured.delete(f"/datasets/{upload.json()['id']}", headers=bearer(ADMIN)).status_code == 204


def test_unauthenticated_bodies_are_not_read(secured: TestClient) -> None:
    """The key is checked before the upload: a huge unauthenticated body is refused at once."""
    response = secured.post("/datasets", content=b"x" * 10_000_000, headers={"content-type": "application/json"})
    assert_error(response, 401, "unauthorized")


def test_no_keys_means_open(client: TestClient) -> None:
    assert client.get("/datasets").status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "scope"),
    [
        ("GET", "/models/m", "read"),
        ("POST", "/endpoints/ep/invocations", "read"),
        ("POST", "/endpoints/ep/predictions", "read"),
        ("POST", "/endpoints", "admin"),
        ("PUT", "/endpoints/ep", "admin"),
        ("POST", "/endpoints/ep/invocations/x", "admin"),
        ("DELETE", "/models/m", "admin"),
        ("POST", "/training-jobs/j/stop", "admin"),
    ],
)
def test_required_scope(method: str, path: str, scope: str) -> None:
    assert required_scope(method, path) == scope


def test_authenticator_compares_against_every_key() -> None:
    key = generate_key()
    entries = [ApiKeyEntry(name=f"k{i}", scope="read", sha256=hash_key(generate_key())) for i in range(3)]
    entries.append(ApiKeyEntry(name="mine", scope="admin", sha256=hash_key(key)))
    assert Authenticator(entries).identify(f"Bearer {key}").name == "mine"
    assert Authenticator(entries).identify(f"bearer   {key}  ").name == "mine"


def test_openapi_declares_the_bearer_scheme(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    operation = schema["paths"]["/datasets"]["get"]
    assert {"401", "403"} <= set(operation["responses"])
    assert "security" not in schema["paths"]["/healthz"]["get"]


def test_keys_create_prints_a_usable_entry(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    assert cli_main(["keys", "create", "--name", "ci", "--scope", "admin"]) == 0
    lines = capsys.readouterr().out.splitlines()
    key = lines[0].rsplit(" ", 1)[1]
    entry = ApiKeyEntry.model_validate(json.loads(lines[-1]))
    assert entry.name == "ci" and entry.scope == "admin" and entry.sha256 == hash_key(key)


def test_settings_read_keys_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CENTROID_API_KEYS", f'[{{"name": "a", "scope": "read", "sha256": "{hash_key("k")}"}}]')
    assert Settings().api_keys[0].name == "a"


def test_serve_refuses_a_public_interface_without_keys(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.settings import get_settings

    monkeypatch.delenv("CENTROID_API_KEYS", raising=False)
    get_settings.cache_clear()
    try:
        assert cli_main(["serve", "--host", "0.0.0.0"]) == 2
    finally:
        get_settings.cache_clear()
    assert "refusing to listen on 0.0.0.0" in capsys.readouterr().err
