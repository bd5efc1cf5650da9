"""Request and response models of models (the k-means kind)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from service.engine.metrics import current_metric_names


class ModelListItem(BaseModel):
    """A model as `GET /models` lists it: without its centroids (`GET /models/{id}/centroids`) and
    without its preprocessing recipe (`GET /models/{id}`), the two parts that grow with the model.

    Every list here is bounded: `k` is at most `CENTROID_MAX_K`, and `k × feature_dim` at most
    `CENTROID_MAX_CENTROID_VALUES`.
    """

    id: str = Field(examples=["mdl-1c9a7f0e2b3d4a5c6e7f"])
    name: str = Field(examples=["workshop-k10"])
    source: Literal["training", "import", "sweep"] = Field(
        description="Registered by a training job, imported, or registered from one k of a sweep."
    )
    training_job_name: str | None = Field(description="The job that trained it.")
    train_dataset_id: str | None = Field(description="The dataset it was trained on.")
    key_column: str | None = Field(description="Key column of the training dataset.", examples=["State"])
    feature_names: list[str] = Field(examples=[["Murder", "Assault", "UrbanPop", "Rape", "DensityPerMile"]])
    k: int = Field(description="Number of clusters (at most `CENTROID_MAX_K`).", examples=[10])
    feature_dim: int = Field(examples=[5])
    hyperparameters: dict[str, Any] = Field(description="Hyperparameters it was trained with.")
    metrics: dict[str, float] = Field(
        description="Named as SageMaker's `FinalMetricDataList`, on every backend: `train:msd` is SageMaker's "
        "figure (the local centers' weighted mean squared distance to the final centroids, from the reduction "
        "of the mini-batch stage: no pass over the data); `train:msd_full_pass` / `train:ssd_full_pass` are the "
        "mean / sum of squared distances of every training row to its closest centroid (Centroid's own, one "
        "pass over the data); `test:msd` / `test:ssd` the same over the test dataset. The full-pass and test "
        'metrics follow `eval_metrics` (default `["msd"]`); the test ones need a test dataset. Models trained '
        "before these names show their stored metrics renamed (with no `train:msd` for local ones); imported "
        "models have none.",
        examples=[{"train:msd": 12.3, "train:msd_full_pass": 41.2, "test:msd": 44.0}],
    )
    cluster_sizes: list[int] | None = Field(description="Training rows closest to each centroid (k entries).")
    engine_version: str | None = Field(description="Centroid engine version (null for SageMaker/imports).")
    seed: int | None = Field(description="Seed used for training, if any.")
    artifact_sha256: str = Field(description="SHA-256 of the SageMaker-format model.tar.gz.")
    artifact_size: int = Field(description="Size of model.tar.gz in bytes.")
    created_at: datetime

    @model_validator(mode="after")
    def _current_metric_names(self) -> ModelListItem:
        """Metrics stored under the old names (``train_msd``, ...) are shown under today's."""
        self.metrics = current_metric_names(self.metrics, local_engine=self.engine_version is not None)
        return self


class Model(ModelListItem):
    """A trained or imported k-means model, described without its centroids (`GET /models/{id}/centroids`).

    Every list here is bounded: `k` is at most `CENTROID_MAX_K`, and `k × feature_dim` at most
    `CENTROID_MAX_CENTROID_VALUES`; the recipe at most `CENTROID_MAX_RECIPE_BYTES`.
    """

    recipe: dict[str, Any] | None = Field(
        description="Preprocessing recipe of the training dataset, replayed on raw rows at prediction time."
    )


class OriginalUnits(BaseModel):
    feature_names: list[str] = Field(description="Names of the raw (uploaded) columns.")
    centroids: list[list[float]] = Field(description="Centroids with every scaling undone.")


class Centroids(BaseModel):
    model_id: str
    feature_names: list[str]
    centroids: list[list[float]] = Field(description="k rows, in the units the model was trained in (scaled).")
    original_units: OriginalUnits | None = Field(
        description="The same centroids in original units, when the training recipe allows it."
    )


class Assignment(BaseModel):
    key: str = Field(examples=["Alabama"])
    closest_cluster: int = Field(examples=[3])
    distance_to_cluster: float = Field(description="Euclidean distance to the centroid.", examples=[12.7])


#: Examples of the streamed forms of assignments (``Accept: application/jsonlines``, ``text/csv``).
STREAMED_ASSIGNMENT_LINES = (
    '{"key":"Alabama","closest_cluster":3,"distance_to_cluster":12.7}\n'
    '{"key":"Alaska","closest_cluster":7,"distance_to_cluster":4.25}\n'
)
STREAMED_ASSIGNMENT_CSV = "key,closest_cluster,distance_to_cluster\nAlabama,3,12.7\nAlaska,7,4.25\n"


class Assignments(BaseModel):
    """The training dataset's key → cluster map (the JSON form; JSON Lines and CSV stream one
    :class:`Assignment` per line instead, without `counts`)."""

    model_id: str
    dataset_id: str
    key_column: str | None
    clusters: dict[str, int] = Field(description="Key → closest cluster.", examples=[{"Alabama": 3, "Alaska": 7}])
    distances: dict[str, float] = Field(description="Key → Euclidean distance to that cluster's centroid.")
    counts: dict[str, int] = Field(description="Cluster → number of rows (of those returned).", examples=[{"3": 6}])
