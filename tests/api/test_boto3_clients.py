"""An unchanged boto3 ``sagemaker-runtime`` client against a real ``centroid serve`` with API keys.

The key is both the AWS access key id and the secret access key: the client signs with SigV4 as it
would for SageMaker, the server verifies the signature (botocore's signer, the key's scope, the
15-minute clock window). Errors reach the client as SageMaker Runtime answers them (``ModelError``
with the original status and message, ``ValidationError``, AWS's signature codes), while a plain
HTTP client with a bearer key keeps Centroid's JSON error body.
"""

from __future__ import annotations

import datetime
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import boto3
import httpx
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from service.auth import generate_key, hash_key
from tests.helpers import BLOBS_CSV, assert_error, centroid_process, free_port, wait_for

ADMIN, READER = generate_key(), generate_key()
ROWS_CSV = "0.1,0.1\n10.0,0.0\n0.0,10.2\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``centroid serve`` with an admin and a read key, and an endpoint ``blobs`` in service."""
    tmp = tmp_path_factory.mktemp("boto3")
    port = free_port()
    keys = [
        {"name": "ops", "scope": "admin", "sha256": hash_key(ADMIN)},
        {"name": "dashboard", "scope": "read", "sha256": hash_key(READER)},
    ]
    env = {
        "CENTROID_DATA_DIR": str(tmp / "data"),
        "CENTROID_DATABASE_URL": f"sqlite:///{tmp / 'centroid.db'}",
        "CENTROID_WORKER_POLL_INTERVAL": "0.2",
        "CENTROID_API_KEYS": json.dumps(keys),
    }
    log = tmp / "serve.log"
    process = centroid_process(["serve", "--host", "127.0.0.1", "--port", str(port)], env, log)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {ADMIN}"}) as api:
            wait_for(lambda: _ready(api, process, log), bool, timeout=60, interval=0.2)
            upload = api.post(
                "/datasets",
                files={"file": ("blobs.csv", BLOBS_CSV, "text/csv")},
                data={"name": "b", "key_column": "id"},
            )
            assert upload.status_code == 201, upload.text
            body = {"name": "job", "train_dataset_id": upload.json()["id"], "hyperparameters": {"k": 3, "seed": 1}}
            assert api.post("/training-jobs", json=body).status_code == 202
            job = wait_for(
                lambda: api.get("/training-jobs/job").json(), lambda j: j["status"] in ("Completed", "Failed")
            )
            assert job["status"] == "Completed", job
            created = api.post("/endpoints", json={"name": "blobs", "model_id": job["model_id"]})
            assert created.status_code == 202, created.text
            endpoint = wait_for(lambda: api.get("/endpoints/blobs").json(), lambda e: e["status"] != "Creating")
            assert endpoint["status"] == "InService", endpoint
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def _ready(api: httpx.Client, process: Any, log: Path) -> bool:
    assert process.poll() is None, log.read_text()
    try:
        return api.get("/readyz").status_code == 200
    except httpx.TransportError:
        return False


def runtime(url: str, access_key: str, secret: str | None = None) -> Any:
    """An unchanged boto3 client, as for SageMaker but for ``endpoint_url`` (no retries: faster failures)."""
    return boto3.client(
        "sagemaker-runtime",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id=access_key,
        aws_secret_access_key=access_key if secret is None else secret,
        config=Config(retries={"max_attempts": 1, "mode": "standard"}),
    )


def refused(call: Any) -> dict[str, Any]:
    with pytest.raises(ClientError) as caught:
        call()
    response: dict[str, Any] = caught.value.response
    assert response["Error"]["Message"], response
    return response


@pytest.mark.slow
def test_a_key_invokes_with_csv_and_json(server: str) -> None:
    for key in (READER, ADMIN):
        client = runtime(server, key)
        answer = client.invoke_endpoint(EndpointName="blobs", ContentType="text/csv", Body=ROWS_CSV)
        assert answer["ResponseMetadata"]["HTTPStatusCode"] == 200
        assert answer["ContentType"] == "application/json"
        predictions = json.loads(answer["Body"].read())["predictions"]
        assert len(predictions) == 3
        assert len({p["closest_cluster"] for p in predictions}) == 3  # the three blobs

        instances = {"instances": [{"features": [0.1, 0.1]}, {"data": {"features": {"values": [10.0, 0.0]}}}]}
        answer = client.invoke_endpoint(
            EndpointName="blobs", ContentType="application/json", Accept="text/csv", Body=json.dumps(instances)
        )
        assert answer["ContentType"].startswith("text/csv")
        lines = answer["Body"].read().decode().splitlines()
        assert [float(line.split(",")[0]) for line in lines] == [p["closest_cluster"] for p in predictions[:2]]


