"""The columnar derive (DuckDB over Parquet) equals the pandas one, bit for bit, errors included.

For generated datasets and generated step lists, :func:`derive_parquet` gives what
``apply_steps`` followed by ``ensure_unique_key`` gives (``DatasetService.derive``): the same
fitted steps, and a file that ``pd.read_parquet`` reads back as the pandas result frame, float
values compared by their bits; or the same error (class, message, details). Every refusal of
``apply_steps`` is also exercised by an explicit case, and :func:`check_key_parquet` is compared
with ``parsing.check_key`` on generated key columns.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter

from schemas.datasets import DeriveStep
from service.datasets.columnar import PairwiseSum, ParquetInput, check_key_parquet, derive_parquet
from service.datasets.parsing import check_key
from service.datasets.service import dtype_name
from service.datasets.transforms import Table, apply_steps, ensure_unique_key
from service.errors import AppError

STEPS = TypeAdapter(list[DeriveStep])
ROW_GROUP_ROWS = 4


@dataclass(frozen=True)
class Outcome:
    """A derive's result (frame as read back, fitted steps, key column) or its error."""

    frame: pd.DataFrame | None = None
    fitted: list[dict[str, Any]] | None = None
    key_column: str | None = None
    error: tuple[type, str, Any] | None = None
    path: Path | None = None  # the file written


@contextmanager
def workspace() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="columnar-") as name:
        yield Path(name)


def store(
    directory: Path,
    name: str,
    frame: pd.DataFrame,
    key_column: str | None,
    group: int = ROW_GROUP_ROWS,
    trust_key: bool = True,
) -> ParquetInput:
    """The dataset as the service stores it (``_store_new``). Its key is declared unique when it is
    (every stored dataset's is) unless ``trust_key`` is off: then every check runs on it."""
    path = directory / f"{name}.parquet"
    frame.to_parquet(path, index=False, row_group_size=group)
    columns = [{"name": c, "dtype": dtype_name(frame[c])} for c in frame.columns]
    return ParquetInput(path, key_column, columns, key_unique=trust_key and key_is_unique(frame, key_column))


def key_is_unique(frame: pd.DataFrame, key_column: str | None) -> bool:
    if key_column is None:
        return False
    try:
        check_key(frame, key_column)
    except AppError:
        return False
    return True


def pandas_derive(
    parent: str, steps: list[Any], inputs: Mapping[str, ParquetInput], directory: Path, group: int = ROW_GROUP_ROWS
) -> Outcome:
    def load(dataset_id: str) -> Table:
        source = inputs[dataset_id]
        return Table(pd.read_parquet(source.path), source.key_column)

    try:
        table, fitted = apply_steps(load(parent), steps, load)
        ensure_unique_key(table)
    except AppError as exc:
        return Outcome(error=(type(exc), exc.message, exc.details))
    path = directory / "pandas-result.parquet"
    table.frame.reset_index(drop=True).to_parquet(path, index=False, row_group_size=group)
    read_back = pd.read_parquet(path)
    pd.testing.assert_frame_equal(read_back, table.frame.reset_index(drop=True), check_exact=True)
    return Outcome(read_back, fitted, table.key_column, path=path)


# Joins are matched by positions (positional_join) when they fit the memory limit, else by DuckDB's
# hash join: this limit is below what any positional join needs, so it takes the second path.
HASH_JOIN_MEMORY = "8MB"


def columnar_derive(
    parent: str,
    steps: list[Any],
    inputs: Mapping[str, ParquetInput],
    directory: Path,
    group: int = ROW_GROUP_ROWS,
    memory_limit: str = "256MB",
) -> Outcome:
    out = directory / "columnar-result.parquet"
    try:
        result = derive_parquet(
            inputs[parent],
            steps,
            inputs,
            out,
            row_group_rows=group,
            memory_limit=memory_limit,
            temp_directory=directory / "spill",
        )
    except AppError as exc:
        assert not out.exists()
        return Outcome(error=(type(exc), exc.message, exc.details))
    finally:
        assert not list((directory / "spill").glob("derive-*")), "the work directory is removed"
    frame = pd.read_parquet(out)
    assert result.row_count == len(frame)
    assert result.columns == [{"name": c, "dtype": dtype_name(frame[c])} for c in frame.columns]
    groups = pq.ParquetFile(out).metadata
    sizes = [groups.row_group(i).num_rows for i in range(groups.num_row_groups)]
    assert sizes == [min(group, len(frame) - start) for start in range(0, len(frame), group)]
    return Outcome(frame, result.steps, result.key_column, path=out)


