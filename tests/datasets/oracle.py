"""The CSV reader Centroid used before streaming ingest: the whole upload decoded in memory and split
by pandas into text cells, then typed by :func:`service.datasets.parsing.type_columns`.

Kept here, unchanged, as the oracle the property tests hold :mod:`service.datasets.ingest` to: on
any input the new parser must give exactly the table (or the error) this one gives.
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
