"""HTTP routes of models."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field, field_validator
from sqlalchemy.orm import Session

from schemas.common import LimitQuery, OffsetQuery, Page, error_responses
from schemas.datasets import no_control_chars
from schemas.models import Assignments, Centroids, Model
from service.deps import AppState, app_state, db_session
from service.errors import UnsupportedMediaType
from service.models.service import ModelService
from service.request_bodies import read_upload

router = APIRouter(prefix="/models", tags=["models"])


def model_service(session: Session = Depends(db_session), state: AppState = Depends(app_state)) -> ModelService:
    return ModelService(session, state.store, max_model_bytes=state.settings.max_model_bytes)


Service = Annotated[ModelService, Depends(model_service)]


class ImportForm(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    feature_names: list[str] = Field(min_length=1)
    key_column: str | None = Field(default=None, max_length=256)

    _check_name = field_validator("name")(no_control_chars)

    @field_validator("feature_names", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        """Accept a JSON list or a comma-separated string."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    return json.loads(text)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"not a JSON list: {exc.msg}") from exc
                except RecursionError as exc:
                    raise ValueError("not a JSON list: nested too deeply") from exc
            return [part.strip() for part in text.split(",")]
        return value


_IMPORT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "name", "feature_names"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "SageMaker KMeans model.tar.gz"},
                        "name": {"type": "string", "minLength": 1, "maxLength": 200, "example": "from-sagemaker"},
                        "feature_names": {
                            "type": "string",
                            "description": "Comma-separated or JSON list, one name per centroid coordinate.",
                            "example": "Murder,Assault,UrbanPop,Rape,DensityPerMile",
                        },
                        "key_column": {"type": "string", "maxLength": 256, "example": "State"},
                    },
                }
            }
        },
    }
}


@router.get("", response_model=Page[Model], summary="List models, newest first", responses=error_responses(422))
def list_models(
    service: Service,
    offset: OffsetQuery = 0,
    limit: LimitQuery = 50,
    name: Annotated[str | None, Query(max_length=200)] = None,
) -> Any:
    rows, total = service.page(offset, limit, name)
    return Page[Model](
        items=[Model.model_validate(r, from_attributes=True) for r in rows], total=total, offset=offset, limit=limit
    )


@router.post(
    "/import",
    status_code=status.HTTP_201_CREATED,
    response_model=Model,
    summary="Import a SageMaker KMeans model.tar.gz",
    responses=error_responses(400, 413, 415, 422, 507),
    openapi_extra=_IMPORT_BODY,
)
async def import_model(request: Request, service: Service) -> Any:
    """Upload a `model.tar.gz` written by SageMaker's KMeans (or exported by Centroid) with
    the feature names; the model can then be deployed on a local endpoint."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "multipart/form-data":
        raise UnsupportedMediaType("send the model as multipart/form-data (fields file, name, feature_names)")
    upload, fields = await read_upload(request, ImportForm, "the model.tar.gz")
    row = await run_in_threadpool(
        service.import_artifact, fields.name, upload.data, fields.feature_names, fields.key_column
    )
    return Model.model_validate(row, from_attributes=True)


@router.get("/{model_id}", response_model=Model, summary="Describe a model", responses=error_responses(404, 422))
def get_model(model_id: str, service: Service) -> Any:
    return Model.model_validate(service.get(model_id), from_attributes=True)


@router.get(
    "/{model_id}/centroids",
    response_model=Centroids,
    summary="A model's centroids, scaled and in original units",
    responses=error_responses(404, 422),
)
def get_centroids(model_id: str, service: Service) -> Any:
    return service.centroids(service.get(model_id))


@router.get(
    "/{model_id}/artifact",
    response_class=FileResponse,
    summary="Download the SageMaker-format model.tar.gz",
    responses={
        200: {"content": {"application/gzip": {"schema": {"type": "string", "format": "binary"}}}},
        **error_responses(404, 422),
    },
)
def get_artifact(model_id: str, service: Service) -> FileResponse:
    row = service.get(model_id)
    return FileResponse(service.artifact_path(row), media_type="application/gzip", filename=f"{row.id}-model.tar.gz")


@router.get(
    "/{model_id}/assignments",
    response_model=Assignments,
    summary="Key → cluster map of the training dataset (or another dataset)",
    responses=error_responses(400, 404, 422),
)
def get_assignments(
    model_id: str,
    service: Service,
    cluster: Annotated[int | None, Query(ge=0, description="Only rows of this cluster.")] = None,
    dataset_id: Annotated[
        str | None, Query(max_length=40, description="Another dataset with the same features.")
    ] = None,
) -> Any:
    return service.assignments(service.get(model_id), dataset_id, cluster)


@router.delete(
    "/{model_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Delete a model",
    responses=error_responses(404, 409, 422),
)
def delete_model(model_id: str, service: Service) -> Response:
    """Refused with 409 while an endpoint serves it."""
    service.delete(model_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
