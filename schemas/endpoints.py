"""Request and response models of endpoints and predictions."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, field_validator

from schemas.jobs import BackendName, ResourceName
from service.statuses import EndpointStatus

SORT_FIELDS = ("key", "cluster", "distance")
_SORT_FIELD = rf" *-?(?:{'|'.join(SORT_FIELDS)}) *"
#: ``sort``: comma-separated fields, each optionally prefixed by ``-`` (descending); spaces around a
#: field are allowed. Published as the schema's ``pattern`` and checked with it.
SORT_PATTERN = rf"^{_SORT_FIELD}(?:,{_SORT_FIELD})*$"
_SORT = re.compile(SORT_PATTERN)


class EndpointCreate(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"name": "workshop", "model_id": "mdl-1c9a7f0e2b3d4a5c6e7f"}]}
    )

    name: ResourceName
    model_id: str = Field(min_length=1, max_length=40, description="The model to serve.")
    backend: BackendName = Field(default="local", description="`local` (in-process) or `sagemaker`.")
    instance_type: str | None = Field(
        default=None, description="SageMaker only; default from settings.", examples=["ml.m4.xlarge"]
    )
    instance_count: int | None = Field(default=None, ge=1, le=100, description="SageMaker only.")


class EndpointModelSwitch(BaseModel):
    """A switch keeps the endpoint's contract: a model with other feature names (or another order)
    is refused with 409 naming both lists, unless `allow_feature_change` is true."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"model_id": "mdl-2d0b8e1f3c4e5b6d7f80"},
                {"model_id": "mdl-3e1c9f2a4d5f6c7e8091", "allow_feature_change": True},
            ]
        }
    )

    model_id: str = Field(min_length=1, max_length=40, description="The model to switch to.")
    allow_feature_change: bool = Field(
        default=False,
        description="Switch even if the new model's feature names differ from those the endpoint serves now "
        "(clients must then send the new features). Without it such a switch gets 409.",
        examples=[True],
    )


class Endpoint(BaseModel):
    """A deployed model. While `Updating`, requests are still served by the previous model."""

    name: str = Field(examples=["workshop"])
    backend: BackendName
    model_id: str = Field(description="The model serving requests now.")
    pending_model_id: str | None = Field(description="The model being switched to, while `Updating`.")
    status: EndpointStatus
    failure_reason: str | None
    instance_config: dict[str, Any]
    remote: dict[str, Any] = Field(description="Backend-specific identifiers (SageMaker endpoint name, ARN).")
    created_at: datetime
    updated_at: datetime


Cell = StrictInt | StrictFloat | StrictStr | None


class PredictionRequest(BaseModel):
    """Rows to assign to clusters: objects keyed by feature name, or a stored dataset."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "rows": [
                        {
                            "State": "Alabama",
                            "Murder": 13.2,
                            "Assault": 236,
                            "UrbanPop": 58,
                            "Rape": 21.2,
                            "DensityPerMile": 71.3,
                        }
                    ],
                    "raw": True,
                },
                {"dataset_id": "ds-6f1c0e9b2a4d4f3e8b1a", "sort": "cluster,distance"},
            ],
            # Exactly one of `rows` and `dataset_id` (400 otherwise, naming both).
            "oneOf": [
                {"required": ["rows"], "properties": {"rows": {"type": "array"}, "dataset_id": {"type": "null"}}},
                {
                    "required": ["dataset_id"],
                    "properties": {"dataset_id": {"type": "string"}, "rows": {"type": "null"}},
                },
            ],
        }
    )

    rows: list[dict[str, Cell]] | None = Field(
        default=None, min_length=1, description="Rows as objects; the model's key column, if present, labels each row."
    )
    dataset_id: str | None = Field(
        default=None, max_length=40, description="Predict every row of this dataset instead."
    )
    raw: bool = Field(
        default=False,
        description="Rows are in original units: apply the model's preprocessing recipe (scaling, fills) first.",
    )
    include_distances: bool = Field(
        default=False,
        description="Also return the distance to every centroid. JSON: at most `CENTROID_MAX_DISTANCE_CELLS` "
        "(rows x k) per request (413 above); streamed (JSON Lines, CSV): the same bound applies to each batch of "
        "rows, so a dataset of any size can be streamed with every distance.",
    )
    sort: Annotated[str, Field(json_schema_extra={"pattern": SORT_PATTERN})] | None = Field(
        default=None,
        description="Comma-separated order: `key`, `cluster`, `distance`, each optionally prefixed by `-` "
        "(descending). `cluster,distance` is the workshop's ordering. Default: input order. Streamed (JSON Lines, "
        "CSV), any number of rows can be sorted: above `CENTROID_MAX_INVOCATION_ROWS` on disk, so the first line "
        "comes once every row is predicted and sorted.",
        examples=["cluster,distance"],
    )

    @field_validator("sort")
    @classmethod
    def _known_fields(cls, value: str | None) -> str | None:
        if value is not None and _SORT.fullmatch(value) is None:
            raise ValueError(f"sort fields must be among {list(SORT_FIELDS)}, each optionally prefixed by '-'")
        return value


class RowPrediction(BaseModel):
    key: str = Field(description="The row's key (e.g. the state), or its position.", examples=["Alabama"])
    closest_cluster: int = Field(examples=[3])
    distance_to_cluster: float = Field(
        description="Euclidean (not squared) distance to that centroid.", examples=[12.7]
    )
    distances: list[float] | None = Field(default=None, description="Distance to every centroid, if asked for.")


#: Examples of the streamed forms of predictions for a dataset (``Accept: application/jsonlines``, ``text/csv``).
STREAMED_PREDICTION_LINES = (
    '{"key":"Alabama","closest_cluster":3,"distance_to_cluster":12.7}\n'
    '{"key":"Alaska","closest_cluster":7,"distance_to_cluster":4.25}\n'
)
STREAMED_PREDICTION_CSV = "key,closest_cluster,distance_to_cluster\nAlabama,3,12.7\nAlaska,7,4.25\n"


class PredictionResponse(BaseModel):
    endpoint: str
    model_id: str
    predictions: list[RowPrediction]
    cluster_counts: dict[str, int] = Field(
        description="Rows per cluster (every cluster listed, zeros included).", examples=[{"0": 4, "1": 11}]
    )


class InvocationPrediction(BaseModel):
    closest_cluster: float = Field(examples=[1.0])
    distance_to_cluster: float = Field(examples=[3.2])


class InvocationResponse(BaseModel):
    """SageMaker KMeans's JSON response."""

    predictions: list[InvocationPrediction]
