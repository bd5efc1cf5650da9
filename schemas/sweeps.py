"""Sweeps: which k? Every k of a range trained from one streaming pass, with metrics to choose one."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.jobs import Hyperparameters, ResourceName
from service.statuses import JobStatus

#: Most ks one sweep may hold (each k's reduction and evaluation cost grows with the count).
MAX_SWEEP_KS = 100
#: Largest k a range may name (the service's own `CENTROID_MAX_K` ceiling applies too).
MAX_K = 10000


class KRange(BaseModel):
    """Every k from ``min`` to ``max``, both included: ``min`` <= ``max``, at most 100 ks (a 400
    otherwise: JSON Schema cannot compare two fields)."""

    model_config = ConfigDict(extra="forbid")

    min: int = Field(ge=2, le=MAX_K, description="Smallest k (SageMaker's smallest is 2).", examples=[2])
    max: int = Field(ge=2, le=MAX_K, description="Largest k; at most `min` + 99.", examples=[15])

    def values(self) -> list[int]:
        return list(range(self.min, self.max + 1))


class SweepHyperparameters(Hyperparameters):
    """The training hyperparameters every k shares, as for a training job, without `k` (the sweep's
    `k` sets it). The streaming stage keeps k x `extra_center_factor` local centers for the largest
    k, so the service's ceilings apply to the largest k."""

    model_config = ConfigDict(
        extra="allow", json_schema_extra={"examples": [{"mini_batch_size": 500, "init_method": "kmeans++", "seed": 1}]}
    )

    k: None = Field(default=None, description="Not allowed here: the sweep's `k` sets it.")  # type: ignore[assignment]


class SweepCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "name": "workshop-which-k",
                    "train_dataset_id": "ds-6f1c0e9b2a4d4f3e8b1a",
                    "k": {"min": 2, "max": 15},
                    "hyperparameters": {"seed": 1},
                }
            ]
        },
    )

    name: ResourceName
    train_dataset_id: str = Field(min_length=1, max_length=40, description="Dataset to train on.")
    test_dataset_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=40,
        description="Dataset every k is evaluated on (msd, ssd, scores); default: the training data.",
    )
    feature_columns: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(
        default=None,
        min_length=1,
        description="Numeric columns to cluster on; default: every numeric column except the key.",
    )
    k: KRange | Annotated[list[Annotated[int, Field(ge=2, le=MAX_K)]], Field(min_length=1, max_length=MAX_SWEEP_KS)] = (
        Field(
            description="The ks to train: a range `{min, max}` or a list (duplicates ignored).",
            examples=[{"min": 2, "max": 15}, [5, 10, 20]],
        )
    )
    hyperparameters: SweepHyperparameters = Field(
        default_factory=SweepHyperparameters, description="Shared by every k (no `k`)."
    )
    sample_size: int = Field(
        default=4000,
        ge=100,
        le=20000,
        description="Rows the silhouette, Davies–Bouldin and Calinski–Harabasz scores are computed on (a seeded "
        "sample of the evaluated rows; all of them when there are fewer).",
    )
    backend: Literal["local", "sagemaker"] = Field(
        default="local",
        description="`local`: the engine's one-pass sweep in a worker (every k from one streaming pass). "
        "`sagemaker`: one SageMaker built-in KMeans training job per k (`<sweep>-k<k>`, at most "
        "`CENTROID_SWEEP_PARALLEL_TRAINING_JOBS` at once, with the service's training settings), then every k "
        "evaluated by the worker in one pass, so the results have the same shape. **Cost**: SageMaker bills each "
        "training job for its instance time, so a sagemaker sweep costs one training job per k "
        "(`billable_seconds` reports the sum). A 409 `not_configured` when the backend lacks its settings.",
    )

    def k_values(self) -> list[int]:
        return self.k.values() if isinstance(self.k, KRange) else sorted(set(self.k))


