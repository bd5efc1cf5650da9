"""The positional join: its matches are pandas' 1:1 merge, whatever the hashes propose."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.datasets import positional_join
from service.datasets.positional_join import GatheredColumn, match_positions, write_joined

VALUES = st.one_of(st.none(), st.text(alphabet="ab€\n ,\"'", max_size=4))


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 3 rows: every pass crosses many chunk boundaries."""
    monkeypatch.setattr(positional_join, "CHUNK_ROWS", 3)
    monkeypatch.setattr(positional_join, "FETCH_ROWS", 5)


def _connection(left: list[str | None], right: list[str | None]) -> duckdb.DuckDBPyConnection:
    connection = duckdb.connect(config={"arrow_large_buffer_size": True})
    for name, values in (("l", left), ("r", right)):
        table = pa.table(
            {
                "row": pa.array(range(len(values)), pa.int64()),
                "v": pa.array(values, pa.large_string()),
                "x": pa.array([float(i) if i % 4 else None for i in range(len(values))]),
            }
        )
        connection.register(name, table)
    return connection


def _batches(connection: duckdb.DuckDBPyConnection) -> Any:
    def batches(sql: str, rows: int) -> Iterator[pa.RecordBatch]:
        yield from connection.sql(sql).to_arrow_reader(rows)

    return batches


def _expected(left: list[str | None], right: list[str | None]) -> list[int]:
    """pandas: a missing value matches a missing one."""
    where = {value: index for index, value in enumerate(right)}
    return [where.get(value, -1) for value in left]


def _queries(left_hash: str, right_hash: str) -> dict[str, str]:
    return {
        "right_sorted": f"SELECT {right_hash} AS h, strlen(v), row FROM r ORDER BY h",
        "left_sorted": f"SELECT {left_hash} AS h, row FROM l ORDER BY h",
        "left_order": "SELECT row FROM l ORDER BY row",
        "left_values": "SELECT v FROM l ORDER BY row",
        "right_values": "SELECT v FROM r ORDER BY row",
    }


def _match(left: list[str | None], right: list[str | None], left_hash: str, right_hash: str) -> np.ndarray | None:
    connection = _connection(left, right)
    return match_positions(
        _batches(connection),
        **_queries(left_hash, right_hash),
        left_rows=len(left),
        right_rows=len(right),
        row_limit=len(left),
        budget=1 << 30,
    )


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(VALUES, unique=True, max_size=20), st.lists(VALUES, unique=True, min_size=1, max_size=20))
def test_positions_are_pandas_matches(left: list[str | None], right: list[str | None]) -> None:
    positions = _match(left, right, "hash(v)", "hash(v)")
    assert positions is not None
    assert positions.tolist() == _expected(left, right)


@pytest.mark.slow
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(VALUES, unique=True, max_size=20),
    st.lists(VALUES, unique=True, min_size=1, max_size=20),
    st.integers(0, 2**32),
)
def test_a_hash_only_proposes(left: list[str | None], right: list[str | None], seed: int) -> None:
    """Left hashes drawn at random among the right's: every wrong candidate is caught by the values."""
    rng = np.random.default_rng(seed)
    picks = ", ".join(str(int(v)) for v in rng.integers(0, len(right), max(len(left), 1)))
    left_hash = f"(list_value({picks}))[row + 1]::UBIGINT"
    positions = _match(left, right, left_hash, "row::UBIGINT")
    assert positions is not None
    expected = _expected(left, right)
    for got, want in zip(positions.tolist(), expected, strict=True):
        assert got in (-1, want) and (got == -1 or want != -1)  # never a wrong match


def test_two_right_values_with_one_hash_give_up() -> None:
    assert _match(["a"], ["a", "b", "c"], "hash(v)", "(row // 2)::UBIGINT") is None


def test_written_in_left_order_with_gathered_columns(tmp_path: Path) -> None:
    left = ["c", None, "a", "zz", "b", "a€"]
    right = ["a", "b", None, "c", "q", "a€", "x"]
    connection = _connection(left, right)
    positions = _match(left, right, "hash(v)", "hash(v)")
    assert positions is not None
    for inner in (True, False):
        out = tmp_path / f"joined-{inner}.parquet"
        write_joined(
            _batches(connection),
            positions,
            left_sql="SELECT row AS __row, v AS k FROM l ORDER BY row",
            gathered=[
                GatheredColumn("rx", "SELECT x FROM r ORDER BY row", len(right)),
                GatheredColumn("rv", "SELECT v FROM r ORDER BY row", len(right), text_bytes=20),
            ],
            inner=inner,
            out_path=out,
            work_directory=tmp_path,
        )
        got = pq.read_table(out).to_pydict()
        matches = _expected(left, right)
        rows = [i for i, m in enumerate(matches) if m >= 0 or not inner]
        assert got["__row"] == rows
        assert got["k"] == [left[i] for i in rows]
        assert got["rx"] == [float(matches[i]) if matches[i] >= 0 and matches[i] % 4 else None for i in rows]
        assert got["rv"] == [right[matches[i]] if matches[i] >= 0 else None for i in rows]
    assert not list(tmp_path.glob("gather-*")), "the scratch directory is removed"


def test_more_than_the_budget_gives_up() -> None:
    right = [f"value-{i}" for i in range(50)]
    connection = _connection(["value-3"], right)
    common: dict[str, Any] = {**_queries("hash(v)", "hash(v)"), "left_rows": 1, "right_rows": 50, "row_limit": 1}
    need = positional_join.join_memory(1, 50, sum(map(len, right)) + 9 * 50, 1)
    assert match_positions(_batches(connection), **common, budget=need - 1) is None
    positions = match_positions(_batches(connection), **common, budget=need)
    assert positions is not None and positions.tolist() == [3]
