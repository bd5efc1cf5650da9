"""The online feature path equals the batch path, bit for bit.

* A model's recipe compiled to numpy (``service.datasets.online``) gives exactly the matrix that
  replaying the recipe on a typed DataFrame gives (``replay`` + ``frame_matrix``), for generated
  recipes (chains of min-max and z-score scalings, fills, renames, selects, joins, suffixes
  included) and rows, in both stored forms (by reference, and the older nested one), and for
  generated DAGs of datasets that share parents (diamonds, a dataset joined with itself level
  after level).
* The fast invocation parsers (CSV, JSON, JSON Lines) give exactly the exact parsers' matrix, or
  defer to them: the fast path never accepts what the exact path refuses.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from schemas.datasets import FillNaStep, JoinStep, RenameStep, ScaleStep, SelectStep
from service.datasets.online import compile_recipe, identity_recipe
from service.datasets.parsing import frame_from_rows, type_columns
from service.datasets.transforms import Table, apply_steps, derived_recipe, recipe_graph, recipe_size, replay
from service.endpoints import invocations
from service.endpoints.invocations import CSV, JSON, JSONLINES, parse_features
from service.errors import InvalidInput
from service.models.service import frame_matrix

finite = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6)
LEFT = ["a", "b", "c"]


def _batch_matrix(recipe: dict[str, Any], rows: list[dict[str, Any]], features: list[str]) -> np.ndarray:
    """Today's batch path: rows → typed DataFrame → replay → float matrix."""
    columns = list(dict.fromkeys(name for row in rows for name in row))
    frame = type_columns(frame_from_rows(columns, [[row.get(c) for c in columns] for row in rows]), None).frame
    return frame_matrix(replay(recipe, frame), features, "rows")


@st.composite
def recipes(draw: st.DrawFn) -> tuple[dict[str, Any], list[str]]:
    """A derived recipe fitted on generated data: scalings, fills, renames, a select, maybe a join."""
    n = draw(st.integers(min_value=3, max_value=12))
    column = st.lists(finite, min_size=n, max_size=n).filter(lambda v: max(v) - min(v) > 1e-3)
    data = {name: draw(column) for name in LEFT}
    frame = pd.DataFrame({"k": [f"r{i}" for i in range(n)], **data})
    # A null to fill, sometimes.
    if draw(st.booleans()):
        frame.loc[draw(st.integers(0, n - 1)), "b"] = np.nan
    right_data = draw(column)
    # Sometimes the other side is keyed "id" and has an "a" too: joined key to key with suffixes.
    shares = draw(st.booleans())
    right_key = "id" if shares else "k"
    right = pd.DataFrame({right_key: [f"r{i}" for i in range(n)], "d": right_data})
    if shares:
        right["a"] = draw(column)
    right_recipe = {"source": "upload", "columns": list(right.columns)}

    def load(_: str) -> Table:
        return Table(right, right_key)

    steps: list[Any] = []
    names = list(LEFT)
    if draw(st.booleans()):
        if shares:
            steps.append(JoinStep(op="join", dataset_id="ds-right", how="inner", suffixes=("_l", "_r")))
            names = ["a_l", *LEFT[1:], "a_r"]
        else:
            steps.append(JoinStep(op="join", dataset_id="ds-right", how="inner"))
        names.append("d")
    steps.append(FillNaStep(op="fillna", columns=["b"], strategy="mean"))
    for _ in range(draw(st.integers(1, 4))):
        target = draw(st.sampled_from(names))
        if draw(st.booleans()):
            low = draw(st.floats(min_value=-10, max_value=10))
            width = draw(st.floats(min_value=0.5, max_value=10))
            steps.append(ScaleStep(op="scale", columns=[target], method="minmax", feature_range=(low, low + width)))
        else:
            steps.append(ScaleStep(op="scale", columns=[target], method="standard"))
    if draw(st.booleans()):
        renamed = {names[0]: names[0] + "_x"}
        steps.append(RenameStep(op="rename", mapping=renamed))
        names = [renamed.get(name, name) for name in names]
    features = draw(st.lists(st.sampled_from(names), min_size=1, max_size=len(names), unique=True))
    steps.append(SelectStep(op="select", columns=features))
    try:
        _, fitted = apply_steps(Table(frame, "k"), steps, load)
    except InvalidInput:
        assume(False)
    parent = {"source": "upload", "columns": ["k", *LEFT]}
    return derived_recipe("ds-left", fitted, {"ds-left": parent, "ds-right": right_recipe}), features


def nested(recipe: dict[str, Any]) -> dict[str, Any]:
    """The same recipe in the form stored before migration 0004: parents and join sides embedded."""
    graph = recipe_graph(recipe)

    def nest(node: dict[str, Any]) -> dict[str, Any]:
        if node.get("source") != "derived":
            return node
        steps = [{**r, "right": nest(graph.nodes[r["dataset_id"]])} if r["op"] == "join" else r for r in node["steps"]]
        return {**node, "parent": nest(graph.nodes[node["parent_id"]]), "steps": steps}

    return nest(graph.root)


