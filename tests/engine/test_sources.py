"""Batch sources replay data in exact, validated batches, whatever the storage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.engine import ArrayBatchSource, BatchSource, EngineInputError, ParquetBatchSource
from service.engine.sources import as_batch_source, checked_batches, rebatch


def write_parquet(path: Path, X: np.ndarray, *, row_group_size: int = 7) -> list[str]:
    columns = [f"f{i}" for i in range(X.shape[1])]
    table = pa.table({name: X[:, i] for i, name in enumerate(columns)} | {"label": np.arange(len(X)).astype(str)})
    pq.write_table(table, path, row_group_size=row_group_size)
    return columns


def test_array_source_slices_without_copying() -> None:
    X = np.arange(20.0).reshape(10, 2)
    source = ArrayBatchSource(X)
    assert (source.n_rows, source.n_features) == (10, 2)
    batches = list(source.batches(4))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert np.shares_memory(batches[0], X)
    assert isinstance(source, BatchSource)


def test_array_source_accepts_dataframes_and_lists() -> None:
    frame = pd.DataFrame({"a": [1.0, 2.0], "b": [3, 4]})
    np.testing.assert_array_equal(next(ArrayBatchSource(frame).batches(5)), [[1, 3], [2, 4]])
    assert as_batch_source([[1, 2], [3, 4]]).n_rows == 2


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([1.0, 2.0], "2-D"),
        (np.zeros((2, 2, 2)), "2-D"),
        ([["a", "b"]], "numeric"),
        (pd.DataFrame({"s": ["x"]}), "numeric"),
    ],
)
def test_array_source_rejects_bad_data(data: object, message: str) -> None:
    with pytest.raises(EngineInputError, match=message):
        ArrayBatchSource(data)  # type: ignore[arg-type]


def test_parquet_source_recuts_row_groups_into_exact_batches(tmp_path: Path) -> None:
    X = np.random.default_rng(0).normal(size=(100, 3))
    columns = write_parquet(tmp_path / "x.parquet", X, row_group_size=7)
    source = ParquetBatchSource(tmp_path / "x.parquet", columns)
    assert (source.n_rows, source.n_features, source.columns) == (100, 3, columns)
    for size in (1, 10, 16, 100, 1000):
        ours = list(source.batches(size))
        expected = list(ArrayBatchSource(X).batches(size))
        assert [len(b) for b in ours] == [len(b) for b in expected]
        for a, b in zip(ours, expected, strict=True):
            assert a.dtype == np.float64
            np.testing.assert_array_equal(a, b)


def test_parquet_source_casts_ints_floats_and_bools(tmp_path: Path) -> None:
    table = pa.table(
        {
            "i": pa.array([1, 2], pa.int16()),
            "f": pa.array([0.5, 1.5], pa.float32()),
            "b": [True, False],
        }
    )
    pq.write_table(table, tmp_path / "t.parquet")
    source = ParquetBatchSource(tmp_path / "t.parquet")
    np.testing.assert_array_equal(next(source.batches(10)), [[1, 0.5, 1], [2, 1.5, 0]])


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        (["f0", "nope"], "not in the Parquet file"),
        (["label"], "not numeric"),
        ([], "no feature columns"),
    ],
)
def test_parquet_source_rejects_bad_columns(tmp_path: Path, columns: list[str], message: str) -> None:
    write_parquet(tmp_path / "x.parquet", np.zeros((3, 2)))
    with pytest.raises(EngineInputError, match=message):
        ParquetBatchSource(tmp_path / "x.parquet", columns)


def test_parquet_nulls_are_reported(tmp_path: Path) -> None:
    pq.write_table(pa.table({"a": [1.0, None, 3.0]}), tmp_path / "n.parquet")
    with pytest.raises(EngineInputError, match="'a' contains null values"):
        list(ParquetBatchSource(tmp_path / "n.parquet").batches(2))


def test_checked_batches_are_float64_and_locate_non_finite_values() -> None:
    X = np.ones((10, 3), dtype=np.float32)
    assert all(b.dtype == np.float64 and b.flags.c_contiguous for b in checked_batches(ArrayBatchSource(X), 4))
    X[6, 2] = np.nan
    with pytest.raises(EngineInputError, match="training batch 1: non-finite value nan at row 6, column 2"):
        list(checked_batches(ArrayBatchSource(X), 4))


class _LyingSource:
    """Declares more rows than it yields, or yields the wrong shape."""

    def __init__(self, n_rows: int, batch: np.ndarray) -> None:
        self.n_rows, self.n_features, self._batch = n_rows, 2, batch

    def batches(self, batch_size: int):  # type: ignore[no-untyped-def]
        yield self._batch


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (_LyingSource(5, np.zeros((2, 2))), "declared 5 rows but yielded 2"),
        (_LyingSource(2, np.zeros((2, 3))), r"expected \(rows, 2\) values"),
        (_LyingSource(9, np.zeros((9, 2))), "more than the batch size"),
        (_LyingSource(1, np.array([["x", "y"]], dtype=object)), "not numeric"),
    ],
)
def test_checked_batches_enforce_the_protocol(source: _LyingSource, message: str) -> None:
    with pytest.raises(EngineInputError, match=message):
        list(checked_batches(source, 4))


@given(
    sizes=st.lists(st.integers(0, 9), max_size=12),
    batch_size=st.integers(1, 10),
)
def test_rebatch_preserves_rows_and_cuts_exactly(sizes: list[int], batch_size: int) -> None:
    total = sum(sizes)
    rows = np.arange(total, dtype=float)[:, None]
    chunks, start = [], 0
    for size in sizes:
        chunks.append(rows[start : start + size])
        start += size
    out = list(rebatch(chunks, batch_size))
    assert all(len(b) == batch_size for b in out[:-1])
    assert all(0 < len(b) <= batch_size for b in out)
    np.testing.assert_array_equal(np.concatenate(out) if out else np.empty((0, 1)), rows)
