"""The training-job state machine: SageMaker's built-in KMeans, driven in short resumable steps.

The first call streams the feature matrix from Parquet to S3 as headerless CSV and calls
CreateTrainingJob; later calls poll DescribeTrainingJob and mirror it. On Completed the model
artifact is downloaded and read with the engine's reader, so the model is registered like a
local one (and can be served locally). Everything the next call needs is returned in ``remote``.
The worker heartbeats the job's lease during every call, so a long upload keeps its lease; the
upload asks ``hooks.should_stop()`` between pieces and is abandoned (the multipart upload
aborted) when the job is stopped, the lease lost or the worker shutting down.

The job options (``spec.resource_config``, checked when the job was created) become
CreateTrainingJob's fields: ``ResourceConfig`` (``InstanceType``, ``InstanceCount``,
``VolumeSizeInGB``, ``VolumeKmsKeyId``), ``StoppingCondition`` (``MaxRuntimeInSeconds``,
``MaxWaitTimeInSeconds``), ``EnableManagedSpotTraining``, ``CheckpointConfig``, ``VpcConfig``,
``OutputDataConfig.KmsKeyId`` and ``AlgorithmSpecification.TrainingInputMode``; a field is sent
only when its option is set (or has a setting as its default). ``InstanceCount`` is the number of
objects the training data was written as, never more: ``ShardedByS3Key`` hands whole objects to
instances, so an instance without one would get no data (see :func:`upload_dataset`).

The ``HyperParameters`` sent are the job's, SageMaker-only keys (``force_dense``, ``_num_gpus``,
...) included exactly as given. The model's metrics are SageMaker's ``FinalMetricDataList``
quality metrics under SageMaker's names (``train:msd``, ``test:msd``, ``test:ssd``), plus the
full-pass training figures (``train:msd_full_pass``, ...) Centroid computes itself from the
artifact's centroids and the training data when that pass fits in a third of the worker's lease
(so one poll does not hold a worker for long); otherwise they are left out and the job's message
says so.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from service.backends.base import (
    BackendNotConfigured,
    DatasetInput,
    TrainedModel,
    TrainingHooks,
    TrainingSpec,
    TrainingUpdate,
)
from service.backends.sagemaker.client import AWS_FAILURES, AwsContext, NotFound, Permanent, aws_call, failure_text
from service.backends.sagemaker.naming import kmeans_image
from service.backends.sagemaker.s3 import UploadInterrupted, download_artifact, s3_uri, upload_dataset, write_manifest
from service.engine import EngineInputError, ModelFormatError, TrainingStopped, read_model_tar
from service.engine.metrics import SAGEMAKER_QUALITY_METRICS, full_pass_metrics
from service.engine.webscale import evaluate
from service.statuses import JobStatus, SecondaryStatus

log = logging.getLogger("centroid.sagemaker")

TRAIN_CONTENT_TYPE = "text/csv;label_size=0"
MAX_STOP_ATTEMPTS = 5
RESOURCE_IN_USE = "ResourceInUse"  # CreateTrainingJob's answer when the name is taken
#: Where a job's data was put (:meth:`TrainingJobs.upload_data`): given in ``spec.remote``, it is used as is.
DATA_KEYS = ("train_s3_uri", "train_objects", "train_manifest", "train_data", "test_s3_uri", "test_manifest")


def _iso(value: Any) -> str | None:
    return value.isoformat() if hasattr(value, "isoformat") else value


def _final_metrics(described: dict[str, Any]) -> dict[str, float]:
    """SageMaker's quality metrics from ``FinalMetricDataList``, under SageMaker's names."""
    return {
        str(item["MetricName"]): float(item["Value"])
        for item in described.get("FinalMetricDataList") or []
        if item.get("MetricName") in SAGEMAKER_QUALITY_METRICS and "Value" in item
    }


def _transitions(described: dict[str, Any]) -> list[dict[str, Any]] | None:
    entries = described.get("SecondaryStatusTransitions") or []
    return [
        {
            "status": entry.get("Status"),
            "start_time": _iso(entry.get("StartTime")),
            "end_time": _iso(entry.get("EndTime")),
            "message": entry.get("StatusMessage"),
        }
        for entry in entries
    ] or None


def _status_message(described: dict[str, Any]) -> str:
    transitions = described.get("SecondaryStatusTransitions") or []
    last = transitions[-1].get("StatusMessage") if transitions else None
    return str(last or f"SageMaker: {described['TrainingJobStatus']} / {described.get('SecondaryStatus', '')}")


def _channel(name: str, uri: str, distribution: str, data_type: str = "S3Prefix") -> dict[str, Any]:
    return {
        "ChannelName": name,
        "DataSource": {"S3DataSource": {"S3DataType": data_type, "S3Uri": uri, "S3DataDistributionType": distribution}},
        "ContentType": TRAIN_CONTENT_TYPE,
        "CompressionType": "None",
    }


def _data_note(remote: dict[str, Any]) -> str:
    """What the status message says about a dataset in S3: read in place, or converted."""
    if remote.get("train_data") == "direct":
        return "; the training data is read in place from the dataset's S3 objects (listed in a manifest)"
    if remote.get("train_data") == "converted":
        return "; the dataset's S3 objects were converted once to headerless CSV of the job's features"
    return ""


def _instance_note(remote: dict[str, Any]) -> str:
    """What the job's status message says when fewer instances were asked for than configured."""
    requested = remote.get("instance_count_requested")
    if not requested:
        return ""
    rows = remote["train_objects"]
    return (
        f" on {remote['instance_count']} instances instead of the {requested} configured: the training data has "
        f"{rows} rows, written as one S3 object per instance (the train channel is ShardedByS3Key, which hands whole "
        "objects to instances), so more instances would get no data"
    )