def assert_same(expected: Outcome, actual: Outcome) -> None:
    assert actual.error == expected.error
    if expected.error is not None:
        return
    assert actual.frame is not None and expected.frame is not None
    pd.testing.assert_frame_equal(actual.frame, expected.frame, check_exact=True)
    for name in expected.frame.columns:
        if expected.frame[name].dtype == "float64":
            bits = [frame[name].to_numpy().view(np.int64) for frame in (expected.frame, actual.frame)]
            nan = expected.frame[name].isna().to_numpy()
            np.testing.assert_array_equal(bits[0][~nan], bits[1][~nan])
    assert repr(actual.fitted) == repr(expected.fitted)  # repr: float bits (a -0.0), not just ==
    assert actual.key_column == expected.key_column
    assert actual.path is not None and expected.path is not None
    # The same Arrow schema, pandas metadata included (so every reader sees the same types).
    assert pq.read_schema(actual.path).equals(pq.read_schema(expected.path), check_metadata=True)


def compare(
    frames: Mapping[str, tuple[pd.DataFrame, str | None]],
    steps: list[dict[str, Any]],
    parent: str = "L",
    group: int = ROW_GROUP_ROWS,
    trust_keys: bool = True,
    memory_limit: str = "256MB",
) -> Outcome:
    """Derive with both implementations from the same stored files; assert they agree."""
    validated = STEPS.validate_python(steps)
    with workspace() as directory:
        inputs = {name: store(directory, name, frame, key, group, trust_keys) for name, (frame, key) in frames.items()}
        expected = pandas_derive(parent, validated, inputs, directory, group)
        actual = columnar_derive(parent, validated, inputs, directory, group, memory_limit)
        assert_same(expected, actual)
    return expected


# --- generated datasets and steps -----------------------------------------------------------------

KEYS = [f"k{i}" for i in range(12)]
LEFT_NAMES = ["x", "X", "n", "s", "t"]
RIGHT_NAMES = ["r", "R", "q", "q2", "q3", "x"]  # x: a column both sides have, sometimes
floats = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False).map(lambda v: v + 0.0)  # no -0.0
texts = st.sampled_from(["a", "b", "1", " 2 ", "1,000", "x y", "٣", "", "-"])


@st.composite
def column_values(draw: st.DrawFn, dtype: str, rows: int) -> pd.Series:
    if dtype == "int64":
        return pd.Series(draw(st.lists(st.integers(-50, 50), min_size=rows, max_size=rows)), dtype="int64")
    if dtype == "float64":
        cells = st.one_of(floats, st.integers(-3, 3).map(float), st.none())
        return pd.Series(draw(st.lists(cells, min_size=rows, max_size=rows)), dtype="float64")
    return pd.Series(draw(st.lists(st.one_of(texts, st.none()), min_size=rows, max_size=rows)), dtype="string")


@st.composite
def dataset(draw: st.DrawFn, names: list[str], keys: list[str]) -> tuple[pd.DataFrame, str | None]:
    rows = len(keys)
    data: dict[str, pd.Series] = {}
    # Hypothesis favours small integers: the rare branches are the large ones.
    if draw(st.integers(0, 19)) < 19:  # mostly keyed
        key_cells: list[str | None] = list(keys)
        if rows > 1 and draw(st.integers(0, 9)) == 9:  # rarely a duplicate or a null key
            key_cells[draw(st.integers(1, rows - 1))] = draw(st.sampled_from([key_cells[0], None]))
        data["k"] = pd.Series(key_cells, dtype="string")
    for name in draw(st.lists(st.sampled_from(names), min_size=1, max_size=4, unique=True)):
        data[name] = draw(column_values(draw(st.sampled_from(["int64", "float64", "float64", "string"])), rows))
    return pd.DataFrame(data), ("k" if "k" in data and draw(st.integers(0, 9)) < 9 else None)


