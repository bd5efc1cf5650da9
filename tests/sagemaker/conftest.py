"""A moto server on 127.0.0.1 playing AWS, and helpers that play SageMaker's part on it.

moto 5.2 creates training jobs already ``Completed`` with no artifact, endpoints already
``InService``, does not implement StopTrainingJob or UpdateEndpoint, and lets CreateTrainingJob
overwrite an existing job. The helpers here make it behave like SageMaker where a test needs it:
they walk jobs and endpoints through their states, write the artifact SageMaker would write,
queue the endpoint's answers, and (in the moto process) add the missing UpdateEndpoint and the
name-uniqueness rule of CreateTrainingJob. Centroid itself only ever talks HTTP to the server.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import boto3
import httpx
import pytest
from botocore.awsrequest import AWSResponse
from botocore.retries.standard import ExponentialBackoff
from fastapi.testclient import TestClient
from moto.core.responses import ActionResult
from moto.moto_server.threaded_moto_server import ThreadedMotoServer
from moto.sagemaker.exceptions import ResourceInUseException
from moto.sagemaker.models import SageMakerModelBackend, sagemaker_backends
from moto.sagemaker.responses import SageMakerResponse

from service.backends.sagemaker import SageMakerBackend
from service.main import create_app
from service.settings import Settings
from workers.worker import Worker

ACCOUNT = "123456789012"
REGION = "us-east-1"
PREFIX = "centroid-test"
KMEANS_IMAGE_US_EAST_1 = "382416733822.dkr.ecr.us-east-1.amazonaws.com/kmeans:1"
BUCKET = "centroid-test-bucket"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/centroid-sagemaker"
FAKE_KEY_ID = "AKIAFAKEKEYID0000000"
FAKE_SECRET = "fake-secret-access-key-do-not-leak"
FAKE_TOKEN = "fake-session-token-do-not-leak"


# --- moto: the server, and the two SageMaker behaviours it lacks -----------------------------


def _update_endpoint(self: SageMakerResponse) -> ActionResult:
    """SageMaker's UpdateEndpoint: the endpoint goes Updating; the new config is pending."""
    endpoint = self.sagemaker_backend.endpoints[self._get_param("EndpointName")]
    endpoint.endpoint_status = "Updating"
    endpoint.pending_config = self._get_param("EndpointConfigName")
    return ActionResult({"EndpointArn": endpoint.arn})


def _unique_training_job(original: Callable[..., Any]) -> Callable[..., Any]:
    """SageMaker refuses a second CreateTrainingJob with the same name (moto overwrites)."""

    def create(self: SageMakerModelBackend, training_job_name: str, **kwargs: Any) -> Any:
        if training_job_name in self.training_jobs:
            raise ResourceInUseException(f"Training job names must be unique; {training_job_name} exists")
        return original(self, training_job_name=training_job_name, **kwargs)

    return create


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    logging.getLogger("werkzeug").setLevel(logging.CRITICAL)  # moto logs every request and its 500s
    patch = pytest.MonkeyPatch()
    patch.setattr(SageMakerResponse, "update_endpoint", _update_endpoint, raising=False)
    patch.setattr(
        SageMakerModelBackend, "create_training_job", _unique_training_job(SageMakerModelBackend.create_training_job)
    )
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        patch.undo()


