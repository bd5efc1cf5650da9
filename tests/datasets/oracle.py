"""Oracles the property tests hold the implementations to.

* :func:`oracle_parse`: the CSV reader Centroid used before streaming ingest: the whole upload
  decoded in memory and split by pandas into text cells, then typed by
  :func:`service.datasets.parsing.type_columns`. Kept here, unchanged, as the oracle for
  :mod:`service.datasets.ingest`: on any input the new parser must give exactly the table (or the
  error) this one gives.
* :func:`oracle_join`: ``pandas.merge(left_on=, right_on=, suffixes=)`` itself, with Centroid's
  conventions around it, as the oracle for a ``join`` step (in memory and columnar).
"""

from __future__ import annotations

import csv
import io

import pandas as pd

from service.datasets.parsing import ParsedTable, check_column_names, type_columns
from service.errors import InvalidInput


def oracle_parse(data: bytes, delimiter: str, max_columns: int, key_column: str | None) -> ParsedTable:
    """Today's rules end to end: decode, split, type, check the key."""
    header, frame = read_csv_text(data, delimiter, max_columns)
    return type_columns(frame, key_column)


def read_csv_text(data: bytes, delimiter: str, max_columns: int) -> tuple[list[str], pd.DataFrame]:
    """Decode and split a CSV upload into a header and a frame of text cells."""
    if not data.strip():
        raise InvalidInput("the file is empty")
    if b"\x00" in data:
        raise InvalidInput("the file is not CSV text (it contains NUL bytes)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidInput(
            f"the file is not UTF-8 text (invalid byte at offset {exc.start})", details={"offset": exc.start}
        ) from exc
    header = _read_header(text, delimiter, max_columns)
    try:
        frame = pd.read_csv(
            io.StringIO(text),
            sep=delimiter,
            dtype=str,
            keep_default_na=False,
            na_filter=False,
            header=0,
            names=None,
            engine="c",
        )
    except pd.errors.EmptyDataError as exc:
        raise InvalidInput("the file is empty") from exc
    except (pd.errors.ParserError, ValueError) as exc:
        raise InvalidInput(f"the file is not valid CSV: {str(exc).strip()}") from exc
    if frame.empty:
        raise InvalidInput("the file has a header but no data rows")
    frame.columns = header
    return header, frame


def _read_header(text: str, delimiter: str, max_columns: int) -> list[str]:
    end = min((i for i in (text.find("\n"), text.find("\r")) if i >= 0), default=len(text))
    if text.find('"', 0, end) < 0 and text.count(delimiter, 0, end) >= max_columns:
        # An unquoted first line: its delimiters count the columns exactly, so a header of a
        # million columns is refused without building a list of a million names.
        columns = text.count(delimiter, 0, end) + 1
        raise InvalidInput(
            f"the file has {columns} columns; at most {max_columns} are allowed",
            details={"columns": columns, "limit": max_columns},
        )
    try:
        header = next(csv.reader(io.StringIO(text), delimiter=delimiter))
    except (StopIteration, csv.Error) as exc:
        raise InvalidInput(f"the file is not valid CSV: cannot read a header row ({exc})") from exc
    if len(header) > max_columns:
        raise InvalidInput(
            f"the file has {len(header)} columns; at most {max_columns} are allowed",
            details={"columns": len(header), "limit": max_columns},
        )
    names = [name.strip() for name in header]
    check_column_names(names)
    return names


# --- join -----------------------------------------------------------------------------------------

_RIGHT_KEY = "__oracle_right_join_column__"


class JoinRefused(Exception):
    """The oracle refuses the join (Centroid answers 400)."""


def oracle_join(
    left: pd.DataFrame,
    right: pd.DataFrame,
    left_on: str,
    right_on: str,
    how: str,
    suffixes: tuple[str, str] | None,
) -> pd.DataFrame:
    """``pandas.merge(left, right, how, left_on, right_on, suffixes)``, with Centroid's conventions:

    * a 1:1 join: a join column with a repeated value on either side is refused;
    * join values are compared as text (both join columns as ``string``);
    * the other side's join column is not carried over (pandas keeps both when the names differ):
      it is renamed out of the way before the merge, so it can clash with no name, and dropped;
    * no suffixes (``None``) means a name both sides have is refused: pandas' own refusal of
      overlapping names without suffixes (so are two empty suffixes); suffixes that leave a name
      twice are refused (pandas refuses them too);
    * a result with no rows is refused (a derive must leave rows).

    Not covered: the other side having a non-join column named like this side's join column
    (pandas would suffix this side's join column too; Centroid keeps its name).
    """
    for frame, name in ((left, left_on), (right, right_on)):
        if name not in frame.columns:
            raise JoinRefused(f"no column {name!r}")
        if frame[name].duplicated().any():
            raise JoinRefused(f"duplicate values in {name!r}")
    assert left_on == right_on or left_on not in right.columns, "not covered (see the docstring)"
    left = left.assign(**{left_on: left[left_on].astype("string")})
    right = right.assign(**{right_on: right[right_on].astype("string")})
    if left_on != right_on:
        right = right.rename(columns={right_on: _RIGHT_KEY})
    try:
        merged = pd.merge(
            left,
            right,
            how=how,  # type: ignore[arg-type]
            left_on=left_on,
            right_on=left_on if left_on == right_on else _RIGHT_KEY,
            suffixes=suffixes if suffixes is not None else (None, None),
            sort=False,
        )
    except (ValueError, pd.errors.MergeError) as exc:  # overlapping names, suffixes leaving duplicates
        raise JoinRefused(str(exc)) from None
    merged = merged.drop(columns=[_RIGHT_KEY], errors="ignore").reset_index(drop=True)
    if not merged.columns.is_unique:
        raise JoinRefused(f"duplicate names: {list(merged.columns)}")
    if merged.empty:
        raise JoinRefused("no rows")
    return merged
