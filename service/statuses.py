"""The state machines' states, one enum each, used end to end: backends, the worker, the domain
services, the database rows (stored as their string values) and the API schemas.

Members are :class:`~enum.StrEnum`: each compares equal to its SageMaker spelling, so a row
read back from the database, or a status SageMaker reports, can be compared directly."""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    """A training job's status (SageMaker's ``TrainingJobStatus``)."""

    PENDING = "Pending"
    IN_PROGRESS = "InProgress"
    COMPLETED = "Completed"
    FAILED = "Failed"
    STOPPING = "Stopping"
    STOPPED = "Stopped"

    @property
    def terminal(self) -> bool:
        """No later status follows."""
        return self in _TERMINAL_JOB

    @property
    def active(self) -> bool:
        """The job still runs (or waits to): a stop request applies."""
        return self in _ACTIVE_JOB


_TERMINAL_JOB = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.STOPPED})
_ACTIVE_JOB = frozenset({JobStatus.PENDING, JobStatus.IN_PROGRESS, JobStatus.STOPPING})


class SecondaryStatus(StrEnum):
    """A training job's finer status (SageMaker's ``SecondaryStatus``; the SageMaker backend may
    report one of SageMaker's other values, which is stored as SageMaker spells it)."""

    STARTING = "Starting"
    DOWNLOADING = "Downloading"
    TRAINING = "Training"
    UPLOADING = "Uploading"
    COMPLETED = "Completed"
    FAILED = "Failed"
    STOPPING = "Stopping"
    STOPPED = "Stopped"


class EndpointStatus(StrEnum):
    """An endpoint's status as Centroid reports it (the SageMaker ``EndpointStatus`` values an
    endpoint can be in between requests; SageMaker's passing states such as ``SystemUpdating`` are
    reported as the change they belong to). A finished delete has no status: the row is removed
    (:attr:`service.backends.base.EndpointUpdate.gone`)."""

    CREATING = "Creating"
    UPDATING = "Updating"
    IN_SERVICE = "InService"
    FAILED = "Failed"
    DELETING = "Deleting"

    @property
    def busy(self) -> bool:
        """A change is under way: the backend is polled until it settles."""
        return self in _BUSY_ENDPOINT


_BUSY_ENDPOINT = frozenset({EndpointStatus.CREATING, EndpointStatus.UPDATING, EndpointStatus.DELETING})


class DatasetTaskStatus(StrEnum):
    """A background dataset task's status (an upload's parsing, or a derive)."""

    PENDING = "Pending"
    IN_PROGRESS = "InProgress"
    COMPLETED = "Completed"
    FAILED = "Failed"