feature_range = st.sampled_from([(-1.0, 1.0), (0.0, 1.0), (-3.5, 0.25)])
# A join's columns: the keys (mostly), one name on both sides, two names, one side's only, or a
# refused mix of `on` and `left_on`.
join_columns: st.SearchStrategy[dict[str, str]] = st.one_of(
    st.just({}),
    st.just({}),
    st.just({}),
    st.builds(lambda on: {"on": on}, st.sampled_from(["k", "n", "x"])),
    st.builds(
        lambda left, right: {"left_on": left, "right_on": right},
        st.sampled_from(["k", "n", "x", "s"]),
        st.sampled_from(["k", "r", "q", "x"]),
    ),
    st.builds(lambda left: {"left_on": left}, st.sampled_from(["k", "n", "x"])),
    st.builds(lambda right: {"right_on": right}, st.sampled_from(["k", "r", "x"])),
    st.just({"on": "k", "left_on": "k"}),
)


def step_dicts(known: list[str], numeric: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Steps naming mostly columns the datasets have (numeric ones for scale and mean), rarely others."""
    features = [name for name in known if name != "k"]
    names = st.sampled_from([*features, *features, *features, "k", "nope"])
    name_lists = st.lists(names, min_size=1, max_size=3)
    numbers = st.lists(st.sampled_from([*numeric, *numeric, *numeric, *known, "nope"]), min_size=1, max_size=3)
    return st.one_of(
        st.builds(
            lambda how, names, suffixes: {
                "op": "join",
                "dataset_id": "R",
                "how": how,
                **names,
                **({} if suffixes is None else {"suffixes": suffixes}),
            },
            st.sampled_from(["inner", "left"]),
            join_columns,
            st.sampled_from([None, None, None, ("_l", "_r"), ("", "_r"), ("_l", ""), ("", ""), ("_r", "_r")]),
        ),
        st.builds(
            lambda columns, method, bounds: {
                "op": "scale",
                "columns": columns,
                "method": method,
                "feature_range": bounds,
            },
            numbers,
            st.sampled_from(["minmax", "standard"]),
            feature_range,
        ),
        st.builds(
            lambda columns, strategy, value: {"op": "fillna", "columns": columns, "strategy": strategy, "value": value},
            st.one_of(st.none(), st.just([]), numbers, name_lists),
            st.sampled_from(["mean", "mean", "constant"]),
            st.sampled_from([None, 0, 7, 2.5, "fill", "it's {how}", 10**30]),
        ),
        st.builds(lambda columns: {"op": "dropna", "columns": columns}, st.one_of(st.none(), st.just([]), name_lists)),
        st.builds(lambda columns: {"op": "select", "columns": columns}, name_lists),
        st.builds(lambda columns: {"op": "drop", "columns": columns}, name_lists),
        st.builds(
            lambda mapping: {"op": "rename", "mapping": mapping},
            st.dictionaries(names, st.sampled_from([*known, "new", "New", "nEw"]), min_size=1, max_size=2),
        ),
    )


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[dict[str, tuple[pd.DataFrame, str | None]], list[dict[str, Any]]]:
    left_keys = draw(st.lists(st.sampled_from(KEYS), min_size=1, max_size=10, unique=True))
    right_keys = draw(st.lists(st.sampled_from(KEYS), min_size=1, max_size=10, unique=True))
    frames = {"L": draw(dataset(LEFT_NAMES, left_keys)), "R": draw(dataset(RIGHT_NAMES, right_keys))}
    known = list(dict.fromkeys(name for frame, _ in frames.values() for name in frame.columns))
    numeric = [name for frame, _ in frames.values() for name in frame.columns if frame[name].dtype != "string"]
    # The names a join with suffixes gives the columns both sides have, for later steps to use.
    both = [name for name in frames["L"][0].columns if name in frames["R"][0].columns]
    known += [name + suffix for name in both for suffix in ("_l", "_r")]
    numeric += [name + suffix for name in both if name in numeric for suffix in ("_l", "_r")]
    return frames, draw(st.lists(step_dicts(known, numeric or known), min_size=1, max_size=4))


@pytest.mark.slow
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.booleans(), st.sampled_from(["256MB", HASH_JOIN_MEMORY]))
def test_generated_steps_match_pandas(
    scenario: tuple[dict[str, Any], list[dict[str, Any]]], trust_keys: bool, memory_limit: str
) -> None:
    """With keys declared unique (as stored datasets' are) or not (every duplicate check runs);
    joins matched by positions or by DuckDB's hash join."""
    frames, steps = scenario
    compare(frames, steps, trust_keys=trust_keys, memory_limit=memory_limit)


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.data())
def test_steps_after_a_join_match_pandas(
    scenario: tuple[dict[str, Any], list[dict[str, Any]]], data: st.DataObject
) -> None:
    """A join's result is written out with only the columns later steps read or keep: generated
    steps after a join, then a select that leaves columns behind, still agree."""
    frames, steps = scenario
    join = {"op": "join", "dataset_id": "R", "how": data.draw(st.sampled_from(["inner", "left"]))}
    names = sorted({name for frame, _ in frames.values() for name in frame.columns} - {"k"})
    if not names:
        return
    kept = data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=2, unique=True))
    memory_limit = data.draw(st.sampled_from(["256MB", HASH_JOIN_MEMORY]))
    compare(frames, [join, *steps[:2], {"op": "select", "columns": kept}], memory_limit=memory_limit)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy's, on the pandas side
