"""The OpenAPI document: FastAPI's, made to describe every response the app really sends."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service.auth import document_security

ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
BODY_ERRORS = {
    "400": "The body cannot be decoded or parsed",
    "413": "Request body larger than the configured limit",
    "415": "Unsupported Content-Type, or a compressed body (Content-Encoding is not supported)",
    "422": "Request does not match the schema",
}
ALWAYS = {"500": "Internal error", "503": "Database unavailable"}


def build_openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for operation in _operations(schema):
            _errors_are_json(operation)
            _declare_generic_errors(operation)
        declare_links(schema)
        app.openapi_schema = document_security(schema)
    return app.openapi_schema


def _operations(schema: dict[str, Any]) -> list[dict[str, Any]]:
    return [operation for path_item in schema.get("paths", {}).values() for operation in path_item.values()]


def _errors_are_json(operation: dict[str, Any]) -> None:
    """Errors are always JSON, even on operations whose success is CSV or a file."""
    for status, response in operation.get("responses", {}).items():
        if status.startswith(("4", "5")) and "content" in response:
            response["content"] = {"application/json": {"schema": ERROR_REF}}


def _declare_generic_errors(operation: dict[str, Any]) -> None:
    """Errors any operation can meet: a bad body (when it takes one), an outage, a bug."""
    responses = operation.setdefault("responses", {})
    generic = {**ALWAYS, **(BODY_ERRORS if "requestBody" in operation else {})}
    for status, description in generic.items():
        responses.setdefault(
            status, {"description": description, "content": {"application/json": {"schema": ERROR_REF}}}
        )


# --- links: how one operation's answer feeds the next (OpenAPI 3.1 `links`) -------------------------


@dataclass(frozen=True)
class Link:
    """An OpenAPI link from the ``status`` response of ``source`` to ``target`` (``"METHOD /path"``).

    ``parameters`` maps the target's parameters to runtime expressions; ``body`` holds fields of the
    target's JSON body (each a runtime expression), for the operations that take an id in the body.
    Targets are named by method and path here and written as their ``operationId``."""

    source: str
    status: str
    name: str
    target: str
    parameters: dict[str, str] = field(default_factory=dict)
    body: dict[str, str] | None = None
    description: str = ""


_DATASET_ID = {"dataset_id": "$response.body#/id"}
_MODEL_ID = {"model_id": "$response.body#/id"}


def _dataset_links(source: str, status: str, what: str) -> list[Link]:
    """What can be done with the dataset ``source`` answered with."""
    return [
        Link(source, status, "GetDataset", "GET /datasets/{dataset_id}", _DATASET_ID, description=f"{what}: metadata"),
        Link(source, status, "GetDatasetRows", "GET /datasets/{dataset_id}/rows", _DATASET_ID),
        Link(source, status, "DownloadDatasetCsv", "GET /datasets/{dataset_id}/csv", _DATASET_ID),
        Link(source, status, "DeriveDataset", "POST /datasets/{dataset_id}/derive", _DATASET_ID),
        Link(source, status, "DeleteDataset", "DELETE /datasets/{dataset_id}", _DATASET_ID),
        Link(
            source,
            status,
            "TrainOnDataset",
            "POST /training-jobs",
            body={"train_dataset_id": "$response.body#/id"},
            description=f"Train k-means on {what.lower()}",
        ),
        Link(
            source,
            status,
            "SweepOnDataset",
            "POST /sweeps",
            body={"train_dataset_id": "$response.body#/id"},
            description=f"Train every k of a range on {what.lower()}, to choose k",
        ),
    ]


def _task_link(source: str) -> Link:
    return Link(
        source,
        "202",
        "GetDatasetTask",
        "GET /dataset-tasks/{task_id}",
        {"task_id": "$response.body#/id"},
        description="Follow the background task (its `Location`)",
    )


def _model_links(source: str, status: str, model_id: str) -> list[Link]:
    """What can be done with the model whose id is at ``model_id`` (a runtime expression)."""
    parameters = {"model_id": model_id}
    return [
        Link(source, status, "GetModel", "GET /models/{model_id}", parameters),
        Link(source, status, "GetCentroids", "GET /models/{model_id}/centroids", parameters),
        Link(source, status, "DownloadArtifact", "GET /models/{model_id}/artifact", parameters),
        Link(source, status, "GetAssignments", "GET /models/{model_id}/assignments", parameters),
        Link(source, status, "DeployModel", "POST /endpoints", body={"model_id": model_id}),
    ]


def _endpoint_links(source: str, status: str) -> list[Link]:
    parameters = {"name": "$response.body#/name"}
    return [
        Link(source, status, "GetEndpoint", "GET /endpoints/{name}", parameters),
        Link(source, status, "Invoke", "POST /endpoints/{name}/invocations", parameters),
        Link(source, status, "Predict", "POST /endpoints/{name}/predictions", parameters),
    ]


def _job_links(source: str, status: str) -> list[Link]:
    parameters = {"name": "$response.body#/name"}
    return [
        Link(source, status, "GetTrainingJob", "GET /training-jobs/{name}", parameters),
        Link(source, status, "StopTrainingJob", "POST /training-jobs/{name}/stop", parameters),
        Link(source, status, "DeleteTrainingJob", "DELETE /training-jobs/{name}", parameters),
    ]


def _sweep_links(source: str, status: str) -> list[Link]:
    parameters = {"name": "$response.body#/name"}
    return [
        Link(source, status, "GetSweep", "GET /sweeps/{name}", parameters),
        Link(source, status, "StopSweep", "POST /sweeps/{name}/stop", parameters),
        Link(source, status, "DeleteSweep", "DELETE /sweeps/{name}", parameters),
        Link(source, status, "RegisterSweepModel", "POST /sweeps/{name}/models", parameters),
    ]


#: The workflow: upload → derive → train → the job's model → deploy → predict, and the reads on the way.
LINKS: tuple[Link, ...] = (
    *_dataset_links("POST /datasets", "201", "The new dataset"),
    _task_link("POST /datasets"),
    *_dataset_links("POST /datasets/s3", "201", "The registered dataset"),
    *_dataset_links("POST /datasets/{dataset_id}/derive", "201", "The derived dataset"),
    _task_link("POST /datasets/{dataset_id}/derive"),
    Link(
        "GET /dataset-tasks/{task_id}",
        "200",
        "GetTaskDataset",
        "GET /datasets/{dataset_id}",
        {"dataset_id": "$response.body#/dataset_id"},
        description="The dataset the task made, once `Completed`",
    ),
    *_job_links("POST /training-jobs", "202"),
    *_sweep_links("POST /sweeps", "202"),
    *_model_links("POST /sweeps/{name}/models", "201", "$response.body#/id"),
    *_model_links("GET /training-jobs/{name}", "200", "$response.body#/model_id"),
    *_model_links("POST /models/import", "201", "$response.body#/id"),
    Link("POST /models/import", "201", "DeleteModel", "DELETE /models/{model_id}", _MODEL_ID),
    *_endpoint_links("POST /endpoints", "202"),
    Link("POST /endpoints", "202", "SwitchModel", "PUT /endpoints/{name}", {"name": "$response.body#/name"}),
    Link("POST /endpoints", "202", "DeleteEndpoint", "DELETE /endpoints/{name}", {"name": "$response.body#/name"}),
    *_endpoint_links("PUT /endpoints/{name}", "202"),
)


def declare_links(schema: dict[str, Any], links: tuple[Link, ...] = LINKS) -> None:
    """Write ``links`` into the responses of ``schema``; a source, target or parameter the schema
    lacks is a ``ValueError`` (a renamed route must not leave a dangling link behind)."""
    operation_ids = {
        f"{method.upper()} {path}": operation["operationId"]
        for path, item in schema.get("paths", {}).items()
        for method, operation in item.items()
        if "operationId" in operation
    }
    for link in links:
        source = _operation(schema, link.source)
        target = _operation(schema, link.target)
        if source is None or target is None or link.status not in source.get("responses", {}):
            raise ValueError(f"link {link.name}: no {link.source} answering {link.status}, or no {link.target}")
        declared = {parameter["name"] for parameter in target.get("parameters", [])}
        unknown = set(link.parameters) - declared
        if unknown:
            raise ValueError(f"link {link.name}: {link.target} has no parameter {sorted(unknown)}")
        definition: dict[str, Any] = {"operationId": operation_ids[link.target]}
        if link.parameters:
            definition["parameters"] = dict(link.parameters)
        if link.body is not None:
            definition["requestBody"] = dict(link.body)
        if link.description:
            definition["description"] = link.description
        source["responses"][link.status].setdefault("links", {})[link.name] = definition


def _operation(schema: dict[str, Any], name: str) -> dict[str, Any] | None:
    method, _, path = name.partition(" ")
    operation = schema.get("paths", {}).get(path, {}).get(method.lower())
    return operation if isinstance(operation, dict) else None
