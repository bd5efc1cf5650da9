"""CSV uploads stream to disk: raw ``text/csv`` bodies, multipart in any field order, 507, clean-up,
and memory that does not grow with the file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from service.settings import Settings
from tests.helpers import assert_error, centroid_process, free_port, wait_for

CSV = b"State,Crime,Density\nAlabama,4.5,94.4\nAlaska,5.1,1.3\nArizona,5.2,56.3\n"


def leftovers(settings: Settings) -> list[str]:
    """Files in the artifact directory other than published Parquet files (temp files of any kind)."""
    root = settings.resolved_artifact_dir
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and (p.suffix != ".parquet" or p.name.startswith(".tmp-"))
    )


def test_a_raw_text_csv_body_with_fields_in_the_query(client: TestClient) -> None:
    response = client.post(
        "/datasets?name=crimes&key_column=State", content=CSV, headers={"content-type": "text/csv; charset=utf-8"}
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["row_count"] == 3 and body["key_column"] == "State"
    assert [c["dtype"] for c in body["columns"]] == ["string", "float64", "float64"]
    assert body["recipe"] == {"source": "upload", "filename": None, "columns": ["State", "Crime", "Density"]}
    summary = {c["name"]: c for c in client.get(f"/datasets/{body['id']}").json()["summary"]}
    assert summary["Crime"]["min"] == 4.5 and summary["Crime"]["max"] == 5.2
    assert summary["State"] == {
        "name": "State",
        "dtype": "string",
        "count": 3,
        "null_count": 0,
        "min": "Alabama",
        "max": "Arizona",
        "mean": None,
        "std": None,
    }


def test_a_raw_body_streamed_in_chunks(client: TestClient) -> None:
    rows = b"".join(b"k%d,%d.5\n" % (i, i) for i in range(20_000))

    def body() -> Iterator[bytes]:  # no Content-Length: chunked transfer encoding
        yield b"k,v\n"
        for start in range(0, len(rows), 4096):
            yield rows[start : start + 4096]

    response = client.post("/datasets?name=chunked&key_column=k", content=body(), headers={"content-type": "text/csv"})
    assert response.status_code == 201, response.text
    assert response.json()["row_count"] == 20_000
    page = client.get(f"/datasets/{response.json()['id']}/rows", params={"offset": 19_999, "limit": 1}).json()
    assert page["rows"] == [["k19999", 19999.5]]


def test_raw_body_fields_are_validated(client: TestClient) -> None:
    headers = {"content-type": "text/csv"}
    missing = assert_error(client.post("/datasets", content=CSV, headers=headers), 422, "validation_error")
    assert missing["details"][0]["loc"] == ["query", "name"]
    assert_error(client.post("/datasets?name=x&delimiter=x", content=CSV, headers=headers), 422, "validation_error")
    assert_error(client.post("/datasets?name=x&key_column=nope", content=CSV, headers=headers), 400, "invalid_input")


def test_multipart_fields_may_come_after_the_file(client: TestClient, settings: Settings) -> None:
    boundary = "b0undary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="c.csv"\r\n'
        "Content-Type: text/csv\r\n\r\n",
        CSV.decode(),
        f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="key_column"\r\n\r\nState',
        f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\nlate',
        f"\r\n--{boundary}--\r\n",
    ]
    response = client.post(
        "/datasets",
        content="".join(parts).encode(),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert response.status_code == 201, response.text
    assert response.json()["name"] == "late" and response.json()["recipe"]["filename"] == "c.csv"
    assert leftovers(settings) == []


def _file_first(data: bytes, **fields: str) -> tuple[bytes, dict[str, str]]:
    """A multipart body with the file before the other fields (the order `curl -F file=@... -F ...` uses)."""
    boundary = "b0undary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="c.csv"\r\n'
        "Content-Type: text/csv\r\n\r\n"
    ).encode() + data
    for name, value in fields.items():
        body += f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}'.encode()
    body += f"\r\n--{boundary}--\r\n".encode()
    return body, {"content-type": f"multipart/form-data; boundary={boundary}"}


@pytest.mark.parametrize(
    ("data", "fields"),
    [
        (CSV, {"key_column": "State"}),  # the key named after the file: the parse made meanwhile holds
        (b"k,v\n a ,1\nb ,2\n", {"key_column": "k"}),  # keys to trim: parsed again as keys
        (b"k,v\n3,1\n1,2\n2,3\n", {"key_column": "k"}),  # numbers as keys: parsed again as text
        (b"k;v\nx;1,5\ny;2\n", {"delimiter": ";", "key_column": "k"}),  # another delimiter: parsed again
        (b"k,v\nx,1\nx,2\n", {"key_column": "k"}),  # duplicate keys: refused all the same
        (b"k,v\nx,1\n,2\n", {"key_column": "k"}),  # an empty key: refused all the same
        (b"k,v\nx,1\ny,nan\n", {}),  # refused while parsing: the same error
    ],
)
def test_fields_after_the_file_give_what_fields_before_it_give(
    client: TestClient, settings: Settings, data: bytes, fields: dict[str, str]
) -> None:
    """The file is parsed while it arrives, assuming the fields sent after it are absent: whatever
    they turn out to say, the answer is the one for fields sent first (a pre-parsed form)."""
    body, headers = _file_first(data, **fields, name="late")
    late = client.post("/datasets", content=body, headers=headers)
    early = client.post("/datasets", data={"name": "late", **fields}, files={"file": ("c.csv", data, "text/csv")})
    assert late.status_code == early.status_code, (late.text, early.text)
    if early.status_code != 201:
        assert late.json()["error"]["message"] == early.json()["error"]["message"]
    else:
        ours, theirs = late.json(), early.json()
        assert ours["columns"] == theirs["columns"] and ours["key_column"] == theirs["key_column"]
        rows = [client.get(f"/datasets/{d['id']}/rows").json()["rows"] for d in (ours, theirs)]
        assert rows[0] == rows[1]
    assert leftovers(settings) == []


@pytest.mark.slow
def test_multipart_mistakes_are_named(client: TestClient, settings: Settings) -> None:
    two = client.post(
        "/datasets",
        files=[("file", ("a.csv", CSV)), ("file", ("b.csv", CSV))],
        data={"name": "x"},
    )
    assert_error(two, 422, "validation_error", "one file")
    assert_error(client.post("/datasets", files={"other": ("a.csv", CSV)}, data={"name": "x"}), 422, "validation_error")
    assert_error(client.post("/datasets", data={"name": "x"}, files={}), 415, "unsupported_media_type")
    huge_field = client.post("/datasets", files={"file": ("a.csv", CSV)}, data={"name": "x" * 70_000})
    assert_error(huge_field, 422, "validation_error", "larger than")
    no_file = client.post(
        "/datasets",
        content=b'--b\r\nContent-Disposition: form-data; name="name"\r\n\r\nx\r\n--b--\r\n',
        headers={"content-type": "multipart/form-data; boundary=b"},
    )
    assert_error(no_file, 422, "validation_error", "`file`")
    assert leftovers(settings) == []


def test_a_refused_file_leaves_nothing_behind(client: TestClient, settings: Settings) -> None:
    bad = b"k,v\n" + b"".join(b"k%d,%d\n" % (i, i) for i in range(5000)) + b"k7,inf\n"
    response = client.post("/datasets", files={"file": ("bad.csv", bad)}, data={"name": "bad", "key_column": "k"})
    assert_error(response, 400, "invalid_input", "row 5000")
    dup = b"k,v\n" + b"".join(b"k%d,%d\n" % (i % 4000, i) for i in range(5000))
    response = client.post("/datasets", files={"file": ("dup.csv", dup)}, data={"name": "dup", "key_column": "k"})
    error = assert_error(response, 400, "invalid_input", "duplicate values: k0, k1")
    assert error["details"]["duplicates"][:3] == ["k0", "k1", "k2"] and len(error["details"]["duplicates"]) == 100
    assert leftovers(settings) == []
    assert list(settings.resolved_artifact_dir.rglob("*.parquet")) == []


def test_an_upload_the_disk_cannot_hold_is_refused_before_it_is_read(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from service.datasets import service as dataset_service

    usage = shutil.disk_usage(settings.resolved_artifact_dir)
    monkeypatch.setattr(dataset_service.shutil, "disk_usage", lambda _: usage._replace(free=len(CSV)))
    response = client.post("/datasets?name=x", content=CSV, headers={"content-type": "text/csv"})
    error = assert_error(response, 507, "insufficient_storage", "no space left")
    assert error["details"]["needed_bytes"] == 2 * len(CSV)
    assert leftovers(settings) == []


def _csv_body(rows: int) -> Iterator[bytes]:
    """A CSV of ``rows`` x (key + 8 floats), generated as it is sent."""
    yield b"key," + b",".join(b"f%d" % i for i in range(8)) + b"\n"
    line = b",".join(b"%d.25" % i for i in range(8))
    for start in range(0, rows, 20_000):
        yield b"".join(b"k%d," % i + line + b"\n" for i in range(start, min(start + 20_000, rows)))


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def _upload_growth(base_url: str, pid: int, rows: int, name: str) -> int:
    """Peak resident memory the server gains while taking an upload of ``rows`` rows (bytes)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # restart the peak (VmHWM) from the current RSS
    before = _kib(pid, "VmRSS")
    response = httpx.post(
        f"{base_url}/datasets",
        params={"name": name, "key_column": "key"},
        content=_csv_body(rows),
        headers={"content-type": "text/csv"},
        timeout=120,
    )
    assert response.status_code == 201, response.text
    assert response.json()["row_count"] == rows
    return (_kib(pid, "VmHWM") - before) * 1024


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_upload_memory_does_not_grow_with_the_file(tmp_path: Path) -> None:
    """A real server takes a 4x larger upload (about 20 MB, then 80 MB of CSV, streamed by the
    client, its keys unsorted so the key check runs) for no more memory than its bounds."""
    port = free_port()
    env = {"CENTROID_DATA_DIR": str(tmp_path / "data"), "CENTROID_LOG_LEVEL": "WARNING"}
    server = centroid_process(["serve", "--port", str(port), "--no-worker"], env, tmp_path / "serve.log")
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _ready(base_url), bool, timeout=60)
        _upload_growth(base_url, server.pid, 50_000, "warm-up")  # one-off costs: imports, thread pools
        small = _upload_growth(base_url, server.pid, 250_000, "small")
        large = _upload_growth(base_url, server.pid, 1_000_000, "large")
    finally:
        server.terminate()
        server.wait(30)
    # Bounded by constants, not rows: a few 8 MB pieces in flight, and the key check's DuckDB
    # memory limit (64 MB; it spills to disk beyond that).
    assert large < small + 64 * 2**20, (small, large)
    assert large < 192 * 2**20, large


def _ready(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
