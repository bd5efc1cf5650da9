"""The embedded backend: trains with Centroid's engine in the worker, serves in the API process.

A model stores the metrics SageMaker would report for the same job, under SageMaker's names
(``train:msd``, and ``test:msd`` / ``test:ssd`` as ``eval_metrics`` asks), plus the full-pass
training figures (``train:msd_full_pass``, ...; see ``service.engine.metrics``). SageMaker-only
keys of the hyperparameters (``force_dense``, ``_num_gpus``, ...) have no effect here.

A dataset registered from S3 is streamed from its objects (pyarrow's S3 filesystem, one row group
or CSV block at a time), exactly as a stored dataset is streamed from its Parquet file: the same
rows give the same batches, and so the same model for the same seed."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from service.backends.base import (
    BackendStatus,
    EndpointSpec,
    EndpointUpdate,
    SweepSpec,
    SweepUpdate,
    TrainedModel,
    TrainingHooks,
    TrainingSpec,
    TrainingUpdate,
)
from service.engine import (
    ENGINE_VERSION,
    EngineInputError,
    HyperparameterError,
    ModelFormatError,
    Prediction,
    TrainingStopped,
    WebScaleKMeans,
    read_model_tar,
    sweep,
    write_model_tar,
)
from service.statuses import EndpointStatus


class LocalBackend:
    """No cloud account needed: the worker runs the engine, endpoints predict in-process."""

    name = "local"
    trains_in_process = True

    def status(self) -> BackendStatus:
        return BackendStatus(self.name, True, "trains in the worker process and serves in the API process")

    def ensure_configured(self) -> None:
        """Always usable."""

    def advance_training(self, spec: TrainingSpec, hooks: TrainingHooks) -> TrainingUpdate:
        """Run the whole training now; the worker heartbeats and watches for a stop meanwhile."""
        started = time.monotonic()
        estimator = WebScaleKMeans.from_hyperparameters(spec.hyperparameters)
        try:
            train = spec.train.batch_source()
            test = spec.test.batch_source() if spec.test else None
            estimator.fit(train, test=test, progress=hooks.progress, should_stop=hooks.should_stop)
        except TrainingStopped as stopped:
            message = f"stopped after {stopped.points_processed} points"
            return _timed(TrainingUpdate.stopped(message, points_processed=stopped.points_processed), started)
        except (EngineInputError, HyperparameterError) as exc:
            return _timed(TrainingUpdate.failed(str(exc)), started)
        except (OSError, pa.ArrowInvalid) as exc:  # S3 objects gone or refused; a CSV value not of its type
            if spec.train.s3 is None and (spec.test is None or spec.test.s3 is None):
                raise
            return _timed(TrainingUpdate.failed(f"the data in S3 could not be read: {exc}"), started)
        centers = estimator.cluster_centers_
        metrics = estimator.metrics_
        completed = TrainingUpdate.completed(
            message="training job completed",
            result=TrainedModel(
                centroids=centers,
                artifact=write_model_tar(centers, estimator.state_),
                metrics=metrics.reported(spec.hyperparameters.eval_metrics),
                cluster_sizes=list(metrics.cluster_sizes),
                engine_version=ENGINE_VERSION,
                seed=spec.hyperparameters.seed,
            ),
        )
        return _timed(completed, started)

    def stop_training(self, spec: TrainingSpec) -> None:
        """Local training notices ``stop_requested`` through the worker's hooks (the engine asks
        between slices of every long step); nothing to send."""

    def advance_sweep(self, spec: SweepSpec, hooks: TrainingHooks) -> SweepUpdate:
        """The engine's one-pass sweep (every k from one streaming pass), run now; the worker
        heartbeats and watches for a stop meanwhile."""
        try:
            result = sweep(
                spec.train.batch_source(),
                spec.ks,
                spec.hyperparameters,
                test=spec.test.batch_source() if spec.test else None,
                sample_size=spec.sample_size,
                progress=hooks.progress,
                should_stop=hooks.should_stop,
            )
        except TrainingStopped as stopped:
            return SweepUpdate.stopped(f"stopped after {stopped.points_processed} rows")
        except (EngineInputError, HyperparameterError) as exc:
            return SweepUpdate.failed(str(exc))
        except (OSError, pa.ArrowInvalid) as exc:
            if spec.train.s3 is None and (spec.test is None or spec.test.s3 is None):
                raise
            return SweepUpdate.failed(f"the data in S3 could not be read: {exc}")
        return SweepUpdate.completed(result)

    def stop_sweep(self, spec: SweepSpec) -> None:
        """A local sweep notices ``stop_requested`` through the worker's hooks; nothing to send."""

    def advance_endpoint(self, spec: EndpointSpec) -> EndpointUpdate:
        """Check the model's artifact loads and matches its centroids; then it can serve."""
        try:
            centers = read_model_tar(spec.model.artifact())
        except (ModelFormatError, OSError) as exc:
            return EndpointUpdate.failed(f"model artifact unusable: {exc}")
        if centers.shape != spec.model.centroids.shape:
            return EndpointUpdate.failed(
                f"model artifact holds {centers.shape} centroids, expected {spec.model.centroids.shape}"
            )
        return EndpointUpdate(EndpointStatus.IN_SERVICE)

    def delete_endpoint(self, spec: EndpointSpec) -> EndpointUpdate:
        return EndpointUpdate.deleted()

    def invoke(self, spec: EndpointSpec, features: np.ndarray) -> Prediction:
        """``features`` is a finite float64 matrix of the model's width (the serving path checks)."""
        return spec.model.index.predict(features)


def _timed(update: TrainingUpdate, started: float) -> TrainingUpdate:
    """Local training is billed for exactly the time the worker spent on it."""
    update.training_seconds = update.billable_seconds = round(time.monotonic() - started, 3)
    return update
