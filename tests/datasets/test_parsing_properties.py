"""Property tests for number parsing and column typing."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.datasets.parsing import frame_from_rows, parse_number, type_columns
from service.errors import InvalidInput

finite = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e15, max_value=1e15)


@given(finite)
def test_plain_repr_parses_back_exactly(value: float) -> None:
    assert parse_number(repr(value)) == value


@given(st.integers(min_value=-(10**15), max_value=10**15))
def test_thousands_separators_parse(value: int) -> None:
    assert parse_number(f"{value:,}") == float(value)
    assert parse_number(f" {value:,}.25 ") == pytest.approx(value + math.copysign(0.25, value) if value else 0.25)


@given(finite)
def test_fixed_point_with_separators(value: float) -> None:
    text = f"{value:,.4f}"
    assert parse_number(text) == pytest.approx(float(f"{value:.4f}"))


@given(st.text(alphabet="abcxyz$%_ ", min_size=1))
def test_words_are_not_numbers(text: str) -> None:
    assert parse_number(text) is None


@pytest.mark.parametrize("text", ["1,2", "12,34.5", "1,,000", ",100", "1.2.3", "--1", "1e", "e5", "", "0x10"])
def test_malformed_numbers_are_not_numbers(text: str) -> None:
    assert parse_number(text) is None


@pytest.mark.slow
@given(st.lists(finite, min_size=1, max_size=30))
def test_json_numbers_and_their_text_type_the_same(values: list[float]) -> None:
    as_numbers = type_columns(frame_from_rows(["v"], [[v] for v in values]), None).frame["v"]
    as_text = type_columns(frame_from_rows(["v"], [[f"{v!r}"] for v in values]), None).frame["v"]
    pd.testing.assert_series_equal(as_numbers, as_text)
    assert as_numbers.tolist() == pytest.approx(values)


@pytest.mark.slow
@given(
    st.lists(finite, min_size=1, max_size=20),
    st.sampled_from(["nan", "NaN", "inf", "-Infinity", "1e309", "-1e400"]),
    st.integers(min_value=0, max_value=20),
)
def test_non_finite_values_are_refused(values: list[float], bad: str, position: int) -> None:
    cells: list[object] = [repr(v) for v in values]
    cells.insert(min(position, len(cells)), bad)
    with pytest.raises(InvalidInput, match="not a finite number"):
        type_columns(frame_from_rows(["v"], [[c] for c in cells]), None)


@pytest.mark.slow
@given(st.lists(st.integers(min_value=-(2**40), max_value=2**40), min_size=1, max_size=20))
def test_whole_numbers_without_gaps_are_int64(values: list[int]) -> None:
    column = type_columns(frame_from_rows(["v"], [[v] for v in values]), None).frame["v"]
    assert str(column.dtype) == "int64"
    assert column.tolist() == values


def test_missing_cells_make_a_float_column_with_nulls() -> None:
    column = type_columns(frame_from_rows(["v"], [[1], [None], [""], ["3"]]), None).frame["v"]
    assert str(column.dtype) == "float64"
    assert column.isna().tolist() == [False, True, True, False]


def test_mixed_text_stays_text() -> None:
    column = type_columns(frame_from_rows(["v"], [[1], ["two"], ["nan"]]), None).frame["v"]
    assert column.tolist() == ["1", "two", "nan"]