@settings(max_examples=20, deadline=None)
@given(
    st.lists(st.one_of(floats, st.none(), st.floats(-1e300, 1e300)), min_size=130, max_size=700),
    st.sampled_from(["scale-standard", "scale-minmax", "fill-mean"]),
)
def test_long_columns_sum_like_numpy(values: list[float | None], op: str) -> None:
    """Beyond 128 values numpy's pairwise tree has several levels: mean and std still match."""
    frame = pd.DataFrame(
        {"k": pd.Series([f"r{i}" for i in range(len(values))], dtype="string"), "v": pd.Series(values, dtype="float64")}
    )
    frame["i"] = np.arange(len(values), dtype=np.int64) * 7919 % 1000 - 500
    if op == "fill-mean":
        steps = [{"op": "fillna", "columns": ["v", "i"]}]
    else:
        steps = [{"op": "scale", "columns": ["v", "i"], "method": op.split("-")[1]}]
    compare({"L": (frame, "k")}, steps, group=100)


@pytest.mark.slow
def test_pairwise_sum_is_numpys_sum_bit_for_bit() -> None:
    rng = np.random.default_rng(7)
    for n in [*range(0, 300), 4095, 8192, 8193, 50_001]:
        values = rng.standard_normal(n) * 10.0 ** rng.uniform(-9, 9, n)
        integers = rng.integers(-(2**60), 2**60, n)
        for chunk in (1, 5, 129, 10_000):
            if n > 1000 and chunk < 100:
                continue
            summed = PairwiseSum(n)
            buffered = PairwiseSum(n, segment=np.getbufsize())
            for start in range(0, n, chunk):
                summed.add(values[start : start + chunk])
                buffered.add(integers[start : start + chunk].astype(np.float64))
            assert np.float64(summed.total()).tobytes() == np.sum(values).tobytes(), (n, chunk)
            assert np.float64(buffered.total()).tobytes() == integers.sum(dtype=np.float64).tobytes(), (n, chunk)


# --- every refusal of apply_steps, explicitly ---------------------------------------------------


def frame(**columns: Any) -> pd.DataFrame:
    out = {}
    for name, values in columns.items():
        if values and any(isinstance(v, str) for v in values):
            out[name] = pd.Series(values, dtype="string")
        elif values and all(isinstance(v, int) for v in values):
            out[name] = pd.Series(values, dtype="int64")
        else:
            out[name] = pd.Series(values, dtype="float64")
    return pd.DataFrame(out)


LEFT = frame(k=["a", "b", "c"], x=[1.0, None, 3.0], n=[1, 2, 3], s=["u", None, "12"])
RIGHT = frame(k=["c", "a", "z"], r=[10, 20, 30], q=[0.5, None, 2.0])


def refusal(steps: list[dict[str, Any]], left: Any = (LEFT, "k"), right: Any = (RIGHT, "k")) -> str:
    expected = compare({"L": left, "R": right}, steps)
    assert expected.error is not None, "expected a refusal"
    return expected.error[1]