def _fail(update: TrainingUpdate, reason: str) -> None:
    update.status, update.secondary_status, update.failure_reason = JobStatus.FAILED, SecondaryStatus.FAILED, reason
    update.transitions = None


class TrainingJobs:
    """Submits training jobs to SageMaker and mirrors their progress."""

    def __init__(self, aws: AwsContext) -> None:
        self.aws = aws

    def advance(
        self, spec: TrainingSpec, hooks: TrainingHooks | None = None, *, full_pass: bool = True
    ) -> TrainingUpdate:
        """Submit the job on the first call; afterwards mirror DescribeTrainingJob. ``hooks``
        (the worker's) say when an upload in progress should be abandoned."""
        submitted = bool(spec.remote.get("training_job_name"))
        try:
            self.aws.ensure_configured()
        except BackendNotConfigured as exc:
            if submitted:
                raise  # the job runs on SageMaker: keep it, poll again once the settings are back
            return TrainingUpdate.failed(f"the sagemaker backend is not configured: {exc}")
        try:
            if not submitted:
                if spec.stop_requested:
                    return TrainingUpdate.stopped("stopped before submission")
                return self._submit(spec, hooks)
            return self._poll(spec, full_pass=full_pass)
        except Permanent as exc:
            return TrainingUpdate.failed(str(exc))

    def stop(self, spec: TrainingSpec) -> None:
        """Send StopTrainingJob; a failure is logged and the stop re-sent while SageMaker trains on."""
        name = spec.remote.get("training_job_name")
        if name:
            self.send_stop(str(name))

    # --- submission ---------------------------------------------------------------------------

    def _submit(self, spec: TrainingSpec, hooks: TrainingHooks | None) -> TrainingUpdate:
        settings = self.aws.settings
        image = kmeans_image(str(settings.aws_region))
        remote: dict[str, Any] = {
            **{key: spec.remote[key] for key in DATA_KEYS if key in spec.remote},
            "training_job_name": spec.job_name,
            "region": settings.aws_region,
            "output_s3_uri": s3_uri(self.aws.bucket, self.aws.key(spec.job_name, "output")),
        }
        existing = self._adopt(spec.job_name, remote["output_s3_uri"])  # before uploading anything
        try:
            remote["training_job_arn"] = existing or self._create_training_job(spec, image, remote, hooks)
        except UploadInterrupted as exc:
            log.info("abandoned the upload of %s: %s", spec.job_name, exc)
            return TrainingUpdate.stopped(f"stopped while uploading the training data, before submission ({exc})")
        log.info("submitted SageMaker training job", extra={"job": spec.job_name, "image": image})
        return TrainingUpdate.running(
            SecondaryStatus.STARTING,
            message=f"submitted to SageMaker as training job {spec.job_name}"
            + _instance_note(remote)
            + _data_note(remote),
            remote={**remote, "polls": 0},
            poll_after_seconds=self.aws.poll_delay(0),
        )

    def _create_training_job(
        self, spec: TrainingSpec, image: str, remote: dict[str, Any], hooks: TrainingHooks | None
    ) -> str:
        """Upload the data, then CreateTrainingJob; returns the job's ARN. ``InstanceCount`` is the
        number of objects the training data became (fewer than asked when there are fewer rows)."""
        requested = int(spec.resource_config.get("instance_count") or self.aws.settings.training_instance_count)
        if "train_s3_uri" not in remote:  # not uploaded already (a sweep's trainings share one upload)
            should_stop = hooks.should_stop if hooks is not None else None
            remote.update(self.upload_data(spec.job_name, spec.train, spec.test, requested, should_stop))
        instance_count = remote["instance_count"] = min(requested, int(remote["train_objects"]))
        if instance_count < requested:
            remote["instance_count_requested"] = requested
        request = self._training_request(spec, image, remote, instance_count)
        create = self.aws.client("sagemaker").create_training_job
        try:
            return str(aws_call("SageMaker refused CreateTrainingJob", create, **request)["TrainingJobArn"])
        except Permanent as exc:
            if exc.code == RESOURCE_IN_USE:  # created meanwhile (another worker after a lease expiry)
                adopted = self._adopt(spec.job_name, remote["output_s3_uri"])
                if adopted is not None:
                    return adopted
            raise

    def upload_data(
        self,
        name: str,
        train: DatasetInput,
        test: DatasetInput | None,
        shards: int,
        should_stop: Callable[[], bool] | None,
    ) -> dict[str, Any]:
        """Put the training (and test) data where SageMaker reads it, under ``<prefix>/<name>/``:
        a manifest of a dataset's own S3 objects when they can be read as they are, else
        headerless CSV in ``shards`` objects. Returns the :data:`DATA_KEYS` a job's ``remote``
        keeps (raises :class:`UploadInterrupted` when ``should_stop`` says so)."""
        data: dict[str, Any] = {}
        if train.direct_s3_uri is not None:
            data["train_s3_uri"], data["train_objects"] = write_manifest(self.aws, name, train, "train")
            data["train_manifest"] = True
            data["train_data"] = "direct"
        else:
            data["train_s3_uri"], data["train_objects"] = upload_dataset(
                self.aws, name, train, "train", shards, should_stop=should_stop
            )
            if train.s3 is not None:
                data["train_data"] = "converted"
        if test is not None and test.direct_s3_uri is not None:
            data["test_s3_uri"], _ = write_manifest(self.aws, name, test, "test")
            data["test_manifest"] = True
        elif test is not None:
            data["test_s3_uri"], _ = upload_dataset(self.aws, name, test, "test", 1, should_stop=should_stop)
        return data

    def _adopt(self, job_name: str, output_uri: str) -> str | None:
        """The ARN of an existing job by this name if it is ours (a worker died after creating it:
        same output path); a foreign job by this name fails ours; None when there is none."""
        describe = self.aws.client("sagemaker").describe_training_job
        try:
            described = aws_call("SageMaker refused DescribeTrainingJob", describe, TrainingJobName=job_name)
        except NotFound:
            return None
        if described.get("OutputDataConfig", {}).get("S3OutputPath", "").rstrip("/") != output_uri:
            raise Permanent(
                f"a SageMaker training job named {job_name!r} already exists in this account and region "
                "and was not started by this Centroid; choose another job name"
            )
        log.info("training job %s already exists on SageMaker; resuming it", job_name)
        return str(described["TrainingJobArn"])

    def _training_request(
        self, spec: TrainingSpec, image: str, remote: dict[str, Any], instance_count: int
    ) -> dict[str, Any]:
        settings = self.aws.settings
        hyperparameters = spec.hyperparameters.to_sagemaker()
        hyperparameters["feature_dim"] = str(len(spec.train.columns))
        manifest = "ManifestFile"
        channels = [
            _channel(
                "train",
                remote["train_s3_uri"],
                "ShardedByS3Key",
                manifest if remote.get("train_manifest") else "S3Prefix",
            )
        ]
        if "test_s3_uri" in remote:
            kind = manifest if remote.get("test_manifest") else "S3Prefix"
            channels.append(_channel("test", remote["test_s3_uri"], "FullyReplicated", kind))
        config = spec.resource_config
        output: dict[str, Any] = {"S3OutputPath": remote["output_s3_uri"]}
        if config.get("output_kms_key_id"):
            output["KmsKeyId"] = config["output_kms_key_id"]
        resources: dict[str, Any] = {
            "InstanceType": config.get("instance_type") or settings.training_instance_type,
            "InstanceCount": instance_count,
            "VolumeSizeInGB": int(config.get("volume_size_gb") or settings.training_volume_gb),
        }
        if config.get("volume_kms_key_id"):
            resources["VolumeKmsKeyId"] = config["volume_kms_key_id"]
        stopping = {"MaxRuntimeInSeconds": int(config.get("max_runtime_seconds") or settings.max_runtime_seconds)}
        request: dict[str, Any] = {
            "TrainingJobName": spec.job_name,
            "AlgorithmSpecification": {
                "TrainingImage": image,
                "TrainingInputMode": config.get("input_mode") or "File",
            },
            "RoleArn": settings.sagemaker_role_arn,
            "HyperParameters": hyperparameters,
            "InputDataConfig": channels,
            "OutputDataConfig": output,
            "ResourceConfig": resources,
            "StoppingCondition": stopping,
            "Tags": [{"Key": "centroid:training-job", "Value": spec.job_name}],
        }
        if config.get("enable_managed_spot_training"):
            request["EnableManagedSpotTraining"] = True
            stopping["MaxWaitTimeInSeconds"] = int(config.get("max_wait_seconds") or stopping["MaxRuntimeInSeconds"])
        if config.get("checkpoint_s3_uri"):
            request["CheckpointConfig"] = {"S3Uri": config["checkpoint_s3_uri"]}
        vpc = config.get("vpc_config")
        if vpc:
            request["VpcConfig"] = {
                "SecurityGroupIds": list(vpc["security_group_ids"]),
                "Subnets": list(vpc["subnets"]),
            }
        return request

    # --- following the job --------------------------------------------------------------------

    def _poll(self, spec: TrainingSpec, *, full_pass: bool = True) -> TrainingUpdate:
        name = spec.remote["training_job_name"]
        polls = int(spec.remote.get("polls", 0)) + 1
        describe = self.aws.client("sagemaker").describe_training_job
        try:
            described = aws_call(None, describe, TrainingJobName=name)
        except NotFound as exc:
            return TrainingUpdate.failed(f"the SageMaker training job {name!r} no longer exists ({exc.detail})")
        reported = str(described["TrainingJobStatus"])
        status = JobStatus(reported)
        update = TrainingUpdate(
            status=status,
            secondary_status=str(described.get("SecondaryStatus") or reported),
            message=_status_message(described),
            failure_reason=described.get("FailureReason"),
            training_seconds=described.get("TrainingTimeInSeconds"),
            billable_seconds=described.get("BillableTimeInSeconds"),
            remote={"polls": polls, "sagemaker_status": reported},
            transitions=_transitions(described),
            poll_after_seconds=self.aws.poll_delay(polls),
        )
        if status == JobStatus.FAILED and not update.failure_reason:
            update.failure_reason = "SageMaker reported the training job Failed without a reason"
        if status == JobStatus.IN_PROGRESS and spec.stop_requested:
            self._keep_stopping(spec, update)
        if status == JobStatus.COMPLETED:
            self._collect(spec, described, update, full_pass=full_pass)
        return update

    def _keep_stopping(self, spec: TrainingSpec, update: TrainingUpdate) -> None:
        """Stop was asked but SageMaker still trains: show Stopping, and re-send a lost stop."""
        attempts = int(spec.remote.get("stop_attempts", 0))
        if attempts and attempts < MAX_STOP_ATTEMPTS:
            self.send_stop(spec.remote["training_job_name"])
        update.status, update.secondary_status = JobStatus.STOPPING, SecondaryStatus.STOPPING
        update.message = "stop requested; waiting for SageMaker to stop the training job"
        update.remote["stop_attempts"] = attempts + 1

    def _collect(
        self, spec: TrainingSpec, described: dict[str, Any], update: TrainingUpdate, *, full_pass: bool = True
    ) -> None:
        """Download and read the artifact; an unusable one fails the job (the worker registers it).
        ``full_pass``: also compute the full-pass training metrics (a sweep evaluates every k itself)."""
        uri = str(described.get("ModelArtifacts", {}).get("S3ModelArtifacts") or "")
        if not uri:
            _fail(update, "SageMaker reported the job Completed but named no model artifact")
            return
        try:
            artifact = download_artifact(self.aws, uri)
            centroids = read_model_tar(artifact)
        except Permanent as exc:
            _fail(update, str(exc))
            return
        except ModelFormatError as exc:
            _fail(update, f"the model artifact at {uri} is not a usable KMeans model.tar.gz: {exc}")
            return
        expected = (spec.hyperparameters.k, len(spec.train.columns))
        if centroids.shape != expected:
            _fail(update, f"the model artifact at {uri} holds {centroids.shape} centroids, expected {expected}")
            return
        metrics = _final_metrics(described)
        skipped = None
        if full_pass:
            figures, skipped = self._full_pass(spec, centroids)
            metrics |= figures
        update.remote["model_artifact_s3_uri"] = uri
        update.message = "training job completed on SageMaker" + (f"; {skipped}" if skipped else "")
        update.result = TrainedModel(
            centroids=centroids, artifact=artifact, metrics=metrics, cluster_sizes=None, engine_version=None, seed=None
        )

    def _full_pass(self, spec: TrainingSpec, centroids: np.ndarray) -> tuple[dict[str, float], str | None]:
        """The full-pass training metrics of SageMaker's centroids, computed here from the training
        data; ({}, why) when the data cannot be read or the pass would outlast a third of the lease."""
        budget = self.aws.settings.lease_seconds / 3
        deadline = time.monotonic() + budget
        try:
            totals = evaluate(
                spec.train.batch_source(),
                centroids,
                batch_size=spec.hyperparameters.mini_batch_size,
                should_stop=lambda: time.monotonic() > deadline,
            )
        except TrainingStopped:
            return (
                {},
                f"full-pass training metrics not computed: the pass outlasted a third of the lease ({budget:.3g} s)",
            )
        except (EngineInputError, OSError, ValueError) as exc:  # pyarrow's errors are OSError or ValueError
            log.warning("full-pass metrics of %s not computed: %s", spec.job_name, exc)
            return {}, "full-pass training metrics not computed: the training data could not be read"
        return full_pass_metrics(totals.msd, totals.ssd, spec.hyperparameters.eval_metrics), None

    def send_stop(self, name: str) -> None:
        try:
            self.aws.client("sagemaker").stop_training_job(TrainingJobName=name)
            log.info("asked SageMaker to stop training job %s", name)
        except AWS_FAILURES as exc:
            log.warning("StopTrainingJob %s failed (%s); will retry while it still runs", name, failure_text(exc))
