"""The OpenAPI document as a contract: its links resolve, its patterns are the validators' rules,
every 405 names every method of its path, and a missing backend configuration is the documented 409.

Schemathesis (``tests/reliability/test_schemathesis.py``) checks the running API against the
document; these check the document against itself and against the code that enforces it.
"""

from __future__ import annotations

import re
from typing import Any

import jsonschema_rs
import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.datasets import NAME_PATTERN, DatasetCreate
from schemas.endpoints import SORT_PATTERN, PredictionRequest
from schemas.jobs import LOCAL_BACKEND_REFUSED
from service.jobs.service import LOCAL_REFUSED_OPTIONS
from service.models.router import FEATURE_NAMES_PATTERN, ImportForm
from service.openapi import LINKS, Link, declare_links
from tests.helpers import assert_error

RUNTIME_EXPRESSION = re.compile(r"^\$response\.body#(/[^/]+)+$")


@pytest.fixture
def schema(client: TestClient) -> dict[str, Any]:
    return client.get("/openapi.json").json()  # type: ignore[no-any-return]


def _operations(schema: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {op["operationId"]: op for item in schema["paths"].values() for op in item.values()}


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """``node`` with ``$ref`` followed, and with the first non-null branch of an ``anyOf``."""
    while "$ref" in node:
        node = schema["components"]["schemas"][node["$ref"].rsplit("/", 1)[1]]
    branches = [branch for branch in node.get("anyOf", []) if branch.get("type") != "null"]
    return _resolve(schema, branches[0]) if branches else node


def _pointer_target(schema: dict[str, Any], body: dict[str, Any], pointer: str) -> dict[str, Any] | None:
    node = body
    for token in pointer.strip("/").split("/"):
        node = _resolve(schema, node).get("properties", {}).get(token)
        if node is None:
            return None
    return node


def _declared_links(schema: dict[str, Any]) -> list[tuple[str, str, str, dict[str, Any], dict[str, Any]]]:
    """(source label, status, link name, link, source response) for every link in the document."""
    found = []
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                for name, link in response.get("links", {}).items():
                    found.append((f"{method.upper()} {path}", status, name, link, response))
    return found


def test_every_link_resolves_to_an_operation_its_parameters_and_the_source_body(schema: dict[str, Any]) -> None:
    operations = _operations(schema)
    declared = _declared_links(schema)
    assert len(declared) == len(LINKS) > 30
    for source, status, name, link, response in declared:
        where = f"{source} {status} {name}"
        target = operations.get(link["operationId"])
        assert target is not None, f"{where}: no operation {link['operationId']}"
        body = response["content"]["application/json"]["schema"]
        expressions = [*link.get("parameters", {}).values(), *link.get("requestBody", {}).values()]
        assert expressions, where
        for expression in expressions:
            assert RUNTIME_EXPRESSION.match(expression), f"{where}: {expression}"
            pointer = expression.split("#", 1)[1]
            assert _pointer_target(schema, body, pointer) is not None, f"{where}: {pointer} not in {source}'s body"
        parameters = {p["name"]: p for p in target.get("parameters", [])}
        for parameter in link.get("parameters", {}):
            assert parameter in parameters, f"{where}: {link['operationId']} has no parameter {parameter}"
        if "requestBody" in link:
            target_body = target["requestBody"]["content"]["application/json"]["schema"]
            for field in link["requestBody"]:
                assert _pointer_target(schema, target_body, f"/{field}") is not None, f"{where}: no body field {field}"


def test_the_workflow_is_linked_end_to_end(schema: dict[str, Any]) -> None:
    """Upload → derive → train → the job's model → deploy → predict, by links alone."""
    edges = {
        (source, _operation_label(schema, link["operationId"])) for source, _, _, link, _ in _declared_links(schema)
    }
    for step in [
        ("POST /datasets", "POST /datasets/{dataset_id}/derive"),
        ("POST /datasets/{dataset_id}/derive", "POST /training-jobs"),
        ("POST /training-jobs", "GET /training-jobs/{name}"),
        ("GET /training-jobs/{name}", "GET /models/{model_id}"),
        ("GET /training-jobs/{name}", "POST /endpoints"),
        ("POST /endpoints", "POST /endpoints/{name}/predictions"),
        ("POST /endpoints", "POST /endpoints/{name}/invocations"),
    ]:
        assert step in edges, step


def _operation_label(schema: dict[str, Any], operation_id: str) -> str:
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            if operation["operationId"] == operation_id:
                return f"{method.upper()} {path}"
    raise AssertionError(operation_id)


def test_a_link_to_nowhere_is_refused_when_the_document_is_built(schema: dict[str, Any]) -> None:
    for broken in (
        Link("POST /datasets", "201", "Gone", "GET /no-such-path"),
        Link(
            "POST /datasets", "299", "NoSuchStatus", "GET /datasets/{dataset_id}", {"dataset_id": "$response.body#/id"}
        ),
        Link("POST /datasets", "201", "NoSuchParameter", "GET /datasets/{dataset_id}", {"id": "$response.body#/id"}),
    ):
        with pytest.raises(ValueError, match=broken.name):
            declare_links(schema, (broken,))


def test_a_405_lists_every_method_of_its_path(client: TestClient, schema: dict[str, Any]) -> None:
    for path, item in schema["paths"].items():
        url = re.sub(r"\{[^}]+\}", "x", path)
        response = client.options(url)
        assert response.status_code == 405, (path, response.text)
        assert response.headers["allow"] == ", ".join(sorted(method.upper() for method in item)), path
        assert set(response.json()) == {"error"}
    # A concrete path is matched before a templated one, as OpenAPI matches URLs.
    assert client.options("/datasets/s3").headers["allow"] == "POST"
    assert client.patch("/models/import").headers["allow"] == "POST"


def _text(pattern: str) -> st.SearchStrategy[str]:
    """Strings that match ``pattern``, and strings that mostly do not."""
    return st.one_of(st.from_regex(pattern, fullmatch=True), st.text(max_size=12))


def _matches(pattern: str, value: str) -> bool:
    """Whether ``value`` matches ``pattern`` for Python and for a JSON Schema validator (ECMA-262
    regular expressions: what clients and schemathesis use), which must agree."""
    python = re.fullmatch(pattern, value) is not None
    assert jsonschema_rs.validator_for({"type": "string", "pattern": pattern}).is_valid(value) == python, repr(value)
    return python


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(_text(NAME_PATTERN))
def test_the_name_pattern_is_the_name_validator(name: str) -> None:
    accepted = _accepts(lambda: DatasetCreate(name=name, columns=["a"], rows=[[1]]))
    assert accepted == (_matches(NAME_PATTERN, name) and len(name) <= 200), repr(name)


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(_text(SORT_PATTERN))
def test_the_sort_pattern_is_the_sort_validator(sort: str) -> None:
    accepted = _accepts(lambda: PredictionRequest(rows=[{"x": 1}], sort=sort))
    assert accepted == _matches(SORT_PATTERN, sort), repr(sort)


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(_text(FEATURE_NAMES_PATTERN))
def test_the_feature_names_pattern_is_what_the_import_form_reads(feature_names: str) -> None:
    accepted = _accepts(lambda: ImportForm(name="m", feature_names=feature_names))  # type: ignore[arg-type]
    assert accepted == _matches(FEATURE_NAMES_PATTERN, feature_names), repr(feature_names)


def _accepts(build: Any) -> bool:
    from pydantic import ValidationError

    try:
        build()
    except ValidationError:
        return False
    return True


def test_the_schema_states_which_job_options_the_local_backend_refuses(schema: dict[str, Any]) -> None:
    assert set(LOCAL_BACKEND_REFUSED) == set(LOCAL_REFUSED_OPTIONS)
    job = schema["components"]["schemas"]["TrainingJobCreate"]
    assert job["if"] == {"required": ["backend"], "properties": {"backend": {"const": "sagemaker"}}}
    assert set(job["else"]["properties"]["resource_config"]["properties"]) == set(LOCAL_REFUSED_OPTIONS)


def test_a_backend_without_its_settings_is_the_documented_409(client: TestClient, schema: dict[str, Any]) -> None:
    job = {"name": "j", "train_dataset_id": "ds-x", "hyperparameters": {"k": 2}, "backend": "sagemaker"}
    response = client.post("/training-jobs", json=job)
    error = assert_error(response, 409, "not_configured", "backend 'sagemaker' is not configured")
    assert "CENTROID_AWS_REGION" in error["message"] and "retry-after" not in response.headers
    s3 = client.post("/datasets/s3", json={"name": "n", "uri": "s3://bucket/prefix/"})
    assert_error(s3, 409, "not_configured", "CENTROID_AWS_REGION")
    for path in ("/training-jobs", "/datasets/s3", "/endpoints"):
        assert "not_configured" in schema["paths"][path]["post"]["responses"]["409"]["description"], path


def test_the_repositorys_schemathesis_config_is_the_generated_one() -> None:
    """`st run .../openapi.json --checks all` from the repository root reads schemathesis.toml: it
    must hold exactly the allowances (and reasons) of POSITIVE_REFUSALS. Regenerate it with
    `python -m tests.reliability.fuzz_support config schemathesis.toml`."""
    from tests.reliability.fuzz_support import ROOT, schemathesis_config

    assert (ROOT / "schemathesis.toml").read_text() == schemathesis_config()