@pytest.fixture
def database_url(tmp_path: Any) -> str:
    """SQLite only here: what these tests check is what Centroid sends to AWS and makes of the
    answers, which no database changes. The database's part of a remote job (leases, claims,
    NOTIFY wake-ups, the lease heartbeat) runs on PostgreSQL too in tests/workers and tests/db.
    Overrides the suite's fixture, which would run every test here once more on PostgreSQL (about
    90 s of CI for nothing new)."""
    return f"sqlite:///{tmp_path / 'centroid.db'}"


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """Fake credentials only; no profile or config file of the machine can leak in."""
    for name in (
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_ROLE_ARN",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_ENDPOINT_URL",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", FAKE_TOKEN)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def backoff_delays(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """botocore's retry backoff still decides and computes every delay; the test skips the sleep."""
    delays: list[float] = []
    original = ExponentialBackoff.delay_amount

    def recorded(self: ExponentialBackoff, context: Any) -> float:
        delays.append(original(self, context))
        return 0.0

    monkeypatch.setattr(ExponentialBackoff, "delay_amount", recorded)
    return delays


@pytest.fixture
def aws(moto_url: str, aws_env: None, backoff_delays: list[float]) -> Iterator[FakeSageMaker]:
    httpx.post(f"{moto_url}/moto-api/reset", timeout=10).raise_for_status()
    fake = FakeSageMaker(moto_url)
    fake.s3.create_bucket(Bucket=BUCKET)
    yield fake
    httpx.post(f"{moto_url}/moto-api/reset", timeout=10).raise_for_status()


@pytest.fixture
def sm_settings(settings: Settings, moto_url: str) -> Settings:
    return settings.model_copy(
        update={
            "aws_region": REGION,
            "sagemaker_role_arn": ROLE,
            "s3_bucket": BUCKET,
            "s3_prefix": PREFIX,
            "aws_endpoint_url": moto_url,
            "remote_poll_seconds": 0.001,
        }
    )


@pytest.fixture
def sm_client(sm_settings: Settings, aws: FakeSageMaker) -> Iterator[TestClient]:
    with TestClient(create_app(sm_settings)) as client:
        yield client


@pytest.fixture
def worker(sm_client: TestClient) -> Worker:
    return Worker(sm_client.app.state.centroid, worker_id="sm-worker-1")  # type: ignore[attr-defined]


def backend_of(client: TestClient) -> SageMakerBackend:
    return client.app.state.centroid.backends.get("sagemaker")  # type: ignore[attr-defined,no-any-return]


def poll(worker: Worker, times: int = 1) -> None:
    """Let the (tiny) poll delay pass, then one worker round, ``times`` times."""
    for _ in range(times):
        time.sleep(0.01)
        worker.run_once()


# --- playing SageMaker's part -------------------------------------------------------------------


class FakeSageMaker:
    """Test-side view of the moto server: AWS clients of its own plus moto's SageMaker state."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.s3 = boto3.client("s3", endpoint_url=url, region_name=REGION)
        self.sagemaker = boto3.client("sagemaker", endpoint_url=url, region_name=REGION)

    @property
    def state(self) -> SageMakerModelBackend:
        return sagemaker_backends[ACCOUNT][REGION]

    def training_job(self, name: str) -> Any:
        return self.state.training_jobs[name]

    def set_training(
        self,
        name: str,
        status: str,
        secondary: str,
        transitions: list[tuple[str, str]] = (),  # type: ignore[assignment]
        **fields: Any,
    ) -> None:
        """Set what DescribeTrainingJob reports (status, secondary status, transitions, ...)."""
        job = self.training_job(name)
        job.training_job_status, job.secondary_status = status, secondary
        start = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
        job.secondary_status_transitions = [
            {
                "Status": state,
                "StartTime": start.replace(minute=i),
                **({"EndTime": start.replace(minute=i + 1)} if i + 1 < len(transitions) else {}),
                "StatusMessage": message,
            }
            for i, (state, message) in enumerate(transitions)
        ]
        for key, value in fields.items():
            setattr(job, key, value)

    def artifact_location(self, name: str) -> tuple[str, str]:
        uri = self.training_job(name).model_artifacts["S3ModelArtifacts"]
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        return bucket, key

    def put_artifact(self, name: str, data: bytes) -> str:
        bucket, key = self.artifact_location(name)
        self.s3.put_object(Bucket=bucket, Key=key, Body=data)
        return f"s3://{bucket}/{key}"

    def get(self, key: str) -> bytes:
        return self.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()  # type: ignore[no-any-return]

    def keys(self, prefix: str = "") -> list[str]:
        listing = self.s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
        return sorted(item["Key"] for item in listing.get("Contents", []))

    def endpoint(self, name: str) -> Any:
        return self.state.endpoints[name]

    def set_endpoint(self, name: str, status: str, failure_reason: str | None = None) -> None:
        endpoint = self.endpoint(name)
        endpoint.endpoint_status, endpoint.failure_reason = status, failure_reason

    def finish_update(self, name: str) -> None:
        """The pending config takes over, as when SageMaker completes an UpdateEndpoint."""
        endpoint = self.endpoint(name)
        endpoint.endpoint_config_name, endpoint.endpoint_status = endpoint.pending_config, "InService"

    def roll_back(self, name: str, reason: str) -> None:
        """SageMaker could not deploy the new config and keeps the old one serving."""
        self.set_endpoint(name, "InService", reason)

    def queue_results(self, *bodies: dict[str, Any]) -> None:
        """What the next InvokeEndpoint calls answer (moto's documented configuration API)."""
        results = [{"Body": json.dumps(body), "ContentType": "application/json"} for body in bodies]
        response = httpx.post(
            f"{self.url}/moto-api/static/sagemaker/endpoint-results",
            json={"account_id": ACCOUNT, "region": REGION, "results": results},
            timeout=10,
        )
        response.raise_for_status()


# --- seeing and shaping what Centroid sends ---------------------------------------------------


@dataclass
class Calls:
    """API calls a client made: the exact parameters per call, and the HTTP attempts per call."""

    params: list[dict[str, Any]] = field(default_factory=list)
    attempts: int = 0


def record(client: Any, operation: str) -> Calls:
    """Record ``operation`` on a boto3 client (e.g. the backend's)."""
    calls = Calls()
    service = client.meta.service_model.service_id.hyphenize()

    def on_params(params: dict[str, Any], **_: Any) -> None:
        calls.params.append(
            json.loads(json.dumps(params, default=lambda v: v.decode() if isinstance(v, bytes) else str(v)))
        )

    def on_send(**_: Any) -> None:
        calls.attempts += 1

    client.meta.events.register(f"provide-client-params.{service}.{operation}", on_params)
    client.meta.events.register(f"before-send.{service}.{operation}", on_send)
    return calls


class _Raw:
    def __init__(self, body: bytes) -> None:
        self.body = body

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self.body


def inject_errors(client: Any, operation: str, status: int, code: str, times: int, **extra: Any) -> list[int]:
    """Answer the next ``times`` HTTP attempts of ``operation`` with an AWS JSON error, before the
    request leaves the client, so botocore's own retry logic sees a real error response."""
    service = client.meta.service_model.service_id.hyphenize()
    sent: list[int] = []

    def on_send(request: Any, **_: Any) -> AWSResponse | None:
        if len(sent) >= times:
            return None
        sent.append(status)
        body = json.dumps({"__type": code, "message": f"injected {code}", **extra}).encode()
        headers = {"x-amzn-errortype": code, "content-type": "application/x-amz-json-1.1"}
        return AWSResponse(request.url, status, headers, _Raw(body))

    client.meta.events.register_first(f"before-send.{service}.{operation}", on_send)
    return sent
