"""API keys: bearer auth, scopes, open paths, constant-time comparison of hashed keys."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

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


# --- SigV4: the key as an AWS access key id and secret (boto3 against a real server: test_boto3_clients.py) ---


def sigv4(
    key: str, method: str, path: str, body: bytes = b"", secret: str | None = None, **headers: str
) -> dict[str, str]:
    """The headers botocore's signer adds for ``key`` (the secret too, unless given)."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    request = AWSRequest(method=method, url=f"http://testserver{path}", data=body, headers=headers)
    SigV4Auth(Credentials(key, key if secret is None else secret), "sagemaker", "eu-west-1").add_auth(request)
    return dict(request.headers.items())


def assert_aws_error(response: Any, status: int, code: str, fragment: str = "") -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["x-amzn-errortype"] == code
    body = response.json()
    assert fragment.lower() in body["Message"].lower(), body
    assert body["error"]["request_id"] == response.headers["x-amzn-requestid"]
    return body  # type: ignore[no-any-return]


def test_a_signed_request_is_verified_and_scoped(secured: TestClient) -> None:
    assert secured.get("/datasets", headers=sigv4(READER, "GET", "/datasets")).status_code == 200
    assert secured.get("/datasets?limit=2", headers=sigv4(READER, "GET", "/datasets?limit=2")).status_code == 200
    wrong = secured.get("/datasets", headers=sigv4(READER, "GET", "/datasets", secret=ADMIN))
    assert_aws_error(wrong, 403, "InvalidSignatureException", "signature")
    other_path = secured.get("/models", headers=sigv4(READER, "GET", "/datasets"))
    assert_aws_error(other_path, 403, "InvalidSignatureException")
    unknown = secured.get("/datasets", headers=sigv4(generate_key(), "GET", "/datasets"))
    assert_aws_error(unknown, 403, "UnrecognizedClientException")
    denied = secured.delete("/datasets/ds-x", headers=sigv4(READER, "DELETE", "/datasets/ds-x"))
    assert_aws_error(denied, 403, "AccessDeniedException", "admin")
    assert secured.delete("/datasets/ds-x", headers=sigv4(ADMIN, "DELETE", "/datasets/ds-x")).status_code == 404


def test_a_signed_body_is_verified_before_the_application_sees_it(secured: TestClient) -> None:
    path = "/endpoints/my%20ep/invocations"  # the name as sent (percent-encoded) is what was signed
    headers = sigv4(READER, "POST", path, b"1,2\n", **{"Content-Type": "text/csv"})
    response = secured.post(path, content=b"1,2\n", headers=headers)
    assert_aws_error(response, 400, "ValidationError", "my ep")  # verified: the route answered
    tampered = secured.post(path, content=b"3,4\n", headers=headers)
    assert_aws_error(tampered, 403, "InvalidSignatureException")


def test_the_payload_hash_header_and_unsigned_payloads(secured: TestClient) -> None:
    import hashlib

    path = "/endpoints/ep/invocations"
    declared = {"Content-Type": "text/csv", "X-Amz-Content-SHA256": hashlib.sha256(b"1,2\n").hexdigest()}
    response = secured.post(path, content=b"1,2\n", headers=sigv4(READER, "POST", path, b"1,2\n", **declared))
    assert_aws_error(response, 400, "ValidationError")
    lying = secured.post(path, content=b"1,3\n", headers=sigv4(READER, "POST", path, b"1,3\n", **declared))
    assert_aws_error(lying, 403, "InvalidSignatureException", "x-amz-content-sha256")
    unsigned = {"Content-Type": "text/csv", "X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD"}
    response = secured.post(path, content=b"5,6\n", headers=sigv4(READER, "POST", path, b"1,2\n", **unsigned))
    assert_aws_error(response, 400, "ValidationError")  # the body is not covered: accepted


def test_a_signed_body_over_the_limit_is_refused(settings: Settings) -> None:
    keys = [ApiKeyEntry(name="ops", scope="admin", sha256=hash_key(ADMIN))]
    app = create_app(settings.model_copy(update={"api_keys": keys, "max_upload_bytes": 1000}))
    path = "/endpoints/ep/invocations"
    with TestClient(app) as client:
        body = b"1,2\n" * 300
        response = client.post(
            path, content=body, headers=sigv4(ADMIN, "POST", path, body, **{"Content-Type": "text/csv"})
        )
        error = assert_aws_error(response, 424, "ModelError")
        assert error["OriginalStatusCode"] == 413