class SweepKResult(BaseModel):
    k: int = Field(description="Number of clusters.", examples=[4])
    msd: float = Field(description="Mean squared distance of the evaluated rows to their closest centroid.")
    ssd: float = Field(description="Their sum of squared distances.")
    train_msd: float | None = Field(
        description="SageMaker's `train:msd`: the streamed local centers' weighted msd to the centroids (on the "
        "sagemaker backend as its training job reported it; null when it reported none)."
    )
    cluster_sizes: list[int] = Field(description="Evaluated rows closest to each centroid.")
    silhouette: float | None = Field(
        description="Mean silhouette coefficient on the sample (-1..1, higher is better); null when the sample "
        "holds fewer than 2 clusters."
    )
    davies_bouldin: float | None = Field(description="Davies–Bouldin index on the sample (lower is better).")
    calinski_harabasz: float | None = Field(description="Calinski–Harabasz index on the sample (higher is better).")
    model_id: str | None = Field(default=None, description="The model registered from this k, if any.")


class SweepTrainingJob(BaseModel):
    """One k's SageMaker training job (sagemaker sweeps only)."""

    k: int = Field(description="The k this job trains.", examples=[4])
    training_job_name: str = Field(description="The SageMaker training job's name.", examples=["which-k-k4"])
    status: str = Field(
        description="`Waiting` (not submitted yet: at most `CENTROID_SWEEP_PARALLEL_TRAINING_JOBS` run at once), "
        "then SageMaker's: InProgress, Completed, Failed, Stopping, Stopped.",
        examples=["Completed"],
    )
    billable_seconds: float | None = Field(default=None, description="SageMaker's `BillableTimeInSeconds`.")
    failure_reason: str | None = Field(default=None, description="SageMaker's reason, when it failed.")


class SweepRecommendation(BaseModel):
    k: int = Field(description="The recommended k.", examples=[4])
    elbow_k: int | None = Field(description="The elbow of the msd curve (kneedle), if it bends.")
    best_silhouette_k: int | None = Field(description="The k with the best silhouette.")
    reasons: list[str] = Field(description="How the rule decided, with the figures.")


class SweepView(BaseModel):
    name: str = Field(examples=["workshop-which-k"])
    backend: str = Field(examples=["local"])
    status: JobStatus = Field(
        description="As a training job's: Pending, InProgress, Completed, Failed, Stopping, Stopped."
    )
    status_message: str | None = None
    failure_reason: str | None = None
    train_dataset_id: str
    test_dataset_id: str | None = None
    feature_columns: list[str]
    k_values: list[int] = Field(description="The ks, in increasing order.")
    hyperparameters: dict[str, object] = Field(description="Shared by every k (`k` shown as the largest).")
    sample_size: int
    rows_processed: int = Field(description="Rows streamed and evaluated so far (by this service's worker).")
    rows_total: int = Field(
        description="Training rows x epochs + evaluated rows (sagemaker: the evaluated rows; the training runs on "
        "SageMaker, whose progress `training_jobs` shows)."
    )
    evaluated_on: Literal["test", "training"] | None = Field(default=None, description="Where the metrics come from.")
    sample_rows: int | None = Field(default=None, description="Rows the scores were computed on.")
    results: list[SweepKResult] | None = Field(default=None, description="One per k, once Completed.")
    recommendation: SweepRecommendation | None = None
    training_jobs: list[SweepTrainingJob] | None = Field(
        default=None,
        description="On the sagemaker backend: each k's training job (null on the local backend, and until a worker "
        "has taken the sweep).",
    )
    billable_seconds: float | None = Field(
        default=None,
        description="On the sagemaker backend: the training jobs' billable seconds so far, summed (SageMaker bills "
        "each job; null on the local backend).",
    )
    created_at: datetime
    started_at: datetime | None = None
    ended_at: datetime | None = None


class SweepModelCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{}, {"k": 4, "name": "states-k4"}]})

    k: int | None = Field(default=None, ge=2, description="Which k; default: the recommended one.")
    name: str | None = Field(
        default=None, min_length=1, max_length=200, description="The model's name; default `<sweep>-k<k>`."
    )