def test_csv_and_json_answers_agree(server: str) -> None:
    client = runtime(server, READER)
    by_csv = json.loads(
        client.invoke_endpoint(EndpointName="blobs", ContentType="text/csv", Body=ROWS_CSV)["Body"].read()
    )
    rows = [[float(v) for v in line.split(",")] for line in ROWS_CSV.splitlines()]
    by_json = json.loads(
        client.invoke_endpoint(
            EndpointName="blobs",
            ContentType="application/json",
            Body=json.dumps({"instances": [{"features": row} for row in rows]}),
        )["Body"].read()
    )
    assert by_csv == by_json


def test_a_wrong_secret_is_an_invalid_signature(server: str) -> None:
    client = runtime(server, READER, secret=READER + "x")
    response = refused(lambda: client.invoke_endpoint(EndpointName="blobs", ContentType="text/csv", Body=ROWS_CSV))
    assert response["Error"]["Code"] == "InvalidSignatureException"
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert "signature" in response["Error"]["Message"]


def test_an_unknown_access_key_is_unrecognized(server: str) -> None:
    client = runtime(server, generate_key())
    response = refused(lambda: client.invoke_endpoint(EndpointName="blobs", ContentType="text/csv", Body=ROWS_CSV))
    assert response["Error"]["Code"] == "UnrecognizedClientException"
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert "ops" not in response["Error"]["Message"] and "dashboard" not in response["Error"]["Message"]


def test_a_stale_or_future_date_is_refused(server: str) -> None:
    client = runtime(server, READER)
    for offset, fragment in ((-20, "Signature expired"), (20, "not yet current")):
        then = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=offset)
        with mock.patch("botocore.auth.get_current_datetime", return_value=then):
            response = refused(
                lambda: client.invoke_endpoint(EndpointName="blobs", ContentType="text/csv", Body=ROWS_CSV)
            )
        assert response["Error"]["Code"] == "InvalidSignatureException"
        assert fragment in response["Error"]["Message"]
    # Within the 15 minutes AWS allows, a skewed clock is fine.
    then = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=10)
    with mock.patch("botocore.auth.get_current_datetime", return_value=then):
        assert client.invoke_endpoint(EndpointName="blobs", ContentType="text/csv", Body=ROWS_CSV)["Body"].read()


def test_the_keys_scope_applies(server: str) -> None:
    """InvokeEndpointAsync is not a read: a read key is refused (before anything else); an admin key
    reaches the server, which has no such operation."""
    response = refused(lambda: runtime(server, READER).invoke_endpoint_async(EndpointName="blobs", InputLocation="x"))
    assert response["Error"]["Code"] == "AccessDeniedException"
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert "admin" in response["Error"]["Message"]
    response = refused(lambda: runtime(server, ADMIN).invoke_endpoint_async(EndpointName="blobs", InputLocation="x"))
    assert response["Error"]["Code"] == "ValidationError"


def signed(url: str, key: str, method: str, path: str, body: bytes = b"", **headers: str) -> httpx.Request:
    """A request signed by botocore's signer (what any SigV4 client sends), as httpx will send it."""
    request = AWSRequest(method=method, url=url + path, data=body, headers=headers)
    SigV4Auth(Credentials(key, key), "sagemaker", "us-east-1").add_auth(request)
    return httpx.Request(method, url + path, content=body, headers=dict(request.headers.items()))


def test_signed_requests_reach_the_whole_api_within_the_keys_scope(server: str) -> None:
    with httpx.Client(timeout=30) as http:
        assert http.send(signed(server, READER, "GET", "/endpoints/blobs")).json()["status"] == "InService"
        refusal = http.send(signed(server, READER, "DELETE", "/endpoints/blobs"))
        assert refusal.status_code == 403 and refusal.headers["x-amzn-errortype"] == "AccessDeniedException"
        assert http.send(signed(server, ADMIN, "GET", "/datasets?limit=1&offset=0")).status_code == 200


