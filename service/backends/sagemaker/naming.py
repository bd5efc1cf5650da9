"""Names of the SageMaker resources Centroid creates, and the KMeans image they run.

Every name is derived from the job, endpoint and model, so a retry (or another worker) finds
what an earlier call created. SageMaker names are at most 63 characters.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache

from service.backends.sagemaker.client import Permanent

MAX_NAME = 63
STEM_MAX = 38  # 38 + "-" + a 24-character model id = 63


def name_stem(endpoint: str) -> str:
    """The start of every config/model name of ``endpoint``: the name itself, or for long names a
    cut plus a hash, so ``<stem>-<model id>`` stays within SageMaker's 63 characters."""
    if len(endpoint) <= STEM_MAX:
        return endpoint
    digest = hashlib.sha1(endpoint.encode()).hexdigest()[:8]
    return f"{endpoint[: STEM_MAX - len(digest) - 1].rstrip('-')}-{digest}"


def sweep_training_job_name(sweep: str, k: int) -> str:
    """The training job of ``k`` in ``sweep``: ``<sweep>-k<k>``, the sweep's name cut and hashed
    when that would pass SageMaker's 63 characters (distinct sweeps keep distinct names)."""
    suffix = f"-k{k}"
    if len(sweep) + len(suffix) <= MAX_NAME:
        return f"{sweep}{suffix}"
    digest = hashlib.sha1(sweep.encode()).hexdigest()[:8]
    room = MAX_NAME - len(suffix) - len(digest) - 1
    return f"{sweep[:room].rstrip('-')}-{digest}{suffix}"


def derived_name(endpoint: str, model_id: str) -> str:
    """Model and endpoint-config name for ``model_id`` on ``endpoint`` (the same for both)."""
    suffix = re.sub(r"[^A-Za-z0-9-]", "-", model_id).strip("-")
    return f"{name_stem(endpoint)}-{suffix}"[:MAX_NAME].rstrip("-")


@dataclass(frozen=True)
class Deployment:
    """The SageMaker names serving one model on one endpoint (model and config share the name)."""

    endpoint: str
    config: str
    model: str


@lru_cache(maxsize=16)
def kmeans_image(region: str) -> str:
    """The built-in KMeans image for ``region``, from the SageMaker SDK's image catalogue (offline)."""
    from sagemaker.core import image_uris  # imported lazily: it takes a second to import

    try:
        return str(image_uris.retrieve("kmeans", region))
    except ValueError as exc:
        raise Permanent(f"SageMaker has no KMeans image for region {region!r}: {exc}") from exc
