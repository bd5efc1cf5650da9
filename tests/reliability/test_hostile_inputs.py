"""Hostile uploads and payloads: each gets a clear 4xx in the one error shape, and nothing changes.

"Nothing changed" (:func:`unchanged`) means: the dataset/model/job/endpoint listings are as before,
the artifact directory holds exactly the same files, no file appeared anywhere else under the
test's tmp directory (only the SQLite database may change), and the app still answers /healthz.
Memory is measured with tracemalloc (the TestClient and the app share the process, so the figure
includes the request body the test itself holds); the numbers are in docs/reliability.md.
"""

from __future__ import annotations

import gzip
import io
import math
import tarfile
import time
import tracemalloc
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from service.engine import write_model_tar
from service.engine.mxnet_format import NDArrayList, write_ndarray_list
from service.main import create_app
from service.settings import Settings
from tests.helpers import BLOBS_CSV, deployed, trained_model, upload_csv

MIB = 1024 * 1024
SAGEMAKER_ARTIFACT = Path(__file__).resolve().parents[1] / "data" / "kmeans-k10-d2-model.tar.gz"
LISTINGS = ("/datasets", "/models", "/training-jobs", "/endpoints")
DATABASE_FILES = ("centroid.db", "centroid.db-journal", "centroid.db-wal", "centroid.db-shm")


# --- what "nothing changed" means ------------------------------------------------------------


@dataclass(frozen=True)
class State:
    totals: dict[str, int]
    artifacts: frozenset[str]
    files: frozenset[str]


def files_under(root: Path) -> frozenset[str]:
    return frozenset(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink())


def state_of(client: TestClient, root: Path) -> State:
    totals = {path: client.get(path, params={"limit": 1}).json()["total"] for path in LISTINGS}
    artifacts = client.app.state.centroid.store.root  # type: ignore[attr-defined]
    return State(totals, files_under(artifacts), files_under(root))


@contextmanager
def unchanged(client: TestClient, root: Path) -> Iterator[None]:
    """Assert the block leaves no row, no artifact and no stray file behind, and the app alive."""
    before = state_of(client, root)
    yield
    after = state_of(client, root)
    assert after.totals == before.totals, "a resource was created"
    assert after.artifacts == before.artifacts, "a file was left in the artifact directory"
    stray = {f for f in after.files - before.files if Path(f).name not in DATABASE_FILES}
    assert not stray, f"files appeared: {sorted(stray)}"
    assert client.get("/healthz").status_code == 200


def refused(response: Any, statuses: tuple[int, ...] = (400, 422), max_bytes: int = 64_000) -> dict[str, Any]:
    """A clear 4xx in the one error shape (never a 500), not echoing megabytes of input."""
    assert response.status_code in statuses, (response.status_code, response.text[:500])
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details", "request_id"}, body
    assert body["error"]["message"] and len(response.content) < max_bytes, "error bodies stay short"
    return body["error"]  # type: ignore[no-any-return]