raw_cell = st.one_of(finite, st.integers(min_value=-(10**6), max_value=10**6), st.none())


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(recipes(), st.lists(st.fixed_dictionaries({name: raw_cell for name in [*LEFT, "d"]}), min_size=1, max_size=8))
def test_compiled_recipe_equals_the_replay_bit_for_bit(
    recipe_and_features: tuple[dict[str, Any], list[str]], rows: list[dict[str, Any]]
) -> None:
    recipe, features = recipe_and_features
    for form in (recipe, nested(recipe)):
        _assert_compiled_equals_replay(form, features, rows)


def _assert_compiled_equals_replay(recipe: dict[str, Any], features: list[str], rows: list[dict[str, Any]]) -> None:
    compiled = compile_recipe(recipe, features, "k")
    assert compiled.programs is not None
    try:
        expected = _batch_matrix(recipe, rows, features)
    except InvalidInput as exc:
        with pytest.raises(InvalidInput) as online:
            compiled.matrix(rows)
        assert ("finite" in exc.message) == ("finite" in online.value.message)
        return
    got = compiled.matrix(rows)
    assert got.dtype == np.float64 and got.shape == expected.shape
    assert got.tobytes() == expected.tobytes()  # bit for bit


# --- DAGs of datasets sharing parents -----------------------------------------------------------

UPLOAD = ["a", "b", "c", "d"]
scale_steps = st.builds(
    lambda method, low, width: {"method": method, "feature_range": (low, low + width)},
    st.sampled_from(["minmax", "standard"]),
    st.floats(min_value=-10, max_value=10),
    st.floats(min_value=0.5, max_value=10),
)


@st.composite
def dag_recipes(draw: st.DrawFn) -> tuple[dict[str, Any], list[str]]:
    """Datasets derived like a client would, through the real ``apply_steps`` and ``derived_recipe``:

    ``P = derive(U, fill b, scale a)``; ``L = derive(P, select a b, scale b)``; ``R = derive(P,
    select c d, scale c, rename d)``; ``T = derive(L, join R, scale ...)`` (a diamond over P); then
    0-3 levels of ``derive(T_n, select key, join T_n)`` (the recipe that used to double); finally a
    select of the features. Every recipe reaches P by several paths.
    """
    n = draw(st.integers(min_value=3, max_value=10))
    column = st.lists(finite, min_size=n, max_size=n).filter(lambda v: max(v) - min(v) > 1e-3)
    keys = [f"r{i}" for i in range(n)]
    upload = pd.DataFrame({"k": keys, **{name: draw(column) for name in UPLOAD}})
    if draw(st.booleans()):
        upload.loc[draw(st.integers(0, n - 1)), "b"] = np.nan
    tables: dict[str, Table] = {"U": Table(upload, "k")}
    stored: dict[str, dict[str, Any]] = {"U": {"source": "upload", "columns": ["k", *UPLOAD]}}

    def derive(name: str, parent: str, steps: list[Any]) -> None:
        table, fitted = apply_steps(tables[parent], steps, tables.__getitem__)
        inputs = {parent: stored[parent], **{s.dataset_id: stored[s.dataset_id] for s in steps if s.op == "join"}}
        tables[name], stored[name] = table, derived_recipe(parent, fitted, inputs)

    def scale(target: str) -> ScaleStep:
        return ScaleStep(op="scale", columns=[target], **draw(scale_steps))

    try:
        derive("P", "U", [FillNaStep(op="fillna", columns=["b"], strategy="mean"), scale("a")])
        derive("L", "P", [SelectStep(op="select", columns=["a", "b"]), scale("b")])
        derive(
            "R",
            "P",
            [SelectStep(op="select", columns=["c", "d"]), scale("c"), RenameStep(op="rename", mapping={"d": "d2"})],
        )
        names = ["a", "b", "c", "d2"]
        extra = [scale(target) for target in draw(st.lists(st.sampled_from(names), max_size=2))]
        derive("T0", "L", [JoinStep(op="join", dataset_id="R"), *extra])
        levels = draw(st.integers(0, 3))
        for level in range(levels):
            doubling = [SelectStep(op="select", columns=["k"]), JoinStep(op="join", dataset_id=f"T{level}")]
            derive(f"T{level + 1}", f"T{level}", doubling)
        features = draw(st.lists(st.sampled_from(names), min_size=1, max_size=len(names), unique=True))
        derive("F", f"T{levels}", [SelectStep(op="select", columns=features)])
    except InvalidInput:
        assume(False)
    recipe = stored["F"]
    graph = recipe_graph(recipe)
    assert set(graph.nodes) == {"U", "P", "L", "R", *(f"T{i}" for i in range(levels + 1))}  # each once
    assert recipe_size(recipe).depth == levels + 4
    return recipe, features