def test_malformed_or_undated_signatures_are_incomplete(secured: TestClient) -> None:
    headers = sigv4(READER, "GET", "/datasets")
    for authorization in (
        "AWS4-HMAC-SHA256 Credential=abc",
        headers["Authorization"].replace("/aws4_request", "/other"),
        headers["Authorization"].split(", Signature=")[0],
    ):
        response = secured.get("/datasets", headers={**headers, "Authorization": authorization})
        assert_aws_error(response, 403, "IncompleteSignatureException")
    undated = {name: value for name, value in headers.items() if name != "X-Amz-Date"}
    assert_aws_error(secured.get("/datasets", headers=undated), 403, "IncompleteSignatureException", "X-Amz-Date")


def test_a_date_header_may_stand_for_x_amz_date(secured: TestClient) -> None:
    from email.utils import formatdate

    headers = sigv4(READER, "GET", "/datasets", Date=formatdate(usegmt=True))
    assert "X-Amz-Date" not in headers
    assert secured.get("/datasets", headers=headers).status_code == 200


def test_the_clock_window_is_fifteen_minutes() -> None:
    from service.auth import SignatureRefused

    key = generate_key()
    authenticator = Authenticator([ApiKeyEntry(name="k", scope="read", sha256=hash_key(key))])
    headers = sigv4(key, "GET", "/datasets")
    raw = [(name.lower().encode(), value.encode()) for name, value in headers.items()]
    import calendar
    import time

    signed_at = calendar.timegm(time.strptime(headers["X-Amz-Date"], "%Y%m%dT%H%M%SZ"))
    for skew in (-899, 0, 899):
        pending = authenticator.check_signed("GET", "/datasets", headers["Authorization"], raw, now=signed_at + skew)
        assert pending is not None and pending.entry.name == "k"
        pending.verify("GET", "/datasets", "", [*raw, (b"host", b"testserver")], b"")
    for skew, fragment in ((-901, "not yet current"), (901, "expired")):
        with pytest.raises(SignatureRefused, match=fragment) as refused:
            authenticator.check_signed("GET", "/datasets", headers["Authorization"], raw, now=signed_at + skew)
        assert refused.value.aws_code == "InvalidSignatureException"


def test_open_paths_need_no_signature(secured: TestClient) -> None:
    assert secured.get("/healthz", headers=sigv4("anything", "GET", "/healthz")).status_code == 200


def test_open_servers_check_no_signature(client: TestClient) -> None:
    # Without keys, a boto3 client signs with whatever it has: nothing is checked, errors are SageMaker's.
    assert client.get("/datasets", headers=sigv4("AKIDEXAMPLE", "GET", "/datasets")).status_code == 200
    path = "/endpoints/none/invocations"
    signed = sigv4("AKIDEXAMPLE", "POST", path, b"1", **{"Content-Type": "text/csv"})
    response = client.post(path, content=b"1", headers=signed)
    assert_aws_error(response, 400, "ValidationError", "none")


def test_aws_sdk_clients_get_aws_errors_and_others_the_json_body(secured: TestClient) -> None:
    sdk = {"amz-sdk-invocation-id": "4b6f0d9e-0000-4000-8000-000000000000"}
    unsigned = secured.get("/datasets", headers=sdk)
    assert_aws_error(unsigned, 403, "MissingAuthenticationTokenException", "missing API key")
    assert "www-authenticate" not in unsigned.headers
    response = secured.post(
        "/endpoints/none/invocations", content="1,2", headers={**sdk, **bearer(READER), "content-type": "text/csv"}
    )
    assert_aws_error(response, 400, "ValidationError")
    gzip = secured.post(
        "/endpoints/none/invocations",
        content=b"x",
        headers={**sdk, **bearer(READER), "content-type": "text/csv", "content-encoding": "gzip"},
    )
    assert assert_aws_error(gzip, 424, "ModelError")["OriginalStatusCode"] == 415
    plain = secured.post(
        "/endpoints/none/invocations", content="1,2", headers={**bearer(READER), "content-type": "text/csv"}
    )
    assert_error(plain, 404, "not_found")
    assert "x-amzn-errortype" not in plain.headers


def test_a_streamed_signed_body_over_the_limit_is_refused_while_read(settings: Settings) -> None:
    keys = [ApiKeyEntry(name="ops", scope="admin", sha256=hash_key(ADMIN))]
    app = create_app(settings.model_copy(update={"api_keys": keys, "max_upload_bytes": 1000}))
    path = "/endpoints/ep/invocations"
    body = b"1,2\n" * 300
    headers = sigv4(ADMIN, "POST", path, body, **{"Content-Type": "text/csv"})
    with TestClient(app) as client:
        response = client.post(path, content=iter([body[:600], body[600:]]), headers=headers)
        assert assert_aws_error(response, 424, "ModelError")["OriginalStatusCode"] == 413
