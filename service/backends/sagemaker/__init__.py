"""Amazon SageMaker backend: built-in KMeans training jobs and real-time endpoints through boto3.

The worker drives it in short, resumable steps (see :mod:`service.backends.base`); every name is
derived from the job, endpoint and model, and everything the next call needs is returned in
``remote`` (stored by the worker), so a worker may die between any two calls. The parts:

* :mod:`~service.backends.sagemaker.client`: boto3 clients, and :func:`aws_call`, which sorts AWS
  failures into transient ones (raised again: the worker retries) and permanent ones (the job or
  endpoint ends ``Failed`` with a reason that says what to fix);
* :mod:`~service.backends.sagemaker.naming`: names of the SageMaker resources, the KMeans image;
* :mod:`~service.backends.sagemaker.s3`: training data and model artifacts in S3;
* :mod:`~service.backends.sagemaker.training`: the training-job state machine;
* :mod:`~service.backends.sagemaker.sweeps`: a sweep as one training job per k;
* :mod:`~service.backends.sagemaker.endpoints`: the endpoint state machine;
* :mod:`~service.backends.sagemaker.runtime`: InvokeEndpoint.

Only this package imports boto3 (importing it loads boto3: :func:`service.state.build_backends`
does, where the backends are put together); credentials come from boto3's standard chain and
never appear in logs, statuses or errors.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from service.backends.base import (
    BackendStatus,
    EndpointSpec,
    EndpointUpdate,
    SweepSpec,
    SweepUpdate,
    TrainingHooks,
    TrainingSpec,
    TrainingUpdate,
)
from service.backends.sagemaker.client import AwsContext
from service.backends.sagemaker.endpoints import Endpoints
from service.backends.sagemaker.naming import kmeans_image
from service.backends.sagemaker.runtime import features_csv, invoke, parse_predictions
from service.backends.sagemaker.sweeps import SweepJobs
from service.backends.sagemaker.training import TrainingJobs
from service.engine import Prediction
from service.settings import Settings

__all__ = ["NAME", "SageMakerBackend", "features_csv", "kmeans_image", "parse_predictions"]

NAME = "sagemaker"


class SageMakerBackend:
    """Train with SageMaker's built-in KMeans and serve on SageMaker real-time endpoints."""

    name = NAME
    trains_in_process = False

    def __init__(self, settings: Settings) -> None:
        """No network here: clients are created on first use, so an unconfigured backend costs nothing."""
        self._aws = AwsContext(settings)
        self._training = TrainingJobs(self._aws)
        self._sweeps = SweepJobs(self._aws, self._training)
        self._endpoints = Endpoints(self._aws)

    @property
    def settings(self) -> Settings:
        return self._aws.settings

    @settings.setter
    def settings(self, value: Settings) -> None:
        self._aws.settings = value

    @property
    def _clients(self) -> dict[str, Any]:
        return self._aws.clients

    def client(self, service: str, *, probe: bool = False) -> Any:
        """The backend's cached boto3 client for ``service`` (see :meth:`AwsContext.client`)."""
        return self._aws.client(service, probe=probe)

    def _poll_delay(self, polls: int) -> float:
        return self._aws.poll_delay(polls)

    # --- configuration ------------------------------------------------------------------------

    def missing_settings(self) -> list[str]:
        return self._aws.missing_settings()

    def ensure_configured(self) -> None:
        """Cheap (no network): the settings a job or endpoint needs are present."""
        self._aws.ensure_configured()

    def status(self) -> BackendStatus:
        """Configured = settings present and the bucket reachable with the credentials in effect."""
        settings = self._aws.public_settings()
        missing = self.missing_settings()
        if missing:
            return BackendStatus(self.name, False, f"missing settings: {', '.join(missing)}", settings)
        problem = self._aws.bucket_problem()
        if problem is not None:
            return BackendStatus(self.name, False, problem, settings)
        return BackendStatus(
            self.name, True, f"trains and serves on Amazon SageMaker in {self.settings.aws_region}", settings
        )

    # --- the work -----------------------------------------------------------------------------

    def advance_training(self, spec: TrainingSpec, hooks: TrainingHooks) -> TrainingUpdate:
        """Submit the job on the first call; afterwards mirror DescribeTrainingJob. An upload asks
        ``hooks.should_stop()`` between pieces (the worker heartbeats the lease meanwhile)."""
        return self._training.advance(spec, hooks)

    def stop_training(self, spec: TrainingSpec) -> None:
        """Send StopTrainingJob; a failure is logged and the stop re-sent while SageMaker trains on."""
        self._training.stop(spec)

    def advance_sweep(self, spec: SweepSpec, hooks: TrainingHooks) -> SweepUpdate:
        """One training job per k (at most ``sweep_parallel_training_jobs`` at once), then every k
        evaluated here: see :mod:`~service.backends.sagemaker.sweeps`. Each job is billed."""
        return self._sweeps.advance(spec, hooks)

    def stop_sweep(self, spec: SweepSpec) -> None:
        """StopTrainingJob for each of the sweep's jobs in flight."""
        self._sweeps.stop(spec)

    def advance_endpoint(self, spec: EndpointSpec) -> EndpointUpdate:
        """Create the endpoint, or switch it to ``spec.model``, and report until InService."""
        return self._endpoints.advance(spec)

    def delete_endpoint(self, spec: EndpointSpec) -> EndpointUpdate:
        """Delete the endpoint, wait until it is gone, then its configs and models."""
        return self._endpoints.delete(spec)

    def invoke(self, spec: EndpointSpec, features: np.ndarray) -> Prediction:
        """InvokeEndpoint with CSV rows (in payload-sized chunks); the same shape local endpoints give."""
        return invoke(self._aws, spec, features)
