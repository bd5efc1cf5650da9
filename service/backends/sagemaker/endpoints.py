"""The endpoint state machine: SageMaker real-time endpoints, driven in short resumable steps.

The model's ``model.tar.gz`` is put in S3, then CreateModel, CreateEndpointConfig and
CreateEndpoint (UpdateEndpoint for a switch to another model); DescribeEndpoint is polled until
InService. Deleting removes the endpoint, waits until it is gone, then removes every config and
model it may have created. Everything the next call needs is returned in ``remote``.
"""

from __future__ import annotations

import logging
from typing import Any

from service.backends.base import EndpointSpec, EndpointUpdate
from service.backends.sagemaker.client import AwsContext, NotFound, Permanent, aws_call, exists, tolerant
from service.backends.sagemaker.naming import Deployment, derived_name, kmeans_image, name_stem
from service.backends.sagemaker.s3 import ensure_model_artifact
from service.statuses import EndpointStatus

log = logging.getLogger("centroid.sagemaker")

VARIANT = "AllTraffic"
#: SageMaker's own passing states, reported as the change they belong to.
SYSTEM_UPDATING = "SystemUpdating"
ROLLING_BACK = "RollingBack"
ENDPOINT_BUSY: tuple[str, ...] = (
    EndpointStatus.CREATING,
    EndpointStatus.UPDATING,
    SYSTEM_UPDATING,
    ROLLING_BACK,
    EndpointStatus.DELETING,
)


def _deployment(spec: EndpointSpec) -> Deployment:
    """SageMaker names for ``spec.model`` on this endpoint, derived so retries find them again."""
    endpoint = str(spec.remote.get("endpoint_name") or spec.name)
    name = derived_name(spec.name, spec.model.model_id)
    return Deployment(endpoint=endpoint, config=name, model=name)


def _owned(spec: EndpointSpec, config_name: str) -> bool:
    """Whether an existing SageMaker endpoint is this Centroid endpoint's: we recorded creating
    it, or it runs a config named the way we name them (a worker died right after creating)."""
    return bool(spec.remote.get("endpoint_arn")) or config_name.startswith(f"{name_stem(spec.name)}-")


def _leftovers(spec: EndpointSpec, target: Deployment, described: dict[str, Any] | None) -> list[str]:
    """Every config/model name this endpoint may have created (each is both)."""
    names = {target.config, *spec.remote.get("cleanup", [])}
    for key in ("config_name", "previous_config", "requested_config", "failed_config"):
        if spec.remote.get(key):
            names.add(str(spec.remote[key]))
    if described is not None and described.get("EndpointConfigName"):
        names.add(str(described["EndpointConfigName"]))
    return sorted(names)