@pytest.mark.parametrize(
    ("steps", "left", "right", "fragment"),
    [
        ([{"op": "join", "dataset_id": "R"}], (LEFT, None), (RIGHT, "k"), "join needs `on`"),
        ([{"op": "join", "dataset_id": "R", "right_on": "k"}], (LEFT, None), (RIGHT, "k"), "join needs `left_on`"),
        ([{"op": "join", "dataset_id": "R", "on": "k", "right_on": "k"}], (LEFT, "k"), (RIGHT, "k"), "not both"),
        (
            [{"op": "join", "dataset_id": "R"}],
            (LEFT, "k"),
            (frame(id=["a"], r=[1]), None),
            "join column 'k' is missing from dataset R, which has no key column either",
        ),
        ([{"op": "join", "dataset_id": "R"}], (LEFT, "s"), (RIGHT, None), "which has no key column either"),
        ([{"op": "join", "dataset_id": "R", "left_on": "s"}], (LEFT, "k"), (RIGHT, None), "pass `right_on`"),
        ([{"op": "join", "dataset_id": "R", "right_on": "zz"}], (LEFT, "k"), (RIGHT, "k"), "'zz' is missing from"),
        ([{"op": "join", "dataset_id": "R", "left_on": "zz"}], (LEFT, "k"), (RIGHT, "k"), "'zz' is missing from this"),
        ([{"op": "join", "dataset_id": "R", "on": "x"}], (LEFT, "k"), (RIGHT, "k"), "missing from dataset R"),
        ([{"op": "join", "dataset_id": "R", "on": "q"}], (LEFT, "k"), (RIGHT, "k"), "missing from this dataset"),
        (
            [{"op": "join", "dataset_id": "R", "on": "x"}],
            (frame(x=[1.0, None, 2.0, None, 1.0, 3.0]), None),
            (frame(x=[1.0, 2.0], r=[1, 2]), None),
            "duplicate values in this dataset: nan, 1.0",
        ),
        (
            [{"op": "join", "dataset_id": "R", "left_on": "x", "right_on": "r"}],
            (frame(x=[1.0, 2.0, 3.0]), None),
            (frame(r=[1, 2, 1], q=[0.5, 1.5, 2.5]), None),
            "join column 'r' has duplicate values in dataset R: 1",
        ),
        (
            [{"op": "join", "dataset_id": "R"}],
            (LEFT, "k"),
            (frame(k=["a", None, "a", None, "b", "b"], r=[1, 2, 3, 4, 5, 6]), "k"),
            "duplicate values in dataset R: a, <NA>, b",
        ),
        (
            [{"op": "join", "dataset_id": "R", "left_on": "n"}],
            (frame(n=[*range(30), *range(30)]), None),
            (RIGHT, "k"),
            "duplicate values in this dataset: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9",
        ),
        ([{"op": "join", "dataset_id": "R"}], (LEFT, "k"), (frame(k=["a"], x=[1.0], n=[1]), "k"), "both datasets"),
        (
            [{"op": "join", "dataset_id": "R"}],
            (LEFT, "k"),
            (frame(k=["a"], x=[1.0], n=[1]), "k"),
            "column(s) 'n', 'x'; pass `suffixes`",
        ),
        (
            [{"op": "join", "dataset_id": "R", "suffixes": ["", ""]}],
            (LEFT, "k"),
            (frame(id=["a"], x=[1.0]), "id"),
            "the suffixes '' and '' leave column(s) 'x' twice",
        ),
        (
            [{"op": "join", "dataset_id": "R", "suffixes": ["", "_r"]}],
            (LEFT, "k"),
            (frame(id=["a"], x=[1.0], x_r=[2.0]), "id"),
            "leave column(s) 'x_r' twice",
        ),
        (
            [{"op": "join", "dataset_id": "R", "suffixes": ["_n", ""]}],
            (frame(k=["a"], x=[1.0], x_n=[3]), "k"),
            (frame(k=["a"], x=[1.0]), "k"),
            "leave column(s) 'x_n' twice",
        ),
        (
            [{"op": "join", "dataset_id": "R", "suffixes": ["_" * 64, ""]}],
            (frame(k=["a"], **{"x" * 200: [1.0]}), "k"),
            (frame(k=["a"], **{"x" * 200: [2.0]}), "k"),
            "column names must be at most 256 characters",
        ),
        ([{"op": "scale", "columns": ["x", "nope", "zz"]}], (LEFT, "k"), (RIGHT, "k"), "unknown column(s) 'nope'"),
        ([{"op": "scale", "columns": ["x", "k"]}], (LEFT, "k"), (RIGHT, "k"), "'k' is the key column"),
        ([{"op": "scale", "columns": ["s"]}], (LEFT, "k"), (RIGHT, "k"), "not numeric: row 0 holds 'u'"),
        ([{"op": "scale", "columns": ["s"]}], (frame(s=["1", None, " 2"]), None), (RIGHT, "k"), "is not numeric"),
        (
            [{"op": "dropna", "columns": ["x"]}, {"op": "scale", "columns": ["s"]}],
            (frame(x=[None, 1.0, None, 2.0, 3.0], s=["a", "b", "3", "٣", "c"]), None),
            (RIGHT, "k"),
            "row 0 holds 'b'",
        ),
        ([{"op": "scale", "columns": ["x"]}], (frame(x=[None, None]), None), (RIGHT, "k"), "has no values"),
        ([{"op": "scale", "columns": ["n"]}], (frame(n=[4, 4]), None), (RIGHT, "k"), "is constant (4.0)"),
        (
            [{"op": "scale", "columns": ["x", "n"], "method": "standard"}],
            (frame(x=[1.0, 2.0], n=[4, 4]), None),
            (RIGHT, "k"),
            "standard deviation is zero",
        ),
        ([{"op": "fillna", "columns": ["nope"]}], (LEFT, "k"), (RIGHT, "k"), "fillna: unknown column(s)"),
        ([{"op": "fillna", "strategy": "constant"}], (LEFT, "k"), (RIGHT, "k"), "`value` is required"),
        (
            [{"op": "fillna", "strategy": "constant", "value": 10**400}],
            (LEFT, "k"),
            (RIGHT, "k"),
            "beyond the range of a 64-bit float",
        ),
        ([{"op": "fillna", "columns": ["k"]}], (LEFT, "k"), (RIGHT, "k"), "fillna mean: 'k' is the key column"),
        ([{"op": "fillna", "columns": ["x", "s"]}], (LEFT, "k"), (RIGHT, "k"), "fillna mean: column 's' is not"),
        ([{"op": "fillna"}], (frame(x=[None, None], s=["a", None]), None), (RIGHT, "k"), "no values to average"),
        (
            [{"op": "fillna", "strategy": "constant", "value": "z"}],
            (LEFT, "k"),
            (RIGHT, "k"),
            "column 'x' needs a number",
        ),
        (
            [{"op": "fillna", "strategy": "constant", "value": 0, "columns": ["s"]}],
            (LEFT, "k"),
            (RIGHT, "k"),
            "column 's' needs text",
        ),
        ([{"op": "dropna", "columns": ["x", "nope"]}], (LEFT, "k"), (RIGHT, "k"), "dropna: unknown"),
        ([{"op": "select", "columns": ["x", "nope", "nope"]}], (LEFT, "k"), (RIGHT, "k"), "select: unknown"),
        ([{"op": "drop", "columns": ["nope"]}], (LEFT, "k"), (RIGHT, "k"), "drop: unknown"),
        ([{"op": "rename", "mapping": {"nope": "a"}}], (LEFT, "k"), (RIGHT, "k"), "rename: unknown"),
        ([{"op": "rename", "mapping": {"x": " "}}], (LEFT, "k"), (RIGHT, "k"), "has an empty name"),
        ([{"op": "rename", "mapping": {"x": "a\tb"}}], (LEFT, "k"), (RIGHT, "k"), "control characters"),
        ([{"op": "rename", "mapping": {"x": "m", "n": "m"}}], (LEFT, "k"), (RIGHT, "k"), "duplicate column names"),
        ([{"op": "rename", "mapping": {"x": "n"}}], (LEFT, "k"), (RIGHT, "k"), "would create duplicate"),
        ([{"op": "dropna"}], (frame(k=["a", "b"], x=[None, None]), "k"), (RIGHT, "k"), "no rows or no columns"),
        ([{"op": "drop", "columns": ["k", "x", "n", "s"]}], (LEFT, "k"), (RIGHT, "k"), "no rows or no columns"),
        (
            [{"op": "join", "dataset_id": "R", "how": "inner"}],
            (LEFT, "k"),
            (frame(k=["q"], r=[1]), "k"),
            "no rows or no columns",
        ),
        (
            [{"op": "join", "dataset_id": "R", "how": "left", "on": "s"}],
            (frame(s=["a", None, "c"]), None),
            (frame(s=["c", "a"], r=[1, 2]), "s"),
            "key column 's' is empty in row 1",
        ),
        (
            [{"op": "fillna", "columns": ["k"], "strategy": "constant", "value": "a"}],
            (frame(k=["a", None, "b", None], x=[1.0, 2.0, 3.0, 4.0]), "k"),
            (RIGHT, "k"),
            "key column 'k' has duplicate values: a",
        ),
    ],
)
def test_every_refusal_matches(steps: list[dict[str, Any]], left: Any, right: Any, fragment: str) -> None:
    assert fragment in refusal(steps, left, right)


