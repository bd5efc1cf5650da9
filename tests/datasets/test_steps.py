"""Derive steps as classes: the stored JSON is what it always was, and a stored step Centroid does
not know is refused by name (replay, online compile, column lineage), never skipped.

``EXPECTED_STEPS`` and ``EXPECTED_RECIPE_JSON`` were produced by the code before the steps became
classes (fitted steps as plain dicts), on the frames below; the fitted models must dump
(``model_dump(mode="json")``) to exactly that JSON, key order and ``0`` versus ``0.0`` included,
on the pandas path and on the DuckDB path, and parse back from it unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, get_args

import numpy as np
import pandas as pd
import pytest
from pydantic import TypeAdapter

from schemas.datasets import DeriveStep
from service.datasets.columnar import ParquetInput, derive_parquet
from service.datasets.online import compile_recipe
from service.datasets.service import dtype_name
from service.datasets.steps import (
    STEP_CLASSES,
    FittedScale,
    FittedStep,
    FittedStepBase,
    parse_step,
)
from service.datasets.transforms import Table, apply_steps, column_lineage, derived_recipe, replay
from service.errors import InvalidInput

REQUESTS = TypeAdapter(list[DeriveStep])
FITTED = TypeAdapter(FittedStep)

LEFT = pd.DataFrame(
    {
        "k": pd.array(["a", "b", "c", "d"], dtype="string"),
        "a": [1.0, np.nan, 3.5, 4.0],
        "b": [1, 2, 3, 10],
        "c": [0.5, -2.0, 7.25, 1.0],
        "t": pd.array(["x", None, "y", "z"], dtype="string"),
    }
)
RIGHT = pd.DataFrame(
    {"k": pd.array(["a", "b", "c", "e"], dtype="string"), "r": [10, 20, 30, 40], "s": [1.5, 2.5, np.nan, 4.5]}
)

CASES: dict[str, list[dict[str, Any]]] = {
    "join_default": [{"op": "join", "dataset_id": "R"}],
    "join_left_on": [{"op": "join", "dataset_id": "R", "how": "left", "on": "k"}],
    "scale_minmax": [{"op": "scale", "columns": ["b", "c"]}],
    "scale_minmax_range": [{"op": "scale", "columns": ["c", "c"], "feature_range": [0, 5]}],
    "scale_standard": [{"op": "scale", "columns": ["a", "b"], "method": "standard"}],
    "select": [{"op": "select", "columns": ["c", "a", "c"]}],
    "drop": [{"op": "drop", "columns": ["t", "t", "b"]}],
    "rename": [{"op": "rename", "mapping": {"a": "alpha", "c": "gamma"}}],
    "dropna_all": [{"op": "dropna"}],
    "dropna_columns": [{"op": "dropna", "columns": ["a", "a"]}],
    "fillna_default": [{"op": "drop", "columns": ["t"]}, {"op": "fillna"}],
    "fillna_mean": [{"op": "fillna", "columns": ["a", "b"], "strategy": "mean"}],
    "fillna_int": [{"op": "fillna", "columns": ["a"], "strategy": "constant", "value": 0}],
    "fillna_float": [{"op": "fillna", "columns": ["a", "c"], "strategy": "constant", "value": 2.5}],
    "fillna_text": [{"op": "fillna", "columns": ["t"], "strategy": "constant", "value": "none"}],
    "pipeline": [
        {"op": "join", "dataset_id": "R", "how": "left"},
        {"op": "fillna", "columns": ["s"], "strategy": "mean"},
        {"op": "scale", "columns": ["s", "r"], "method": "standard"},
        {"op": "rename", "mapping": {"s": "S"}},
        {"op": "select", "columns": ["S", "r", "a"]},
        {"op": "dropna"},
    ],
}

# What the fitted steps were before they became classes (captured from that code, as JSON-ready dicts).
EXPECTED_STEPS: dict[str, list[dict[str, Any]]] = {
    "join_default": [{"op": "join", "dataset_id": "R", "how": "inner", "on": "k"}],
    "join_left_on": [{"op": "join", "dataset_id": "R", "how": "left", "on": "k"}],
    "scale_minmax": [
        {
            "op": "scale",
            "columns": ["b", "c"],
            "method": "minmax",
            "feature_range": [-1.0, 1.0],
            "params": {"b": {"min": 1.0, "max": 10.0}, "c": {"min": -2.0, "max": 7.25}},
        }
    ],
    "scale_minmax_range": [
        {
            "op": "scale",
            "columns": ["c", "c"],
            "method": "minmax",
            "feature_range": [0.0, 5.0],
            "params": {"c": {"min": -2.0, "max": 7.25}},
        }
    ],
    "scale_standard": [
        {
            "op": "scale",
            "columns": ["a", "b"],
            "method": "standard",
            "feature_range": [-1.0, 1.0],
            "params": {
                "a": {"mean": 2.8333333333333335, "std": 1.3123346456686351},
                "b": {"mean": 4.0, "std": 3.5355339059327378},
            },
        }
    ],
    "select": [{"op": "select", "columns": ["c", "a"]}],
    "drop": [{"op": "drop", "columns": ["t", "b"]}],
    "rename": [{"op": "rename", "mapping": {"a": "alpha", "c": "gamma"}}],
    "dropna_all": [{"op": "dropna", "columns": None}],
    "dropna_columns": [{"op": "dropna", "columns": ["a", "a"]}],
    "fillna_default": [{"op": "drop", "columns": ["t"]}, {"op": "fillna", "values": {"a": 2.8333333333333335}}],
    "fillna_mean": [{"op": "fillna", "values": {"a": 2.8333333333333335, "b": 4.0}}],
    "fillna_int": [{"op": "fillna", "values": {"a": 0}}],
    "fillna_float": [{"op": "fillna", "values": {"a": 2.5, "c": 2.5}}],
    "fillna_text": [{"op": "fillna", "values": {"t": "none"}}],
    "pipeline": [
        {"op": "join", "dataset_id": "R", "how": "left", "on": "k"},
        {"op": "fillna", "values": {"s": 2.0}},
        {
            "op": "scale",
            "columns": ["s", "r"],
            "method": "standard",
            "feature_range": [-1.0, 1.0],
            "params": {"s": {"mean": 2.0, "std": 0.3535533905932738}, "r": {"mean": 20.0, "std": 8.16496580927726}},
        },
        {"op": "rename", "mapping": {"s": "S"}},
        {"op": "select", "columns": ["S", "r", "a"]},
        {"op": "dropna", "columns": None},
    ],
}

INPUTS = {
    "L": {"source": "upload", "filename": "l.csv", "columns": ["k", "a", "b", "c", "t"]},
    "R": {"source": "json", "columns": ["k", "r", "s"]},
}
# derived_recipe("L", <the pipeline's fitted steps>, INPUTS) as stored before (compact JSON).
EXPECTED_RECIPE_JSON = (
    '{"source":"derived","parent_id":"L","steps":[{"op":"join","dataset_id":"R","how":"left","on":"k"},'
    '{"op":"fillna","values":{"s":2.0}},{"op":"scale","columns":["s","r"],"method":"standard",'
    '"feature_range":[-1.0,1.0],"params":{"s":{"mean":2.0,"std":0.3535533905932738},'
    '"r":{"mean":20.0,"std":8.16496580927726}}},{"op":"rename","mapping":{"s":"S"}},'
    '{"op":"select","columns":["S","r","a"]},{"op":"dropna","columns":null}],'
    '"inputs":{"L":{"source":"upload","filename":"l.csv","columns":["k","a","b","c","t"]},'
    '"R":{"source":"json","columns":["k","r","s"]}}}'
)


def stored_json(fitted: list[Any]) -> str:
    """The bytes a recipe stores for these fitted steps (dicts, as before, or models, as now)."""
    return json.dumps([step.model_dump(mode="json") if isinstance(step, FittedStepBase) else step for step in fitted])


def pandas_fitted(case: str) -> list[FittedStep]:
    tables = {"L": Table(LEFT, "k"), "R": Table(RIGHT, "k")}
    _, fitted = apply_steps(tables["L"], REQUESTS.validate_python(CASES[case]), tables.__getitem__)
    return fitted


def columnar_fitted(case: str, directory: Path) -> list[FittedStep]:
    inputs = {}
    for name, frame in (("L", LEFT), ("R", RIGHT)):
        path = directory / f"{name}.parquet"
        frame.to_parquet(path, index=False)
        inputs[name] = ParquetInput(path, "k", [{"name": c, "dtype": dtype_name(frame[c])} for c in frame.columns])
    result = derive_parquet(
        inputs["L"],
        REQUESTS.validate_python(CASES[case]),
        inputs,
        directory / "out.parquet",
        row_group_rows=4,
        temp_directory=directory / "work",
    )
    return result.steps


# --- the stored JSON -------------------------------------------------------------------------------


def test_every_step_kind_is_covered() -> None:
    ops = {step["op"] for steps in CASES.values() for step in steps}
    assert ops == set(STEP_CLASSES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_fitted_steps_store_the_same_json_as_before(case: str, tmp_path: Path) -> None:
    expected = json.dumps(EXPECTED_STEPS[case])
    pandas = pandas_fitted(case)
    assert all(isinstance(step, STEP_CLASSES[step.op]) for step in pandas)
    assert stored_json(pandas) == expected
    assert stored_json(columnar_fitted(case, tmp_path)) == expected


def test_the_stored_recipe_is_byte_for_byte_the_same() -> None:
    recipe = derived_recipe("L", pandas_fitted("pipeline"), INPUTS)
    assert json.dumps(recipe, separators=(",", ":")) == EXPECTED_RECIPE_JSON


@pytest.mark.parametrize("case", sorted(CASES))
def test_stored_steps_parse_with_the_union_and_dump_back_unchanged(case: str) -> None:
    for record in json.loads(json.dumps(EXPECTED_STEPS[case])):  # as read back from the database
        parsed = FITTED.validate_python(record)
        assert type(parsed) is STEP_CLASSES[record["op"]]
        assert json.dumps(parsed.model_dump(mode="json")) == json.dumps(record)
        assert parse_step(record) == parsed
        assert FITTED.validate_json(json.dumps(record)) == parsed


def test_a_stored_recipe_replays_as_before() -> None:
    """The stored pipeline recipe on raw rows: the values the code before the classes gave."""
    recipe = json.loads(EXPECTED_RECIPE_JSON)
    raw = pd.DataFrame(
        {
            "k": ["a", "q", "z"],
            "a": [1.0, np.nan, 9.0],
            "b": [3, 4, 5],
            "c": [1.5, np.nan, -3.0],
            "t": ["u", None, "w"],
            "r": [10, 15, 99],
            "s": [np.nan, 2.25, 3.0],
        }
    )
    replayed = replay(recipe, raw)
    assert list(replayed.columns) == ["S", "r", "a"]
    np.testing.assert_array_equal(replayed["S"], [0.0, 0.7071067811865475, 2.82842712474619])
    np.testing.assert_array_equal(replayed["r"], [-1.224744871391589, -0.6123724356957945, 9.675484483993554])
    np.testing.assert_array_equal(replayed["a"], [1.0, np.nan, 9.0])
    lineage = column_lineage(recipe)
    assert lineage["S"].raw_name == "s" and [s.params for s in lineage["S"].scalings] == [
        {"s": FittedScale.model_validate(EXPECTED_STEPS["pipeline"][2]).params["s"]}
    ]


# --- the registry and the union --------------------------------------------------------------------


def test_the_registry_has_one_class_per_request_step() -> None:
    request_ops = {member.model_fields["op"].annotation.__args__[0] for member in get_args(get_args(DeriveStep)[0])}
    assert set(STEP_CLASSES) == request_ops
    for op, cls in STEP_CLASSES.items():
        assert issubclass(cls, FittedStepBase) and cls.model_fields["op"].default == op


def test_scale_parameters_must_match_the_method() -> None:
    record = {**EXPECTED_STEPS["scale_minmax"][0], "method": "standard"}
    with pytest.raises(InvalidInput, match="malformed") as caught:
        parse_step(record)
    assert caught.value.details["op"] == "scale"


def _recipe_with(step: dict[str, Any], *, in_input: bool = False) -> dict[str, Any]:
    """A stored recipe whose own node (or, ``in_input``, its parent's) holds ``step``."""
    upload = {"source": "upload", "columns": ["k", "x"]}
    odd = {"source": "derived", "parent_id": "u", "steps": [step]}
    if in_input:
        return {
            "source": "derived",
            "parent_id": "p",
            "steps": [{"op": "select", "columns": ["x"]}],
            "inputs": {"u": upload, "p": odd},
        }
    return {**odd, "inputs": {"u": upload}}


UNKNOWN = {"op": "clip", "columns": ["x"], "low": 0.0, "high": 1.0}


@pytest.mark.parametrize("in_input", [False, True])
def test_replay_refuses_an_unknown_step(in_input: bool) -> None:
    with pytest.raises(InvalidInput, match="'clip'") as caught:
        replay(_recipe_with(UNKNOWN, in_input=in_input), pd.DataFrame({"k": ["a"], "x": [0.5]}))
    assert caught.value.details == {"op": "clip", "known": list(STEP_CLASSES)}


@pytest.mark.parametrize("in_input", [False, True])
def test_online_compile_refuses_an_unknown_step(in_input: bool) -> None:
    with pytest.raises(InvalidInput, match="'clip'"):
        compile_recipe(_recipe_with(UNKNOWN, in_input=in_input), ["x"], "k")


@pytest.mark.parametrize("in_input", [False, True])
def test_column_lineage_refuses_an_unknown_step(in_input: bool) -> None:
    with pytest.raises(InvalidInput, match="'clip'"):
        column_lineage(_recipe_with(UNKNOWN, in_input=in_input))


def test_a_nested_recipe_with_an_unknown_step_is_refused_too() -> None:
    nested = {
        "source": "derived",
        "parent_id": "u",
        "parent": {"source": "upload", "columns": ["x"]},
        "steps": [UNKNOWN],
    }
    with pytest.raises(InvalidInput, match="'clip'"):
        replay(nested, pd.DataFrame({"x": [0.5]}))


@pytest.mark.parametrize(
    "step",
    [
        {"columns": ["x"]},  # no op at all
        {"op": None},
        {"op": ["scale"]},
    ],
)
def test_a_step_without_a_known_op_is_refused(step: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput, match="does not know"):
        replay(_recipe_with(step), pd.DataFrame({"x": [0.5]}))


@pytest.mark.parametrize(
    ("step", "where"),
    [
        ({"op": "scale", "columns": ["x"], "method": "minmax", "feature_range": [0.0, 1.0]}, "params"),
        ({"op": "fillna", "values": {"x": [1]}}, "values.x"),
        ({"op": "join", "dataset_id": "u", "how": "outer", "on": "k"}, "how"),
        ({"op": "select", "columns": ["x"], "right": {}}, "right"),
    ],
)
def test_a_malformed_known_step_is_refused(step: dict[str, Any], where: str) -> None:
    for attempt in (
        lambda: replay(_recipe_with(step), pd.DataFrame({"x": [0.5]})),
        lambda: compile_recipe(_recipe_with(step), ["x"], "k"),
        lambda: column_lineage(_recipe_with(step)),
    ):
        with pytest.raises(InvalidInput, match=f"malformed: {where}"):
            attempt()