@pytest.mark.slow
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dag_recipes(), st.lists(st.fixed_dictionaries({name: raw_cell for name in UPLOAD}), min_size=1, max_size=8))
def test_compiled_dag_recipe_equals_the_replay_bit_for_bit(
    recipe_and_features: tuple[dict[str, Any], list[str]], rows: list[dict[str, Any]]
) -> None:
    recipe, features = recipe_and_features
    for form in (recipe, nested(recipe)):
        _assert_compiled_equals_replay(form, features, rows)


@pytest.mark.slow
@given(st.lists(st.fixed_dictionaries({"x": st.one_of(finite, st.text(max_size=6), st.none())}), min_size=1))
def test_text_cells_read_like_an_upload(rows: list[dict[str, Any]]) -> None:
    """Numeric text ('1,210.5', ' 7 ') reads as numbers; other text is refused, as for uploads."""
    compiled = identity_recipe(["x"], None)
    try:
        expected = _batch_matrix({"source": "json", "columns": ["x"]}, rows, ["x"])
    except InvalidInput:
        with pytest.raises(InvalidInput):
            compiled.matrix(rows)
        return
    assert compiled.matrix(rows).tobytes() == expected.tobytes()


def test_thousands_separators_and_quoted_numbers_read_as_numbers() -> None:
    rows: list[dict[str, Any]] = [{"x": "1,210.5"}, {"x": " 7 "}, {"x": 3}]
    assert identity_recipe(["x"], None).matrix(rows).ravel().tolist() == [1210.5, 7.0, 3.0]


# --- invocation bodies ------------------------------------------------------------------------

matrices = st.integers(min_value=1, max_value=6).flatmap(
    lambda d: st.lists(st.lists(finite, min_size=d, max_size=d), min_size=1, max_size=40)
)


def _exact(body: bytes, kind: str, dim: int) -> np.ndarray:
    """The exact path alone (the fast paths switched off)."""
    original = invocations._fast_csv, invocations._fast_json
    invocations._fast_csv = lambda *_: None  # type: ignore[assignment]
    invocations._fast_json = lambda *_: None  # type: ignore[assignment]
    try:
        return parse_features(body, kind, dim, 10_000)
    finally:
        invocations._fast_csv, invocations._fast_json = original


def _same_outcome(body: bytes, kind: str, dim: int) -> None:
    try:
        expected = _exact(body, kind, dim)
    except InvalidInput:
        with pytest.raises(InvalidInput):
            parse_features(body, kind, dim, 10_000)
        return
    got = parse_features(body, kind, dim, 10_000)
    assert got.tobytes() == expected.tobytes()


@given(matrices, st.sampled_from(["\n", "\r\n"]), st.booleans())
def test_fast_csv_equals_the_exact_parser(rows: list[list[float]], newline: str, trailing: bool) -> None:
    body = newline.join(",".join(repr(v) for v in row) for row in rows) + (newline if trailing else "")
    _same_outcome(body.encode(), CSV, len(rows[0]))


@pytest.mark.slow
@settings(deadline=None)  # parses bodies of up to 400 rows: time varies with machine load
@given(st.integers(1, 400), st.integers(1, 6))
def test_large_csv_bodies_take_the_columnar_reader_and_agree(n: int, dim: int) -> None:
    rng = np.random.default_rng(n * 7 + dim)
    data = rng.uniform(-1e4, 1e4, (n * 10, dim))
    body = ("\n".join(",".join(repr(float(v)) for v in row) for row in data) + "\n").encode()
    got = parse_features(body, CSV, dim, 100_000)
    assert got.tobytes() == data.tobytes()
    _same_outcome(body, CSV, dim)


@given(st.text(alphabet='0123456789.,-e\n "ainf', max_size=60), st.integers(1, 4))
def test_fast_csv_never_accepts_what_the_exact_parser_refuses(text: str, dim: int) -> None:
    assume(text.strip())
    _same_outcome(text.encode(), CSV, dim)


@given(matrices, st.sampled_from(["features", "bare", "dense"]))
def test_fast_json_equals_the_exact_parser(rows: list[list[float]], form: str) -> None:
    def instance(row: list[float]) -> Any:
        if form == "bare":
            return row
        if form == "dense":
            return {"data": {"features": {"values": row}}}
        return {"features": row}

    dim = len(rows[0])
    _same_outcome(json.dumps({"instances": [instance(r) for r in rows]}).encode(), JSON, dim)
    _same_outcome("\n".join(json.dumps(instance(r)) for r in rows).encode(), JSONLINES, dim)


@given(
    st.lists(
        st.lists(st.one_of(finite, st.integers(-(2**70), 2**70), st.booleans(), st.text(max_size=3)), min_size=2),
        min_size=1,
        max_size=5,
    )
)
def test_fast_json_defers_on_booleans_text_and_huge_integers(rows: list[list[Any]]) -> None:
    _same_outcome(json.dumps({"instances": [{"features": r} for r in rows]}).encode(), JSON, len(rows[0]))