def test_a_body_changed_after_signing_is_refused(server: str) -> None:
    request = signed(
        server, READER, "POST", "/endpoints/blobs/invocations", ROWS_CSV.encode(), **{"Content-Type": "text/csv"}
    )
    headers = {name: value for name, value in request.headers.items() if name != "content-length"}
    tampered = httpx.Request("POST", request.url, content=b"90.0,90.0\n", headers=headers)
    with httpx.Client(timeout=30) as http:
        response = http.send(tampered)
        assert response.status_code == 403, response.text
        assert response.headers["x-amzn-errortype"] == "InvalidSignatureException"
        assert http.send(request).status_code == 200


def test_a_bad_payload_is_a_model_error_with_the_original_status(server: str) -> None:
    client = runtime(server, READER)
    for body, content_type, status, fragment in (
        ("1,2,3\n", "text/csv", 400, "feature"),
        ("a,b\n", "text/csv", 400, "not a number"),
        ('{"instances": [', "application/json", 400, "JSON"),
        ("1,2\n", "image/png", 415, "image/png"),
    ):
        response = refused(lambda: client.invoke_endpoint(EndpointName="blobs", ContentType=content_type, Body=body))  # noqa: B023
        assert response["Error"]["Code"] == "ModelError", response
        assert response["ResponseMetadata"]["HTTPStatusCode"] == 424
        assert response["OriginalStatusCode"] == status
        assert fragment.lower() in response["OriginalMessage"].lower(), response
        assert (
            f"({status})" in response["Error"]["Message"]
            and response["OriginalMessage"] in response["Error"]["Message"]
        )
        assert response["ResponseMetadata"]["RequestId"]
    with pytest.raises(client.exceptions.ModelError):
        client.invoke_endpoint(EndpointName="blobs", ContentType="text/csv", Body="x")
    response = refused(
        lambda: client.invoke_endpoint(EndpointName="blobs", ContentType="text/csv", Accept="image/png", Body="1,2")
    )
    assert response["Error"]["Code"] == "ModelError" and response["OriginalStatusCode"] == 406


def test_an_unknown_endpoint_is_a_validation_error(server: str) -> None:
    client = runtime(server, READER)
    response = refused(lambda: client.invoke_endpoint(EndpointName="nowhere", ContentType="text/csv", Body="1,2"))
    assert response["Error"]["Code"] == "ValidationError"
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert "nowhere" in response["Error"]["Message"]
    with pytest.raises(client.exceptions.ValidationError):
        client.invoke_endpoint(EndpointName="nowhere", ContentType="text/csv", Body="1,2")


def test_plain_http_clients_keep_the_json_error_body(server: str) -> None:
    with httpx.Client(base_url=server, timeout=30, headers={"Authorization": f"Bearer {READER}"}) as http:
        missing = http.post("/endpoints/nowhere/invocations", content="1,2", headers={"content-type": "text/csv"})
        assert_error(missing, 404, "not_found", "nowhere")
        bad = http.post("/endpoints/blobs/invocations", content="1,2,3", headers={"content-type": "text/csv"})
        assert_error(bad, 400, "invalid_input")
        wrong_type = http.post("/endpoints/blobs/invocations", content="1,2", headers={"content-type": "image/png"})
        assert_error(wrong_type, 415, "unsupported_media_type")
        for response in (missing, bad, wrong_type):
            assert "x-amzn-errortype" not in response.headers
        unauthenticated = httpx.post(f"{server}/endpoints/blobs/invocations", content="1,2")
        assert_error(unauthenticated, 401, "unauthorized")
        assert unauthenticated.headers["www-authenticate"] == "Bearer"
        ok = http.post("/endpoints/blobs/invocations", content=ROWS_CSV, headers={"content-type": "text/csv"})
        assert ok.status_code == 200 and len(ok.json()["predictions"]) == 3


def test_signed_invocations_are_quick_enough(server: str) -> None:
    """Verifying the signature (botocore's signer) costs far less than the round trip."""
    client = runtime(server, READER)
    client.invoke_endpoint(EndpointName="blobs", ContentType="text/csv", Body=ROWS_CSV)
    started = time.perf_counter()
    for _ in range(50):
        client.invoke_endpoint(EndpointName="blobs", ContentType="text/csv", Body=ROWS_CSV)["Body"].read()
    assert (time.perf_counter() - started) / 50 < 0.1