@contextmanager
def measured(limit_bytes: float, limit_seconds: float) -> Iterator[dict[str, float]]:
    """Peak Python memory allocated (tracemalloc) and wall time of the block, with upper limits."""
    figures: dict[str, float] = {}
    tracemalloc.start()
    started = time.perf_counter()
    try:
        yield figures
    finally:
        figures["seconds"] = time.perf_counter() - started
        figures["peak_bytes"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    print(f"peak {figures['peak_bytes'] / MIB:.1f} MiB in {figures['seconds']:.2f} s")
    assert figures["peak_bytes"] < limit_bytes, f"peak {figures['peak_bytes'] / MIB:.1f} MiB"
    assert figures["seconds"] < limit_seconds, f"took {figures['seconds']:.1f} s"


def post_csv(client: TestClient, data: bytes, name: str = "hostile", filename: str = "h.csv", **fields: str) -> Any:
    return client.post("/datasets", files={"file": (filename, data, "text/csv")}, data={"name": name, **fields})


def post_model(client: TestClient, data: bytes, feature_names: str = "x,y", name: str = "imported") -> Any:
    files = {"file": ("model.tar.gz", data, "application/gzip")}
    return client.post("/models/import", files=files, data={"name": name, "feature_names": feature_names})


def post_raw(
    client: TestClient, path: str, body: bytes, content_type: str = "application/json", method: str = "POST"
) -> Any:
    return client.request(method, path, content=body, headers={"content-type": content_type})


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path


def custom_client(settings: Settings, **overrides: Any) -> TestClient:
    return TestClient(create_app(settings.model_copy(update=overrides)))


@dataclass
class World:
    dataset: str
    model: str
    holes: str
    endpoint: str = "ep"


@pytest.fixture
def world(client: TestClient) -> World:
    """A dataset (60 rows, features x and y, key id), a model trained on it, endpoint ``ep``, and
    a dataset with a null in its numeric column ``v`` (for fillna)."""
    dataset = upload_csv(client, "blobs", BLOBS_CSV, "id")["id"]
    model = trained_model(client, dataset)["id"]
    deployed(client, model)
    holes = client.post(
        "/datasets", json={"name": "holes", "key_column": "k", "columns": ["k", "v"], "rows": [["a", 1.5], ["b", None]]}
    )
    assert holes.status_code == 201, holes.text
    return World(dataset, model, holes.json()["id"])


# --- huge CSVs -----------------------------------------------------------------------------------


def test_a_million_columns_is_refused_before_pandas_parses_it(
    client: TestClient, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    header = ",".join(f"c{i}" for i in range(1_000_000)).encode()
    data = header + b"\n" + b",".join([b"1"] * 1_000_000) + b"\n"  # 8.9 MB, under the 100 MiB limit

    def pandas_must_not_run(*_: Any, **__: Any) -> None:
        raise AssertionError("pandas.read_csv was called")

    monkeypatch.setattr(pd, "read_csv", pandas_must_not_run)
    with unchanged(client, root), measured(limit_bytes=4 * len(data), limit_seconds=10):
        error = refused(post_csv(client, data), (400,))
    assert error["details"] == {"columns": 1_000_000, "limit": 10_000}
    assert "at most 10000" in error["message"]


def test_a_single_line_over_the_upload_limit_is_413_before_it_is_read(settings: Settings, root: Path) -> None:
    # The 10 GiB case with the limit at 4 MiB: same code path, sane memory (CSV uploads and other
    # bodies have limits of their own).
    with custom_client(settings, max_upload_bytes=4 * MIB, max_csv_upload_bytes=4 * MIB) as client:
        line = b"v\n" + b"7" * (4 * MIB + 1) + b"\n"
        with unchanged(client, root):
            with measured(limit_bytes=4 * len(line), limit_seconds=10):
                error = refused(post_csv(client, line), (413,))
            assert error["code"] == "payload_too_large" and error["details"] == {"limit_bytes": 4 * MIB}

            def chunks() -> Iterator[bytes]:  # no Content-Length: the limit applies while streaming
                for _ in range(8):
                    yield b"7" * MIB

            with measured(limit_bytes=4 * 8 * MIB, limit_seconds=10):  # the test client buffers the 8 MiB
                streamed = client.post(
                    "/endpoints/ep/invocations", content=chunks(), headers={"content-type": "text/csv"}
                )
            assert refused(streamed, (413,))["code"] == "payload_too_large"


@pytest.mark.parametrize(
    ("what", "line", "expect"),
    [
        ("a 4-million-digit number", b"v\n" + b"7" * (4 * MIB - 1024) + b"\n", 400),
        ("a 4 MiB header", b"v" * (4 * MIB - 1024) + b"\n1\n", 400),
        ("a 4 MiB text cell", b"v\n" + b"t" * (4 * MIB - 1024) + b"\n", 201),
    ],
)
def test_one_huge_line_right_under_the_limit_is_refused_or_stored_without_blowing_memory(
    settings: Settings, root: Path, what: str, line: bytes, expect: int
) -> None:
    with custom_client(settings, max_upload_bytes=4 * MIB) as client:
        if expect == 201:
            with measured(limit_bytes=16 * len(line), limit_seconds=20):
                response = post_csv(client, line)
            assert response.status_code == 201, response.text[:300]
            created = response.json()
            assert created["row_count"] == 1 and created["columns"] == [{"name": "v", "dtype": "string"}]
            assert len(client.get(f"/datasets/{created['id']}/csv").content) > 4 * MIB - 1024
        else:
            with unchanged(client, root), measured(limit_bytes=16 * len(line), limit_seconds=20):
                refused(post_csv(client, line), (expect,))


# --- compressed uploads ------------------------------------------------------------------------


def test_gzip_content_encoding_is_refused_not_decompressed(client: TestClient, world: World, root: Path) -> None:
    csv_upload = (
        b'--b\r\nContent-Disposition: form-data; name="name"\r\n\r\nz\r\n'
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="z.csv"\r\nContent-Type: text/csv\r\n\r\n'
        b"a\n1\n\r\n--b--\r\n"
    )
    cases = [
        ("/datasets", "multipart/form-data; boundary=b", csv_upload),
        ("/datasets", "application/json", b'{"name": "z", "columns": ["a"], "rows": [[1]]}'),
        ("/endpoints/ep/invocations", "text/csv", b"0.1,0.1\n"),
        ("/endpoints/ep/predictions", "application/json", b'{"rows": [{"x": 0.1, "y": 0.1}]}'),
    ]
    with unchanged(client, root):
        for path, content_type, body in cases:
            for encoding in ("gzip", "deflate, gzip", "br"):
                headers = {"content-type": content_type, "content-encoding": encoding}
                response = client.post(path, content=gzip.compress(body), headers=headers)
                error = refused(response, (415,))
                assert error["code"] == "unsupported_media_type" and "uncompressed" in error["message"]
                assert response.headers["accept-encoding"] == "identity"
    # The same bodies uncompressed (or `identity`) work: only the encoding is refused.
    ok = client.post(
        "/endpoints/ep/invocations",
        content=b"0.1,0.1\n",
        headers={"content-type": "text/csv", "content-encoding": "identity"},
    )
    assert ok.status_code == 200, ok.text
    # A gzip *file* in a plain upload is not decompressed either: it is not CSV text.
    with unchanged(client, root):
        refused(post_csv(client, gzip.compress(b"a,b\n1,2\n")), (400,))


def tar_gz(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for info, payload in members:
            archive.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return gzip.compress(buffer.getvalue(), compresslevel=9)


def member(
    name: str, payload: bytes | None = None, kind: bytes = tarfile.REGTYPE, link: str = "", size: int | None = None
) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, 0o644
    info.size = size if size is not None else (len(payload) if payload is not None else 0)
    return info, payload


def lying_tar(payload: bytes, claimed: int) -> bytes:
    """A tar whose model_algo-1 header claims ``claimed`` bytes but holds ``payload`` (tarfile won't write one)."""
    info = tarfile.TarInfo("model_algo-1")
    info.size = claimed
    padded = payload + b"\0" * (-len(payload) % 512)
    return gzip.compress(info.tobuf(format=tarfile.GNU_FORMAT) + padded + b"\0" * 1024)


MODEL_PAYLOAD = write_ndarray_list(NDArrayList(arrays=[np.ones((3, 2), dtype=np.float32)]))


def zeros_tar_gz(padding_bytes: int, model: bytes | None = MODEL_PAYLOAD) -> bytes:
    """tar.gz of a ``padding`` member of zeros (built in 1 MiB steps, never whole) and model_algo-1."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: gzip container
    info = tarfile.TarInfo("padding")
    info.size = padding_bytes
    out = [compressor.compress(info.tobuf(format=tarfile.GNU_FORMAT))]
    for offset in range(0, padding_bytes, MIB):
        out.append(compressor.compress(b"\0" * min(MIB, padding_bytes - offset)))
    tail = b"\0" * (-padding_bytes % 512)
    if model is not None:
        header = tarfile.TarInfo("model_algo-1")
        header.size = len(model)
        tail += header.tobuf(format=tarfile.GNU_FORMAT) + model + b"\0" * (-len(model) % 512)
    out += [compressor.compress(tail + b"\0" * 1024), compressor.flush()]
    return b"".join(out)


def test_gzip_bombs_are_refused_while_streaming(settings: Settings, client: TestClient, root: Path) -> None:
    """A few KB that decompress past CENTROID_MAX_MODEL_BYTES (1 MiB here) are never allocated."""
    bombs = {
        # 8 MiB of zeros in front of a valid model: refused once 1 MiB has streamed through.
        "padding member": zeros_tar_gz(8 * MIB),
        # model_algo-1 itself is 8 MiB of zeros: refused from its tar header, before any read.
        "huge model_algo-1": tar_gz(member("model_algo-1", b"\0" * (8 * MIB))),
        # A gzip stream of zeros that is not even a tar.
        "plain gzip": gzip.compress(b"\0" * (8 * MIB), compresslevel=9),
    }
    with custom_client(settings, max_model_bytes=1 * MIB) as small:
        for what, bomb in bombs.items():
            assert len(bomb) < 10 * 1024, (what, len(bomb))  # ~8 KB each
            with unchanged(small, root), measured(limit_bytes=4 * MIB, limit_seconds=10):
                error = refused(post_model(small, bomb), (400,))
            assert "not a usable SageMaker KMeans model.tar.gz" in error["message"], (what, error)
        # The same model without the padding imports fine.
        assert post_model(small, tar_gz(member("model_algo-1", MODEL_PAYLOAD))).status_code == 201
    # With the default cap (64 MiB): 256 MiB of zeros (260 KB) stop at 64 MiB, streamed 64 KB at a time.
    bomb = zeros_tar_gz(256 * MIB)
    with unchanged(client, root), measured(limit_bytes=8 * MIB, limit_seconds=20):
        refused(post_model(client, bomb), (400,))


# --- deeply nested JSON --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["arrays", "objects"])
def test_deeply_nested_json_is_a_4xx_on_every_json_endpoint(
    client: TestClient, world: World, root: Path, shape: str
) -> None:
    depth = 100_000
    nested = b"[" * depth + b"]" * depth if shape == "arrays" else b'{"a":' * depth + b"1" + b"}" * depth
    targets = [
        ("POST", "/datasets", "application/json", b'{"name": "n", "columns": ["a"], "rows": ' + nested + b"}"),
        ("POST", f"/datasets/{world.dataset}/derive", "application/json", b'{"name": "n", "steps": ' + nested + b"}"),
        ("POST", "/training-jobs", "application/json", b'{"name": "n", "hyperparameters": ' + nested + b"}"),
        ("POST", "/endpoints", "application/json", b'{"name": "n", "model_id": ' + nested + b"}"),
        ("PUT", "/endpoints/ep", "application/json", b'{"model_id": ' + nested + b"}"),
        ("POST", "/endpoints/ep/predictions", "application/json", b'{"rows": [{"x": ' + nested + b"}]}"),
        ("POST", "/endpoints/ep/invocations", "application/json", b'{"instances": ' + nested + b"}"),
        ("POST", "/endpoints/ep/invocations", "application/jsonlines", nested + b"\n"),
    ]
    with unchanged(client, root):
        for method, path, content_type, body in targets:
            # 413 where a row count bounds the body first (predictions: 100k nested objects look like rows)
            refused(post_raw(client, path, body, content_type, method), (400, 413, 422))
            refused(post_raw(client, path, nested, content_type, method), (400, 413, 422))  # the whole body nested
        files = {"file": ("model.tar.gz", SAGEMAKER_ARTIFACT.read_bytes(), "application/gzip")}
        as_list = (b"[" * depth + b'"x"' + b"]" * depth).decode()
        refused(client.post("/models/import", files=files, data={"name": "n", "feature_names": as_list}))
    assert client.get("/endpoints/ep").json()["status"] == "InService"


# --- 1e6-row invocations -------------------------------------------------------------------------

ROWS = 1_000_000
MILLION_ROW_BODIES = {
    "csv": ("/endpoints/ep/invocations", "text/csv", b"0.1,0.2\n" * ROWS),
    "csv, CR line ends": ("/endpoints/ep/invocations", "text/csv", b"0.1,0.2\r" * ROWS),
    "json features": (
        "/endpoints/ep/invocations",
        "application/json",
        b'{"instances": [' + b",".join([b'{"features": [0.1, 0.2]}'] * ROWS) + b"]}",
    ),
    "json bare lists": (
        "/endpoints/ep/invocations",
        "application/json",
        b'{"instances": [' + b",".join([b"[0.1,0.2]"] * ROWS) + b"]}",
    ),
    "json dense": (
        "/endpoints/ep/invocations",
        "application/json",
        b'{"instances": [' + b",".join([b'{"data":{"features":{"values":[1,2]}}}'] * ROWS) + b"]}",
    ),
    "jsonlines": ("/endpoints/ep/invocations", "application/jsonlines", b'{"features": [0.1, 0.2]}\n' * ROWS),
    "predictions rows": (
        "/endpoints/ep/predictions",
        "application/json",
        b'{"rows": [' + b",".join([b'{"x": 1}'] * ROWS) + b"]}",
    ),
}


def test_a_million_rows_are_413_quickly_without_parsing(client: TestClient, world: World, root: Path) -> None:
    """Over CENTROID_MAX_INVOCATION_ROWS (100000): 413 from a byte count, before any parser runs.
    Parsing would take seconds and hundreds of MiB (measured before the fix: 10-15 s, 160-400 MiB);
    the check needs about one copy of the body."""
    for kind, (path, content_type, body) in MILLION_ROW_BODIES.items():
        with unchanged(client, root), measured(limit_bytes=3 * len(body) + 8 * MIB, limit_seconds=5) as figures:
            error = refused(post_raw(client, path, body, content_type), (413,))
        assert error["code"] == "payload_too_large" and error["details"]["limit"] == 100_000, kind
        assert error["details"]["rows"] >= ROWS, kind
        peak, seconds = figures["peak_bytes"] / MIB, figures["seconds"]
        print(f"{kind}: {len(body) / MIB:.1f} MiB body, peak {peak:.1f} MiB, {seconds:.3f} s")


# --- NaN, infinities and 1e309 in every numeric input ------------------------------------------

NON_FINITE_TOKENS = [b"NaN", b"Infinity", b"-Infinity", b"1e309", b'"nan"', b'"inf"', b'"-Infinity"', b'"1e309"']


def non_finite_requests(world: World) -> list[tuple[str, str, str, bytes]]:
    """(method, path, content type, body) with one non-finite number each, in every numeric input."""
    job = b'{"name": "j", "train_dataset_id": "%s", "hyperparameters": %s}'
    requests: list[tuple[str, str, str, bytes]] = []
    for token in NON_FINITE_TOKENS:
        bare = token.strip(b'"')
        requests += [
            (
                "POST",
                "/datasets",
                "application/json",
                b'{"name": "n", "columns": ["a", "b"], "rows": [[1, 2], [%s, 3]]}' % token,
            ),
            (
                "POST",
                f"/datasets/{world.dataset}/derive",
                "application/json",
                b'{"name": "n", "steps": [{"op": "scale", "columns": ["x"], "feature_range": [%s, 1]}]}' % token,
            ),
            (
                "POST",
                f"/datasets/{world.dataset}/derive",
                "application/json",
                b'{"name": "n", "steps": [{"op": "scale", "columns": ["x"], "feature_range": [0, %s]}]}' % token,
            ),
            (
                "POST",
                f"/datasets/{world.holes}/derive",
                "application/json",
                b'{"name": "n", "steps": [{"op": "fillna", "columns": ["v"], "strategy": "constant", "value": %s}]}'
                % token,
            ),
            ("POST", "/endpoints/ep/invocations", "text/csv", b"0.1,%s\n" % bare),
            (
                "POST",
                "/endpoints/ep/invocations",
                "application/json",
                b'{"instances": [{"features": [0.1, %s]}]}' % token,
            ),
            ("POST", "/endpoints/ep/invocations", "application/jsonlines", b'{"features": [%s, 0.1]}\n' % token),
            ("POST", "/endpoints/ep/predictions", "application/json", b'{"rows": [{"x": %s, "y": 0.1}]}' % token),
            (
                "POST",
                "/endpoints/ep/predictions",
                "application/json",
                b'{"rows": [{"x": %s, "y": 0.1}], "raw": true}' % token,
            ),
        ]
        for parameter in (
            "k",
            "feature_dim",
            "mini_batch_size",
            "epochs",
            "extra_center_factor",
            "local_lloyd_max_iter",
            "local_lloyd_tol",
            "local_lloyd_num_trials",
            "half_life_time_size",
            "seed",
        ):
            hyperparameters = (
                b'{"k": 2, "%s": %s}' % (parameter.encode(), token) if parameter != "k" else b'{"k": %s}' % token
            )
            requests.append(
                ("POST", "/training-jobs", "application/json", job % (world.dataset.encode(), hyperparameters))
            )
        requests += [
            (
                "POST",
                "/training-jobs",
                "application/json",
                b'{"name": "j", "train_dataset_id": "%s", "hyperparameters": {"k": 2}, '
                b'"resource_config": {"instance_count": %s}}' % (world.dataset.encode(), token),
            ),
            (
                "POST",
                "/endpoints",
                "application/json",
                b'{"name": "n", "model_id": "%s", "instance_count": %s}' % (world.model.encode(), token),
            ),
        ]
    return requests


def test_non_finite_numbers_are_refused_in_every_numeric_input(client: TestClient, world: World, root: Path) -> None:
    requests = non_finite_requests(world)
    with unchanged(client, root):
        for method, path, content_type, body in requests:
            response = post_raw(client, path, body, content_type, method)
            assert response.status_code in (400, 422), (path, body[:120], response.status_code, response.text[:300])
            refused(response)
        for token in ("nan", "NaN", "inf", "-Infinity", "1e309", "1,000e309"):
            refused(post_csv(client, b"k,v\na,1\nb,%s\n" % token.encode(), key_column="k"), (400,))
            refused(post_csv(client, b'k,v\na,1\nb,"%s"\n' % token.encode(), key_column="k"), (400,))
        for query in ("offset=nan", "offset=inf", "limit=1e309", "limit=NaN"):
            refused(client.get(f"/datasets?{query}"), (422,))
            refused(client.get(f"/datasets/{world.dataset}/rows?{query}"), (422,))
        for cluster in ("nan", "inf", "1e309"):
            refused(client.get(f"/models/{world.model}/assignments?cluster={cluster}"), (422,))
    assert len(requests) > 150


def test_finite_but_overflowing_values_are_a_400_not_a_500(client: TestClient, world: World, root: Path) -> None:
    """1e200 is finite, but its square is not: the engine refuses it, the API says 400."""
    with unchanged(client, root):
        refused(post_raw(client, "/endpoints/ep/invocations", b"1e200,0\n", "text/csv"), (400,))
        refused(post_raw(client, "/endpoints/ep/predictions", b'{"rows": [{"x": 1e200, "y": 0}]}'), (400,))


def test_lone_surrogates_and_partial_keys_are_a_400_not_a_500(client: TestClient, world: World, root: Path) -> None:
    """JSON may escape a lone surrogate (\\ud800), which no UTF-8 store or response can hold."""
    with unchanged(client, root):
        refused(post_raw(client, "/datasets", b'{"name": "n", "columns": ["a"], "rows": [["\\ud800"]]}'), (400,))
        refused(post_raw(client, "/datasets", b'{"name": "n", "columns": ["\\udfff"], "rows": [[1]]}'), (400, 422))
        refused(post_raw(client, "/endpoints/ep/predictions", b'{"rows": [{"id": "\\ud800", "x": 1, "y": 2}]}'), (400,))
        refused(post_raw(client, "/endpoints/ep/predictions", b'{"rows": [{"\\ud800": 1, "x": 1, "y": 2}]}'), (400,))
        # Some rows labelled by the model's key column (id), some not.
        partial = b'{"rows": [{"id": "a", "x": 1, "y": 2}, {"x": 1, "y": 2}]}'
        assert "key column" in refused(post_raw(client, "/endpoints/ep/predictions", partial), (400,))["message"]


# --- names -------------------------------------------------------------------------------------

HOSTILE_NAMES = {
    "parent": "..",
    "traversal": "../../../../../../tmp/centroid-escape",
    "absolute": "/etc/passwd",
    "backslashes": "..\\..\\windows\\system32",
    "url-encoded": "%2e%2e%2f%2e%2e%2fescape",
    "rtl override": "\u202eexe.txt\u202c",
    "emoji": "\U0001f600\U0001f44d\U0001f3fd family \U0001f468\u200d\U0001f469\u200d\U0001f467",
    "combining marks": "Z\u0351\u0352\u0353a\u0300\u0301\u0302l\u0303g\u0304o",
    "NUL": "a\x00b",
    "control chars": "bell\x07\x1b[31mred\r\n",
    "10k chars": "n" * 10_000,
}
ACCEPTABLE = {200, 201, 202, 400, 404, 409, 413, 422}


@pytest.mark.parametrize("label", list(HOSTILE_NAMES))
def test_hostile_names_are_accepted_or_refused_clearly_and_write_nothing_outside_the_store(
    client: TestClient, world: World, root: Path, label: str
) -> None:
    name = HOSTILE_NAMES[label]
    store = client.app.state.centroid.store.root  # type: ignore[attr-defined]
    before = files_under(root)
    artifact = write_model_tar(np.ones((2, 2)))
    responses = {
        "csv upload": post_csv(client, b"a,b\n1,2\n", name=name, filename=f"{name}.csv"),
        "csv filename": post_csv(client, b"a,b\n1,2\n", filename=name),
        "csv column": post_csv(client, f"{name[:256]},b\n1,2\n".encode()),
        "csv key column": post_csv(client, b"a,b\n1,2\n", key_column=name),
        "json dataset": client.post("/datasets", json={"name": name, "columns": ["a"], "rows": [[1]]}),
        "json column": client.post("/datasets", json={"name": "n", "columns": [name[:256]], "rows": [[1]]}),
        "json cell": client.post("/datasets", json={"name": "n", "columns": ["a"], "rows": [[name]]}),
        "derive": client.post(
            f"/datasets/{world.dataset}/derive",
            json={"name": name, "steps": [{"op": "rename", "mapping": {"x": name[:256]}}]},
        ),
        "model import": post_model(client, artifact, feature_names=f"{name[:256]},b", name=name),
        "job": client.post(
            "/training-jobs", json={"name": name, "train_dataset_id": world.dataset, "hyperparameters": {"k": 2}}
        ),
        "job features": client.post(
            "/training-jobs",
            json={
                "name": "jf",
                "train_dataset_id": world.dataset,
                "feature_columns": [name[:256]],
                "hyperparameters": {"k": 2},
            },
        ),
        "endpoint": client.post("/endpoints", json={"name": name, "model_id": world.model}),
        "prediction key": client.post("/endpoints/ep/predictions", json={"rows": [{"id": name, "x": 1, "y": 2}]}),
    }
    for segment in (quote(name, safe="/"), quote(name, safe="")):  # traversal attempt, then one segment
        for path in (
            f"/datasets/{segment}",
            f"/models/{segment}/centroids",
            f"/training-jobs/{segment}",
            f"/endpoints/{segment}",
        ):
            responses[f"GET {path[:40]}"] = client.get(path)
    for what, response in responses.items():
        assert response.status_code in ACCEPTABLE, (label, what, response.status_code, response.text[:300])
        if response.status_code >= 400:
            refused(response, (response.status_code,))
    # What was accepted keeps the name exactly as sent.
    for what in ("csv upload", "json dataset"):
        if responses[what].status_code == 201:
            assert client.get(f"/datasets/{responses[what].json()['id']}").json()["name"] == name
    stray = {f for f in files_under(root) - before if Path(f).name not in DATABASE_FILES}
    outside = {f for f in stray if not (root / f).resolve().is_relative_to(store)}
    assert not outside, f"files written outside the artifact directory: {sorted(outside)}"
    assert not Path("/tmp/centroid-escape").exists() and not Path("/tmp/centroid-escape.csv").exists()
    assert {Path(f).suffix for f in stray} <= {".parquet", ".gz"}


def test_names_with_nul_or_control_characters_are_refused_by_every_form(client: TestClient, root: Path) -> None:
    """The same rule for JSON and multipart: such names could not be stored in PostgreSQL."""
    artifact = write_model_tar(np.ones((2, 2)))
    with unchanged(client, root):
        for name in ("a\x00b", "tab\there", "\x1b[2J"):
            refused(client.post("/datasets", json={"name": name, "columns": ["a"], "rows": [[1]]}), (422,))
            refused(post_csv(client, b"a\n1\n", name=name), (422,))
            refused(post_model(client, artifact, name=name), (422,))
            refused(post_model(client, artifact, feature_names=f"x,{name}"), (400,))
            refused(client.post("/datasets", json={"name": "n", "columns": [name], "rows": [[1]]}), (400,))


# --- model.tar.gz uploads --------------------------------------------------------------------------


def model_member_middle(raw_tar: bytes) -> int:
    with tarfile.open(fileobj=io.BytesIO(raw_tar)) as archive:
        info = archive.getmember("model_algo-1")
    return info.offset_data + info.size // 2


def test_corrupt_or_truncated_model_archives_are_refused(client: TestClient, root: Path) -> None:
    good = SAGEMAKER_ARTIFACT.read_bytes()
    raw_tar = gzip.decompress(good)
    cases = {
        "empty": b"",
        "truncated in half": good[: len(good) // 2],
        "truncated by one byte": good[:-1],
        "gzip trailer corrupted": good[:-8] + b"\xff" * 8,
        "flipped bytes": good[:40] + bytes(b ^ 0xFF for b in good[40:80]) + good[80:],
        "random bytes": bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8)),
        "gzip of text": gzip.compress(b"hello"),
        "tar truncated mid-member": gzip.compress(raw_tar[: model_member_middle(raw_tar)]),
        "model_algo-1 garbage": tar_gz(member("model_algo-1", b"\x12\x01" + b"\0" * 100)),
        "model_algo-1 truncated": tar_gz(member("model_algo-1", MODEL_PAYLOAD[:-4])),
        "model_algo-1 NaN centroids": tar_gz(
            member("model_algo-1", write_ndarray_list(NDArrayList(arrays=[np.full((2, 2), np.nan, np.float32)])))
        ),
        "model_algo-1 claims more than it holds": lying_tar(MODEL_PAYLOAD, claimed=len(MODEL_PAYLOAD) + 4096),
    }
    with unchanged(client, root):
        for what, data in cases.items():
            response = post_model(client, data)
            assert response.status_code in (400, 422), (what, response.status_code, response.text[:300])
            refused(response)


def test_archive_links_and_escaping_paths_are_never_extracted(client: TestClient, root: Path) -> None:
    escape = root.parent / f"{root.name}-escaped"
    refusals = {
        "absolute path": tar_gz(member("/model_algo-1", MODEL_PAYLOAD)),
        "parent path": tar_gz(member("../model_algo-1", MODEL_PAYLOAD)),
        "deep parent path": tar_gz(member("../../../../../../../model_algo-1", MODEL_PAYLOAD)),
        "symlink to /etc/passwd": tar_gz(member("model_algo-1", kind=tarfile.SYMTYPE, link="/etc/passwd")),
        "symlink to a sibling": tar_gz(
            member("real", MODEL_PAYLOAD), member("model_algo-1", kind=tarfile.SYMTYPE, link="real")
        ),
        "hardlink to a sibling": tar_gz(
            member("real", MODEL_PAYLOAD), member("model_algo-1", kind=tarfile.LNKTYPE, link="real")
        ),
        "hardlink outside": tar_gz(member("model_algo-1", kind=tarfile.LNKTYPE, link="../../../../etc/passwd")),
        "fifo": tar_gz(member("model_algo-1", kind=tarfile.FIFOTYPE)),
        "directory": tar_gz(member("model_algo-1", kind=tarfile.DIRTYPE)),
        "twice": tar_gz(member("model_algo-1", MODEL_PAYLOAD), member("./model_algo-1", MODEL_PAYLOAD)),
    }
    with unchanged(client, root):
        for what, data in refusals.items():
            error = refused(post_model(client, data), (400,))
            assert "model_algo-1" in error["message"] or "regular file" in error["message"], (what, error)
    # Hostile members next to a valid model_algo-1 are ignored, never written anywhere.
    hostile_neighbours = tar_gz(
        member(str(escape), b"absolute"),
        member(f"../../../../../../{escape}", b"traversal"),
        member("evil-link", kind=tarfile.SYMTYPE, link=str(escape)),
        member("evil-hardlink", kind=tarfile.LNKTYPE, link="/etc/passwd"),
        member("model_algo-1", MODEL_PAYLOAD),
    )
    before = files_under(root)
    response = post_model(client, hostile_neighbours)
    assert response.status_code == 201, response.text
    assert response.json()["k"] == 3 and response.json()["feature_dim"] == 2
    assert not escape.exists()
    new = files_under(root) - before
    assert {Path(f).name for f in new} - set(DATABASE_FILES) == {f"{response.json()['id']}.tar.gz"}
    assert not math.isnan(client.get(f"/models/{response.json()['id']}/centroids").json()["centroids"][0][0])
