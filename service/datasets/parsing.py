"""Turning uploaded text (CSV or JSON cells) into a typed table.

Every cell starts as text. A column whose non-empty cells all read as numbers becomes numeric:
``1210.5``, ``"1,210.5"`` (thousands separators), ``-3``, ``.5``, ``1e-3`` all parse. Empty cells
are nulls. ``nan``/``inf`` literals and numbers too large for a float are refused, because a
non-finite value would silently poison distances later.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from service.errors import InvalidInput

NUMBER_PATTERN = r"[+-]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_NUMBER = re.compile(f"^{NUMBER_PATTERN}$")
_INTEGER = re.compile(r"^[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)$")
_NON_FINITE = re.compile(r"(?i)^[+-]?(?:nan|inf|infinity)$")
_INT64_LIMIT = 2**53  # beyond this, integers do not survive a trip through float64 math
DELIMITERS = {",", ";", "\t", "|"}


@dataclass(frozen=True)
class ParsedTable:
    frame: pd.DataFrame
    key_column: str | None


def parse_number(text: str) -> float | None:
    """One cell's numeric value, or None when the text is not a number (used by the tests too)."""
    stripped = text.strip()
    if not _NUMBER.match(stripped):
        return None
    return float(stripped.replace(",", ""))


def check_column_names(names: Sequence[str]) -> None:
    """Column names must be non-empty, reasonably short and unique."""
    if not names:
        raise InvalidInput("there are no columns")
    blank = [i for i, name in enumerate(names) if not name.strip()]
    if blank:
        raise InvalidInput(f"column {blank[0] + 1} has an empty name", details={"positions": blank})
    not_text = [i for i, name in enumerate(names) if not is_unicode_text(name)]
    if not_text:
        raise InvalidInput(
            f"column {not_text[0] + 1} has a name that is not valid Unicode text (a lone surrogate)",
            details={"positions": not_text},
        )
    control = [i for i, name in enumerate(names) if any(ord(ch) < 32 or ord(ch) == 127 for ch in name)]
    if control:
        raise InvalidInput(
            f"column {control[0] + 1} has a name with control characters (NUL, tab, newline ...)",
            details={"positions": control},
        )
    too_long = [name[:40] for name in names if len(name) > 256]
    if too_long:
        raise InvalidInput("column names must be at most 256 characters", details={"columns": too_long})
    seen: set[str] = set()
    duplicates = sorted({name for name in names if name in seen or seen.add(name)})  # type: ignore[func-returns-value]
    if duplicates:
        raise InvalidInput(f"duplicate column names: {', '.join(duplicates)}", details={"columns": duplicates})


