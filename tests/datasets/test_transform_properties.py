"""Scaling lands in the target range, and the stored parameters reproduce it on new rows."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from schemas.datasets import DeriveStep, FillNaStep, JoinStep, ScaleStep, SelectStep
from service.datasets.transforms import (
    Table,
    apply_steps,
    column_lineage,
    derived_recipe,
    replay,
    scale_values,
    unscale_values,
)

values = st.lists(
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e9, max_value=1e9), min_size=2, max_size=50
)
ranges = st.tuples(st.floats(min_value=-100, max_value=100), st.floats(min_value=0.01, max_value=100)).map(
    lambda pair: (pair[0], pair[0] + pair[1])
)


def no_join(_: str) -> Table:
    raise AssertionError("no join expected")


def _spread_enough(data: list[float]) -> bool:
    return max(data) - min(data) > 1e-6 * max(1.0, max(abs(v) for v in data))


@given(values, ranges)
def test_minmax_lands_in_range_and_hits_both_ends(data: list[float], feature_range: tuple[float, float]) -> None:
    assume(_spread_enough(data))
    table = Table(pd.DataFrame({"v": data}), None)
    step = ScaleStep(op="scale", columns=["v"], feature_range=feature_range)
    result, fitted = apply_steps(table, [step], no_join)
    scaled = result.frame["v"].to_numpy()
    low, high = feature_range
    tolerance = 1e-9 * max(1.0, abs(low), abs(high))
    assert scaled.min() == pytest.approx(low, abs=tolerance)
    assert scaled.max() == pytest.approx(high, abs=tolerance)
    assert np.all((scaled >= low - tolerance) & (scaled <= high + tolerance))
    assert fitted[0].model_dump()["params"]["v"] == {"min": min(data), "max": max(data)}


@pytest.mark.slow
@given(values, st.sampled_from(["minmax", "standard"]), values)
def test_stored_parameters_reproduce_the_transform_on_new_rows(
    data: list[float], method: Literal["minmax", "standard"], new_rows: list[float]
) -> None:
    assume(_spread_enough(data))
    table = Table(pd.DataFrame({"v": data}), None)
    result, fitted = apply_steps(table, [ScaleStep(op="scale", columns=["v"], method=method)], no_join)
    recipe = {"source": "derived", "parent": {"source": "upload"}, "steps": fitted}
    replayed = replay(recipe, pd.DataFrame({"v": data}))
    np.testing.assert_allclose(replayed["v"], result.frame["v"], rtol=1e-12, atol=1e-12)
    fresh = replay(recipe, pd.DataFrame({"v": new_rows}))["v"].to_numpy()
    record = fitted[0].model_dump()
    expected = scale_values(np.asarray(new_rows), method, record["params"]["v"], record["feature_range"])
    np.testing.assert_allclose(fresh, expected)
    back = unscale_values(fresh, method, record["params"]["v"], record["feature_range"])
    np.testing.assert_allclose(back, new_rows, rtol=1e-6, atol=1e-6 * max(1.0, max(map(abs, data))))


def test_minmax_matches_numpy_interp_like_the_workshop() -> None:
    density = np.array([71.3, 0.6, 19.5, 40.6, 975.0, 21.0])
    table = Table(pd.DataFrame({"d": density}), None)
    result, _ = apply_steps(table, [ScaleStep(op="scale", columns=["d"])], no_join)
    np.testing.assert_allclose(result.frame["d"], np.interp(density, (density.min(), density.max()), (-1, 1)))


def test_replay_follows_joins_and_fills() -> None:
    """A recipe whose join brought in a scaled column replays that scaling on raw rows."""
    left = Table(pd.DataFrame({"k": ["a", "b", "c"], "x": [1.0, None, 3.0]}), "k")
    right = Table(pd.DataFrame({"k": ["a", "b", "c"], "d": [10.0, 20.0, 30.0]}), "k")
    right_scaled, right_steps = apply_steps(right, [ScaleStep(op="scale", columns=["d"])], no_join)
    right_recipe = derived_recipe("r0", right_steps, {"r0": {"source": "upload", "columns": ["k", "d"]}})
    steps: list[DeriveStep] = [
        JoinStep(op="join", dataset_id="r"),
        FillNaStep(op="fillna", columns=["x"]),
        SelectStep(op="select", columns=["d", "x"]),
    ]
    result, fitted = apply_steps(left, steps, lambda _: right_scaled)
    assert "right" not in fitted[0]  # the other side by reference, not embedded
    recipe = derived_recipe("l", fitted, {"l": {"source": "upload", "columns": ["k", "x"]}, "r": right_recipe})
    assert set(recipe["inputs"]) == {"l", "r", "r0"}
    raw = pd.DataFrame({"x": [None, 5.0], "d": [20.0, 40.0]})
    replayed = replay(recipe, raw)
    assert list(replayed.columns) == ["d", "x"]
    np.testing.assert_allclose(replayed["d"], [0.0, 2.0])
    np.testing.assert_allclose(replayed["x"], [2.0, 5.0])
    assert list(result.frame.columns) == ["k", "d", "x"]
    assert column_lineage(recipe)["d"].raw_name == "d" and len(column_lineage(recipe)["d"].scalings) == 1


def test_nested_recipes_stored_before_0004_still_replay() -> None:
    """The older form (parent and join sides embedded, ids alongside) reads like the new one."""
    upload = {"source": "upload", "columns": ["k", "d"]}
    scaled = {
        "source": "derived",
        "parent_id": "u",
        "parent": upload,
        "steps": [
            {
                "op": "scale",
                "columns": ["d"],
                "method": "minmax",
                "feature_range": [0.0, 1.0],
                "params": {"d": {"min": 10.0, "max": 30.0}},
            },
        ],
    }
    nested = {
        "source": "derived",
        "parent_id": "s",
        "parent": scaled,
        "steps": [
            {"op": "select", "columns": ["k"]},
            {"op": "join", "dataset_id": "s", "how": "inner", "on": "k", "right": scaled},
        ],
    }
    replayed = replay(nested, pd.DataFrame({"k": ["a"], "d": [20.0]}))
    assert replayed.to_dict("list") == {"k": ["a"], "d": [0.5]}
    assert column_lineage(nested)["d"].scalings[0].model_dump()["params"] == {"d": {"min": 10.0, "max": 30.0}}
