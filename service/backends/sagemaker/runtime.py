"""Invocations: rows go to ``sagemaker-runtime`` InvokeEndpoint as CSV (in payload-sized chunks)
and SageMaker KMeans's JSON answer comes back as the same :class:`Prediction` local endpoints give.

Unlike training and endpoint changes, an invocation answers an HTTP request now: a failure is a
client error (the endpoint rejected the input) or the service being unavailable, never a retry.
"""

from __future__ import annotations

import json

import numpy as np
from botocore.exceptions import BotoCoreError, ClientError

from service.backends.base import EndpointSpec
from service.backends.sagemaker.client import AwsContext, error_code, failure_text
from service.engine import Prediction
from service.errors import InvalidInput, ServiceUnavailable

INVOKE_MAX_BYTES = 5_000_000  # InvokeEndpoint accepts 6 MB payloads; stay below
MODEL_ERROR = "ModelError"  # InvokeEndpoint's answer when the model container failed the request


def features_csv(features: np.ndarray) -> list[bytes]:
    """Rows as CSV (shortest round-trip floats), in chunks below InvokeEndpoint's payload limit."""
    chunks: list[bytes] = []
    current: list[str] = []
    size = 0
    for row in np.asarray(features, dtype=np.float64):
        line = ",".join(repr(float(value)) for value in row) + "\n"
        if current and size + len(line) > INVOKE_MAX_BYTES:
            chunks.append("".join(current).encode())
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current:
        chunks.append("".join(current).encode())
    return chunks


def parse_predictions(body: bytes, rows: int) -> Prediction:
    """SageMaker KMeans's ``{"predictions": [{"closest_cluster", "distance_to_cluster"}, ...]}``."""
    try:
        items = json.loads(body)["predictions"]
        clusters = np.array([item["closest_cluster"] for item in items], dtype=np.float64)
        distances = np.array([item["distance_to_cluster"] for item in items], dtype=np.float64)
    except (ValueError, KeyError, TypeError) as exc:
        raise ServiceUnavailable(f"the SageMaker endpoint returned an unreadable response: {exc!s:.200}") from exc
    if len(clusters) != rows:
        raise ServiceUnavailable(f"the SageMaker endpoint returned {len(clusters)} predictions for {rows} rows")
    return Prediction(closest_cluster=clusters.astype(np.int64), distance_to_cluster=distances)


def invoke(aws: AwsContext, spec: EndpointSpec, features: np.ndarray) -> Prediction:
    """InvokeEndpoint with CSV rows (in payload-sized chunks); the same shape local endpoints give."""
    name = str(spec.remote.get("endpoint_name") or spec.name)
    pieces: list[Prediction] = []
    for body in features_csv(features):
        rows = body.count(b"\n")
        payload = _invoke_once(aws, name, body)
        pieces.append(parse_predictions(payload, rows))
    if not pieces:
        return Prediction(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64))
    return Prediction(
        closest_cluster=np.concatenate([p.closest_cluster for p in pieces]),
        distance_to_cluster=np.concatenate([p.distance_to_cluster for p in pieces]),
    )


def _invoke_once(aws: AwsContext, name: str, body: bytes) -> bytes:
    try:
        response = aws.client("sagemaker-runtime").invoke_endpoint(
            EndpointName=name, ContentType="text/csv", Accept="application/json", Body=body
        )
        return bytes(response["Body"].read())
    except ClientError as exc:  # the container's own status code tells bad input from a broken model
        original = int(exc.response.get("OriginalStatusCode") or 0)
        if error_code(exc) == MODEL_ERROR and 400 <= original < 500:
            raise InvalidInput(f"the SageMaker endpoint rejected the input: {failure_text(exc)}") from exc
        raise ServiceUnavailable(f"the SageMaker endpoint {name!r} failed: {failure_text(exc)}") from exc
    except BotoCoreError as exc:
        raise ServiceUnavailable(f"the SageMaker endpoint {name!r} is unreachable: {type(exc).__name__}") from exc