def test_the_error_prefix_names_the_step() -> None:
    message = refusal([{"op": "select", "columns": ["x"]}, {"op": "scale", "columns": ["zz"]}])
    assert message.startswith("step 1 (scale): ")


# --- semantics worth a case of their own --------------------------------------------------------


@pytest.mark.slow
def test_join_keeps_left_order_and_compares_as_text() -> None:
    rng = np.random.default_rng(3)
    keys = [f"k{i:05d}" for i in range(3000)]
    left = pd.DataFrame({"k": pd.Series(keys, dtype="string"), "a": rng.standard_normal(3000)})
    shuffled = rng.permutation(keys)[:2500]
    right = pd.DataFrame({"k": pd.Series(shuffled, dtype="string"), "b": rng.integers(0, 9, 2500)})
    for how in ("inner", "left"):
        compare({"L": (left, "k"), "R": (right, "k")}, [{"op": "join", "dataset_id": "R", "how": how}], group=256)
    # Numbers joined on their text: 1 (int) is "1", 1.0 (float) is "1.0"; the result's column is text.
    floats_ = pd.DataFrame({"v": [1.0, 2.5, 1e16, None], "a": [1, 2, 3, 4]})
    ints = pd.DataFrame({"v": [1, 2, 3], "b": [7, 8, 9]})
    texts_ = pd.DataFrame({"v": pd.Series(["1.0", "1e+16", None], dtype="string"), "b": [7, 8, 9]})
    for right_ in (ints, texts_):
        for how in ("inner", "left"):
            compare(
                {"L": (floats_, None), "R": (right_, None)}, [{"op": "join", "dataset_id": "R", "how": how, "on": "v"}]
            )