def frame_from_rows(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> pd.DataFrame:
    """Text frame from JSON rows (numbers are turned back into text so one parser serves both)."""
    check_column_names(list(columns))
    width = len(columns)
    for index, row in enumerate(rows):
        if len(row) != width:
            raise InvalidInput(
                f"row {index} has {len(row)} values but there are {width} columns",
                details={"row": index, "values": len(row), "columns": width},
            )
    for index, row in enumerate(rows):
        for position, cell in enumerate(row):
            if isinstance(cell, str) and not is_unicode_text(cell):
                raise InvalidInput(
                    f"row {index} column {columns[position]!r}: the value is not valid Unicode text (a lone surrogate)",
                    details={"row": index, "column": columns[position]},
                )
    cells = [[None if cell is None else _cell_text(cell) for cell in row] for row in rows]
    return pd.DataFrame(cells, columns=list(columns), dtype=object)


def is_unicode_text(text: str) -> bool:
    """False for strings holding lone surrogates (JSON ``"\\ud800"`` decodes to one): they cannot be
    stored or sent back as UTF-8, so they are refused as input instead of failing later."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _cell_text(cell: object) -> str:
    if isinstance(cell, float):
        return repr(cell)
    return str(cell)


def type_columns(frame: pd.DataFrame, key_column: str | None) -> ParsedTable:
    """Infer each column's type from its text cells and convert; the key column stays text."""
    if key_column is not None and key_column not in frame.columns:
        raise InvalidInput(
            f"key column {key_column!r} is not one of the columns",
            details={"key_column": key_column, "columns": list(frame.columns)},
        )
    typed = {name: _type_column(name, frame[name], is_key=name == key_column) for name in frame.columns}
    result = pd.DataFrame(typed)
    if key_column is not None:
        check_key(result, key_column)
    return ParsedTable(result, key_column)


def _normalise_text(column: pd.Series) -> tuple[pd.Series, pd.Series]:
    """(the cells as sent, the cells trimmed); a cell that is empty or only whitespace is null in both."""
    text = column.astype(object).where(column.notna(), None)
    stripped = text.map(lambda v: v.strip() if isinstance(v, str) else v)
    stripped = stripped.map(lambda v: None if v == "" else v)
    return text.where(stripped.notna(), None), stripped


def _type_column(name: str, column: pd.Series, is_key: bool) -> pd.Series:
    """Numbers and keys are read trimmed; a text column keeps its cells exactly as sent."""
    exact, text = _normalise_text(column)
    present = text.dropna()
    if is_key:
        return text.astype("string")
    if present.empty:
        return pd.Series(np.nan, index=text.index, dtype="float64")
    is_number = present.str.match(_NUMBER.pattern).astype(bool)
    is_non_finite = present.str.match(_NON_FINITE.pattern).astype(bool)
    if (is_number | is_non_finite).all() and is_non_finite.any():
        first = is_non_finite.idxmax()
        _raise_non_finite(name, first, present.loc[first])
    if not is_number.all():
        return exact.astype("string")
    digits = present.str.replace(",", "", regex=False)
    try:
        values = pd.to_numeric(digits, errors="raise").astype("float64")
    except (ValueError, OverflowError):
        # An integer beyond float range (10**400: inf, refused below with its row and column), or of
        # more than 4300 digits, which Python's int() refuses: float() reads the text of either.
        values = digits.map(float).astype("float64")
    infinite = values[~np.isfinite(values.to_numpy())]
    if not infinite.empty:
        _raise_non_finite(name, infinite.index[0], present.loc[infinite.index[0]])
    if len(present) == len(text) and present.str.match(_INTEGER.pattern).all() and values.abs().max() < _INT64_LIMIT:
        return values.astype("int64").reindex(text.index)
    return values.reindex(text.index)


def _raise_non_finite(column: str, row: object, text: str) -> None:
    text = text if len(text) <= 64 else f"{text[:30]}...({len(text)} characters)"  # no megabyte error bodies
    raise InvalidInput(
        f"column {column!r} row {row}: {text!r} is not a finite number",
        details={"column": column, "row": int(row), "value": text},  # type: ignore[call-overload]
    )


def check_key(frame: pd.DataFrame, key_column: str) -> None:
    """A key column must label every row exactly once."""
    keys = frame[key_column]
    missing = keys.isna()
    if missing.any():
        row = int(np.flatnonzero(missing.to_numpy())[0])
        raise InvalidInput(f"key column {key_column!r} is empty in row {row}", details={"row": row})
    duplicated = keys[keys.duplicated()].unique().tolist()
    if duplicated:
        raise InvalidInput(
            f"key column {key_column!r} has duplicate values: {', '.join(map(str, duplicated[:10]))}",
            details={"key_column": key_column, "duplicates": [str(v) for v in duplicated[:100]]},
        )


def non_numeric_cells(frame: pd.DataFrame, column: str, limit: int = 5) -> list[dict[str, object]]:
    """Rows of a text column whose cells are not numbers (for error details)."""
    bad: list[dict[str, object]] = []
    for row, value in frame[column].items():
        if value is not None and not pd.isna(value) and parse_number(str(value)) is None:
            bad.append({"row": int(row), "value": str(value)})  # type: ignore[call-overload]
            if len(bad) >= limit:
                break
    return bad