class Endpoints:
    """Creates, switches and deletes SageMaker endpoints for Centroid's endpoints."""

    def __init__(self, aws: AwsContext) -> None:
        self.aws = aws

    def advance(self, spec: EndpointSpec) -> EndpointUpdate:
        """Create the endpoint, or switch it to ``spec.model``, and report until InService."""
        self.aws.ensure_configured()
        target = _deployment(spec)
        try:
            described = self._describe(target.endpoint)
            if described is None:
                return self._create(spec, target)
            if not _owned(spec, str(described.get("EndpointConfigName", ""))):
                return EndpointUpdate.failed(
                    f"a SageMaker endpoint named {target.endpoint!r} already exists in this account "
                    "and was not created by this Centroid; choose another endpoint name"
                )
            return self._follow(spec, target, described)
        except Permanent as exc:
            return EndpointUpdate.failed(str(exc))

    def delete(self, spec: EndpointSpec) -> EndpointUpdate:
        """Delete the endpoint, wait until it is gone, then its configs and models."""
        self.aws.ensure_configured()
        target = _deployment(spec)
        described = self._describe(target.endpoint)
        if described is not None and not _owned(spec, str(described.get("EndpointConfigName", ""))):
            log.warning("SageMaker endpoint %s is not this Centroid's; leaving it alone", target.endpoint)
            return EndpointUpdate.deleted()
        leftovers = _leftovers(spec, target, described)
        if described is not None:
            if described["EndpointStatus"] != EndpointStatus.DELETING:
                self._delete_endpoint(target.endpoint)
            if self._describe(target.endpoint) is not None:
                polls = int(spec.remote.get("polls", 0)) + 1
                return EndpointUpdate(
                    status=EndpointStatus.DELETING,
                    remote={"cleanup": leftovers, "polls": polls},
                    poll_after_seconds=self.aws.poll_delay(polls),
                )
        for name in leftovers:
            self._delete_deployment(Deployment(target.endpoint, name, name))
        log.info("deleted SageMaker endpoint", extra={"endpoint": target.endpoint})
        return EndpointUpdate.deleted()

    # --- the steps ----------------------------------------------------------------------------

    def _waiting(self, spec: EndpointSpec, **remote: Any) -> EndpointUpdate:
        """Still working: report the status the Centroid endpoint is in (Creating or Updating)."""
        polls = int(spec.remote.get("polls", 0)) + 1
        serving = spec.remote.get("serving_model_id")
        status = EndpointStatus.UPDATING if serving and serving != spec.model.model_id else EndpointStatus.CREATING
        return EndpointUpdate(
            status=status, remote={**remote, "polls": polls}, poll_after_seconds=self.aws.poll_delay(polls)
        )

    def _create(self, spec: EndpointSpec, target: Deployment) -> EndpointUpdate:
        self._ensure_model(spec, target)
        arn = aws_call(
            "SageMaker refused CreateEndpoint",
            self.aws.client("sagemaker").create_endpoint,
            EndpointName=target.endpoint,
            EndpointConfigName=target.config,
            Tags=[{"Key": "centroid:endpoint", "Value": spec.name}],
        )["EndpointArn"]
        log.info("creating SageMaker endpoint", extra={"endpoint": target.endpoint, "config": target.config})
        return self._waiting(
            spec, endpoint_name=target.endpoint, endpoint_arn=arn, requested_config=target.config, failed_config=None
        )

    def _follow(self, spec: EndpointSpec, target: Deployment, described: dict[str, Any]) -> EndpointUpdate:
        status = str(described["EndpointStatus"])
        current = str(described.get("EndpointConfigName", ""))
        arn = {"endpoint_name": target.endpoint, "endpoint_arn": described.get("EndpointArn")}
        if status in ENDPOINT_BUSY:
            return self._waiting(spec, **arn)
        if current == target.config:
            return self._settled(spec, target, status, described, arn)
        if status == EndpointStatus.IN_SERVICE and spec.remote.get("requested_config") == target.config:
            self._delete_deployment(target)  # SageMaker rolled the update back; drop the unused model
            return EndpointUpdate.failed(
                described.get("FailureReason") or "SageMaker rolled the update back",
                remote={**arn, "requested_config": None},
            )
        if status == EndpointStatus.IN_SERVICE:
            return self._update(spec, target, current, arn)
        self._delete_endpoint(target.endpoint)  # a failed endpoint cannot be updated: recreate it
        return self._waiting(spec, **arn)

    def _settled(
        self, spec: EndpointSpec, target: Deployment, status: str, described: dict[str, Any], arn: dict[str, Any]
    ) -> EndpointUpdate:
        """The endpoint runs the config we want: InService (tidy up), or Failed."""
        if status == EndpointStatus.IN_SERVICE:
            previous = spec.remote.get("previous_config")
            if previous and previous != target.config:
                self._delete_deployment(Deployment(target.endpoint, previous, previous))
            return EndpointUpdate(
                status=EndpointStatus.IN_SERVICE,
                remote={
                    **arn,
                    "config_name": target.config,
                    "model_name": target.model,
                    "serving_model_id": spec.model.model_id,
                    "previous_config": None,
                    "requested_config": None,
                    "polls": 0,
                },
            )
        if spec.remote.get("failed_config") == target.config:  # asked again after a failure: start over
            self._delete_endpoint(target.endpoint)
            return self._waiting(spec, **arn, failed_config=None)
        reason = described.get("FailureReason") or f"SageMaker reports the endpoint {status}"
        return EndpointUpdate.failed(
            str(reason),
            remote={**arn, "failed_config": target.config, "serving_model_id": None, "requested_config": None},
        )

    def _update(self, spec: EndpointSpec, target: Deployment, current: str, arn: dict[str, Any]) -> EndpointUpdate:
        self._ensure_model(spec, target)
        aws_call(
            "SageMaker refused UpdateEndpoint",
            self.aws.client("sagemaker").update_endpoint,
            EndpointName=target.endpoint,
            EndpointConfigName=target.config,
        )
        log.info("switching SageMaker endpoint", extra={"endpoint": target.endpoint, "config": target.config})
        return self._waiting(spec, **arn, requested_config=target.config, previous_config=current)

    def _ensure_model(self, spec: EndpointSpec, target: Deployment) -> None:
        """model.tar.gz in S3, then the SageMaker model and endpoint config (each only if absent)."""
        data_url = ensure_model_artifact(self.aws, spec)
        what = f"SageMaker refused to create the model for {spec.model.model_id}"
        aws_call(what, self._create_model_and_config, spec, target, data_url)

    def _create_model_and_config(self, spec: EndpointSpec, target: Deployment, data_url: str) -> None:
        sagemaker = self.aws.client("sagemaker")
        settings = self.aws.settings
        if not exists(sagemaker.describe_model, ModelName=target.model):
            sagemaker.create_model(
                ModelName=target.model,
                PrimaryContainer={"Image": kmeans_image(str(settings.aws_region)), "ModelDataUrl": data_url},
                ExecutionRoleArn=settings.sagemaker_role_arn,
                Tags=[{"Key": "centroid:model", "Value": spec.model.model_id}],
            )
        if not exists(sagemaker.describe_endpoint_config, EndpointConfigName=target.config):
            sagemaker.create_endpoint_config(
                EndpointConfigName=target.config,
                ProductionVariants=[
                    {
                        "VariantName": VARIANT,
                        "ModelName": target.model,
                        "InstanceType": spec.instance_config.get("instance_type") or settings.endpoint_instance_type,
                        "InitialInstanceCount": int(
                            spec.instance_config.get("instance_count") or settings.endpoint_instance_count
                        ),
                        "InitialVariantWeight": 1.0,
                    }
                ],
            )

    # --- SageMaker calls where absence is an answer -------------------------------------------

    def _describe(self, name: str) -> dict[str, Any] | None:
        """DescribeEndpoint, or None when there is no such endpoint (other failures propagate)."""
        try:
            return dict(aws_call(None, self.aws.client("sagemaker").describe_endpoint, EndpointName=name))
        except NotFound:
            return None

    def _delete_endpoint(self, name: str) -> None:
        tolerant(self.aws.client("sagemaker").delete_endpoint, EndpointName=name)

    def _delete_deployment(self, deployment: Deployment) -> None:
        sagemaker = self.aws.client("sagemaker")
        tolerant(sagemaker.delete_endpoint_config, EndpointConfigName=deployment.config)
        tolerant(sagemaker.delete_model, ModelName=deployment.model)