def test_names_duckdb_would_confuse() -> None:
    """DuckDB resolves names case-insensitively and has a virtual ``file_row_number`` column."""
    left = pd.DataFrame(
        {"k": pd.Series(["a", "b"], dtype="string"), "x": [1.0, 2.0], "X": [3.0, None], "file_row_number": [5, 6]}
    )
    right = pd.DataFrame({"k": pd.Series(["b", "a"], dtype="string"), "x_1": [1, 2], 'we"ird': [0.5, 0.25]})
    steps: list[dict[str, Any]] = [
        {"op": "join", "dataset_id": "R"},
        {"op": "scale", "columns": ["X", "file_row_number", "x_1"], "method": "standard"},
        {"op": "fillna", "columns": ["X"], "strategy": "constant", "value": 1},
        {"op": "rename", "mapping": {"x": "FILE_ROW_NUMBER_", "file_row_number": "Y"}},
    ]
    compare({"L": (left, "k"), "R": (right, "k")}, steps)


def test_joins_in_a_chain_and_a_self_join() -> None:
    left = pd.DataFrame({"k": pd.Series(list("abcdef"), dtype="string"), "x": [3.0, None, 1.0, 8.0, 2.0, None]})
    other = pd.DataFrame({"k": pd.Series(list("fedcba"), dtype="string"), "y": [1, 2, 3, 4, 5, 6]})
    steps: list[dict[str, Any]] = [
        {"op": "dropna"},
        {"op": "join", "dataset_id": "R", "how": "left"},
        {"op": "rename", "mapping": {"y": "y0"}},
        {"op": "join", "dataset_id": "R", "how": "inner"},
        {"op": "scale", "columns": ["y0", "y"], "method": "standard"},
        {"op": "select", "columns": ["y", "x"]},
    ]
    compare({"L": (left, "k"), "R": (other, "k")}, steps)
    # The parent joined with itself: one file read twice (only the join column may be shared).
    compare({"L": (left[["k"]], "k")}, [{"op": "join", "dataset_id": "L", "how": "left"}])


