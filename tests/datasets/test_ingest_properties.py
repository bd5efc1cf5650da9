"""The streaming ingest gives exactly what the original in-memory parser gave (or its error).

The oracle is the original parser, kept in ``tests/datasets/oracle.py``. Pieces are made tiny here
so that every input spans many pieces, row groups and (for surprising columns) restarted passes.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.datasets import ingest
from service.datasets.ingest import CsvSpool, ingest_csv
from service.errors import InvalidInput
from tests.datasets.oracle import oracle_parse, read_csv_text

ROW_GROUP = 3

numbers = st.one_of(
    st.integers(min_value=-(10**6), max_value=10**6).map(str),
    st.integers(min_value=-(10**20), max_value=10**20).map(lambda v: f"{v:,}"),
    st.floats(allow_nan=False, allow_infinity=False, width=64).map(repr),
    st.floats(min_value=-1e6, max_value=1e6).map(lambda v: f"{v:,.3f}"),
    st.sampled_from(["1.", ".5", "-.5e3", "+7", "5.e3", "007", "9007199254740993", "1E5", "٣", "١٢٫"]),
)
odd = st.sampled_from(["nan", "-Infinity", "inf", "1e400", "-1e309", "", " ", "\t", "\u00a0", "x", "1_0", "0x10"])
text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=6)
raw_fields = st.sampled_from(
    ['ab"', '"ab"c', 'a""b', '"x\ny"', '"1,000"', '""', '" 7 "', '"a""b"', ' "x"', '"x" ', '"', '"7"8', "x"]
)
padding = st.sampled_from(["", " ", "\t", "\u3000", "\x1f"])


@st.composite
def cells(draw: st.DrawFn) -> str:
    cell = draw(st.one_of(numbers, numbers, odd, text))
    if draw(st.booleans()):
        cell = draw(padding) + cell + draw(padding)
    return cell


@st.composite
def csv_files(draw: st.DrawFn) -> tuple[bytes, str, str | None]:
    delimiter = draw(st.sampled_from([",", ";", "\t", "|"]))
    width = draw(st.integers(min_value=1, max_value=4))
    names = [f"c{i}" for i in range(width)]
    kinds = [draw(st.sampled_from(["numbers", "mixed", "text"])) for _ in names]
    height = draw(st.integers(min_value=1, max_value=25))
    rows = []
    for _ in range(height):
        row = []
        for kind in kinds:
            if kind == "numbers":
                row.append(draw(st.one_of(numbers, numbers, numbers, st.sampled_from(["", " 1 "]))))
            elif kind == "mixed":
                row.append(draw(cells()))
            else:
                row.append(draw(text))
        rows.append(row)
    key = draw(st.sampled_from([None, *names]))
    if key is not None and draw(st.booleans()):  # a key that is unique, as keys usually are
        position = names.index(key)
        width_digits = draw(st.sampled_from([1, 3]))  # id10 < id9, or id009 < id010
        for index, row in enumerate(rows):
            row[position] = f"id{index:0{width_digits}d}"
    buffer = io.StringIO()
    quoting = draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONNUMERIC]))
    terminator = draw(st.sampled_from(["\n", "\r\n"]))
    writer = csv.writer(buffer, delimiter=delimiter, quoting=quoting, lineterminator=terminator)
    writer.writerow(names)
    writer.writerows(rows)
    body = buffer.getvalue()
    for _ in range(draw(st.integers(min_value=0, max_value=2))):  # hand-written lines, quoted oddly
        raw = [draw(st.one_of(numbers, raw_fields)) for _ in names]
        lines = body.split(terminator)
        lines.insert(draw(st.integers(min_value=1, max_value=len(lines) - 1)), delimiter.join(raw))
        body = terminator.join(lines)
    if draw(st.booleans()) and quoting == csv.QUOTE_MINIMAL and all('"' not in c for r in rows for c in r):
        body = body.replace(terminator, "\n")  # a quote-free file takes the fast reader
    return body.encode("utf-8"), delimiter, key


@pytest.fixture(autouse=True)
def tiny_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ingest, "BLOCK_BYTES", 96)  # rows longer than this retry with bigger blocks
    monkeypatch.setattr(ingest, "PIECE_BYTES", 150)  # many cuts, some inside quoted fields
    monkeypatch.setattr(ingest, "PANDAS_CHUNK_BYTES", 40)


def new_parse(data: bytes, delimiter: str, key: str | None, directory: Path, chunk: int = 5) -> pd.DataFrame:
    """The new parser end to end: spooled in small chunks, ingested, read back; the key checked
    with the original rule on the result (the service checks it in the Parquet file)."""
    spool = CsvSpool(directory / "upload.csv")
    for start in range(0, len(data), chunk):
        spool.write(data[start : start + chunk])
    facts = spool.close()
    out = directory / "out.parquet"
    result = ingest_csv(
        spool.path, facts, out, delimiter=delimiter, key_column=key, max_columns=50, row_group_rows=ROW_GROUP
    )
    frame = pd.read_parquet(out)
    groups = [pq.ParquetFile(out).metadata.row_group(i).num_rows for i in range(pq.ParquetFile(out).num_row_groups)]
    assert all(size == ROW_GROUP for size in groups[:-1]) and 0 < groups[-1] <= ROW_GROUP
    assert result.row_count == len(frame) == sum(groups)
    assert [c["name"] for c in result.columns] == list(frame.columns)
    if result.key_ascending:  # the service then skips its hash check: the keys must be unique
        assert key is not None and frame[key].notna().all() and frame[key].is_monotonic_increasing
        assert frame[key].is_unique
    if key is not None:
        from service.datasets.parsing import check_key

        check_key(frame, key)
    return frame


def outcome(parse: object) -> tuple[str, object]:
    try:
        return "ok", parse()  # type: ignore[operator]
    except InvalidInput as error:
        return "error", (error.message, error.details)


def shifted_columns(data: bytes, delimiter: str) -> bool:
    """Whether the original parser took the first column for an index (a first row with one field
    too many), shifting every column by one, or failed on it with a 500."""
    try:
        _, text = read_csv_text(data, delimiter, 50)
    except InvalidInput:
        return False
    except ValueError:
        return True
    return not isinstance(text.index, pd.RangeIndex)


def assert_same(data: bytes, delimiter: str, key: str | None, directory: Path) -> None:
    shifted = shifted_columns(data, delimiter)
    actual = outcome(lambda: new_parse(data, delimiter, key, directory))
    if shifted:
        # One deliberate difference: given a first row with one field too many, the original parser
        # took the first column for an index and shifted every column by one (or failed with a 500).
        assert actual[0] == "error" and "more fields than" in actual[1][0], actual
        return
    expected = outcome(lambda: oracle_parse(data, delimiter, 50, key).frame)
    assert actual[0] == expected[0], (actual, expected)
    if expected[0] == "error":
        assert actual[1] == expected[1]
    else:
        pd.testing.assert_frame_equal(actual[1], expected[1].reset_index(drop=True))  # type: ignore[arg-type]


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(csv_files())
def test_streaming_ingest_equals_the_original_parser(tmp_path: Path, case: tuple[bytes, str, str | None]) -> None:
    data, delimiter, key = case
    assert_same(data, delimiter, key, tmp_path)


@pytest.mark.parametrize(
    ("data", "key"),
    [
        (b"a,b\n1,2\n3\n", None),  # a short row: padded with nulls, as before
        (b'a,b\n"k1",1\n"k2",2\n', None),  # quoted keys, as pyarrow and R write them
        (b'a,b\n"x\ny",1\n"k2",2\n', None),  # a line break inside quotes
        (b'a,b\nab",1\n"x\ny",2\n', None),  # a stray quote pairs with the next field's
        # line breaks inside quotes across pyarrow's block ends (its fast block split is undone)
        (b"a,b\n" + b'"x\ny",1\n' * 60, None),
        (b"a,b\n" + b'7,"p\r\nq"\r\n' * 50, None),
        (b"k,b\n" + b"".join(b'"k%d",' % i + (b'"\n%d"\n' % i if i % 7 == 0 else b"%d\n" % i) for i in range(80)), "k"),
        (b'a,b\n"ab"c,1\n"7"8,2\n', None),
        (b"a,b\n" + b"1,2\n" * 40 + b'"' + b"x\n" * 90 + b'",3\n' + b"4,5\n" * 40, None),  # cut inside quotes
        (b"a,b\n" + b"1,2\n" * 40 + b'7,"x\n' + b"y\n" * 90, None),  # ends inside quotes
        (b"a,b\n1,2\n3,4,5\n", None),  # a long row: refused
        (b"a,b\n1,2,3\n4,5\n", None),  # a long first row: refused (it used to shift the columns)
        (b"a,b\n" + b"1,2\n" * 40 + b"2.5,x\n", None),  # int, then float and text after many pieces
        (b"a\n" + b"1\n" * 40 + b"nan\n" + b"1e400\n", None),  # a literal beats an earlier overflow
        (b"a,b\n" + b"1,1e999\n" * 30 + b"1,nan\n", None),
        (b"a,b\n" + b"1,2\n" * 30 + b"x,inf\n", None),  # column a turns text; b's inf is refused
        (b"a\n" + b"1\n" * 30 + b"9007199254740993\n", None),  # beyond 2**53: float64
        (b"a,b\n" + b'"1,000",2\n' * 20, None),  # quoted thousands
        (b"\xef\xbb\xbfa,b\n1,2\n", None),
        (b"a,b\n1,2\n\n\n3,4\n", None),
        (b"k,v\n" + b"x,1\n" * 3, "k"),
        (b"k,v\n a ,1\n,2\n", "k"),
        (b"a,b\n", None),
        (b"  \n\n", None),
        (b"a,a\n1,2\n", None),
        (b"a,,b\n1,2,3\n", None),
        (b"a,b\n1,\xff\n", None),
        (b"a,b\n1,\x00\n", None),
        (b"a,b\n\xd9\xa3,\xd9\xa3.5\n", None),  # Arabic-Indic digits are digits to Python
        (b"a,b\n\x1c1\x1c,2\n", None),  # a separator Python's strip() removes and Arrow's does not
    ],
)
def test_edge_cases_match(tmp_path: Path, data: bytes, key: str | None) -> None:
    assert_same(data, ",", key, tmp_path)


def test_old_mac_line_ends_are_read(tmp_path: Path) -> None:
    """One deliberate difference: the original parser refused a file whose lines end in a lone
    carriage return (its header reader saw one long line); both tokenizers read it now."""
    for data in (b"a,b\r" + b"1,2\r" * 31, b'a,b\r"1",2\r' + b"3,4\r" * 30):  # fast and pandas tokenizers
        frame = new_parse(data, ",", None, tmp_path)
        assert list(frame.columns) == ["a", "b"] and len(frame) == 31 and str(frame["a"].dtype) == "int64"


def test_a_bad_byte_is_located_in_the_file_even_after_a_bom(tmp_path: Path) -> None:
    """The original parser counted the offset after a byte-order mark (3 bytes short); it is the
    file's own offset now."""
    with pytest.raises(InvalidInput, match="invalid byte at offset 9") as error:
        new_parse(b"\xef\xbb\xbfa,b\n1,\xff\n", ",", None, tmp_path)
    assert error.value.details == {"offset": 9}


def test_a_wide_unquoted_header_is_refused_before_it_is_split(tmp_path: Path) -> None:
    data = b",".join(b"c%d" % i for i in range(200_000)) + b"\n" + b"1," * 199_999 + b"1\n"
    with pytest.raises(InvalidInput, match="200000 columns; at most 50"):
        new_parse(data, ",", None, tmp_path, chunk=1 << 20)


def test_types_are_decided_by_every_row_not_the_first_piece(tmp_path: Path) -> None:
    data = b"n,i,t\n" + b"".join(b"%d,%d,%d\n" % (i, i, i) for i in range(200)) + b"0.5,x,\n"
    frame = new_parse(data, ",", None, tmp_path)
    assert str(frame["n"].dtype) == "float64" and frame["n"].iloc[-1] == 0.5
    assert frame["i"].dtype.kind not in "if" and frame["i"].iloc[-1] == "x"
    assert str(frame["t"].dtype) == "float64"  # a trailing null keeps an integer column float