def test_columns_left_behind_after_a_join() -> None:
    left = pd.DataFrame(
        {"k": pd.Series(list("abcd"), dtype="string"), "x": [3.0, None, 1.0, 8.0], "n": [1, 2, 3, 4], "z": 0.5}
    )
    right = pd.DataFrame({"k": pd.Series(list("dcbz"), dtype="string"), "y": [1, 2, 3, 4], "w": [0.1, 0.2, 0.3, 0.4]})
    frames = {"L": (left, "k"), "R": (right, "k")}
    join: dict[str, Any] = {"op": "join", "dataset_id": "R", "how": "left"}
    cases: list[list[dict[str, Any]]] = [
        [join, {"op": "scale", "columns": ["x", "y"], "method": "standard"}, {"op": "select", "columns": ["y"]}],
        [join, {"op": "fillna"}, {"op": "drop", "columns": ["n", "w"]}],
        [join, {"op": "rename", "mapping": {"x": "X"}}, {"op": "select", "columns": ["X", "w"]}, {"op": "dropna"}],
        [join, {"op": "select", "columns": ["n"]}, {"op": "scale", "columns": ["x"]}],  # refused: names all columns
        [
            join,
            {"op": "drop", "columns": ["k"]},
            {"op": "fillna", "columns": ["x"]},
            {"op": "select", "columns": ["x"]},
        ],
    ]
    for steps in cases:
        compare(frames, steps)


def test_fill_with_large_integers_and_int_columns() -> None:
    left = pd.DataFrame({"n": [1, 2, 3], "x": [None, 1.5, None]})
    for value in (10**30, 2**53 + 1, -7):
        compare({"L": (left, None)}, [{"op": "fillna", "columns": ["n", "x"], "strategy": "constant", "value": value}])
    compare({"L": (left, None)}, [{"op": "fillna", "columns": ["n", "x", "n"]}])


def test_negative_zero_minimum_is_equal_but_may_differ_in_sign() -> None:
    """Known difference: min/max of a column holding both 0.0 and -0.0 may be either zero (numpy's
    choice depends on its SIMD reduction); the parameters compare equal and the results match."""
    left = pd.DataFrame({"v": [-0.0, 0.0, 2.0, -0.0]})
    step = STEPS.validate_python([{"op": "scale", "columns": ["v"], "feature_range": [0.0, 1.0]}])
    with workspace() as directory:
        inputs = {"L": store(directory, "L", left, None)}
        expected = pandas_derive("L", step, inputs, directory)
        actual = columnar_derive("L", step, inputs, directory)
    assert actual.fitted == expected.fitted
    assert actual.frame is not None and expected.frame is not None
    pd.testing.assert_frame_equal(actual.frame, expected.frame, check_exact=True)


# --- the key check --------------------------------------------------------------------------------


@pytest.mark.slow
@settings(max_examples=30, deadline=None)
@given(st.lists(st.one_of(st.sampled_from([f"v{i}" for i in range(150)]), st.none()), min_size=1, max_size=400))
def test_check_key_parquet_matches_check_key(cells: list[str | None]) -> None:
    keys = pd.DataFrame({"x": np.arange(len(cells), dtype=np.float64), "K": pd.Series(cells, dtype="string")})
    # Mostly without nulls, or check_key stops at the first one.
    for frame_ in (keys, keys.dropna().reset_index(drop=True)):
        if frame_.empty:
            continue
        expected = actual = None
        try:
            check_key(frame_, "K")
        except AppError as exc:
            expected = (type(exc), exc.message, exc.details)
        with workspace() as directory:
            path = directory / "keys.parquet"
            frame_.to_parquet(path, index=False, row_group_size=64)
            try:
                check_key_parquet(path, "K", temp_directory=directory / "spill")
            except AppError as exc:
                actual = (type(exc), exc.message, exc.details)
        assert actual == expected
