"""Faults: processes killed mid-work, the database gone for a few seconds, the artifact disk full.

Real processes (``centroid serve`` / ``centroid worker`` through the CLI) are killed with SIGKILL
and restarted; the database outage goes through a TCP proxy the test cuts; disk-full is a
failing writer (always) and a real, tiny tmpfs (when this machine lets the test mount one).
Nothing in production code knows about any of it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from moto.sagemaker.models import SageMakerModelBackend
from moto.sagemaker.responses import SageMakerResponse
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from service.datasets.ingest import CsvSpool
from service.db.tables import DatasetTable, ModelTable, TrainingJobTable
from service.engine import write_model_tar
from service.main import create_app
from service.settings import Settings
from service.storage import StagedFile
from tests.conftest import PG_ADMIN_URL, _fresh_postgres_database
from tests.helpers import (
    BLOBS_CSV,
    assert_error,
    centroid_process,
    free_port,
    run_worker_until_idle,
    upload_csv,
    wait_for,
)
from tests.sagemaker.conftest import (  # noqa: F401 - fixtures, used by name
    BUCKET,
    REGION,
    ROLE,
    FakeSageMaker,
    aws,
    aws_env,
    backoff_delays,
    moto_url,
)
from tests.workers.test_worker import slow_csv
from workers.worker import Worker

MODEL_TAR = Path(__file__).resolve().parents[1] / "data" / "kmeans-k10-d2-model.tar.gz"
BOUND_SECONDS = 15.0  # the longest a request may take while the database is away


# --- real processes -------------------------------------------------------------------------------


def process_env(settings: Settings, **extra: str) -> dict[str, str]:
    return {
        "CENTROID_DATA_DIR": str(settings.data_dir),
        "CENTROID_DATABASE_URL": settings.resolved_database_url,
        "CENTROID_LOG_LEVEL": "WARNING",
        **extra,
    }


def serve(env: dict[str, str], log: Path, *args: str) -> tuple[subprocess.Popen[bytes], str]:
    """``centroid serve`` on a free port; returns once /readyz answers 200."""
    port = free_port()
    process = centroid_process(["serve", "--host", "127.0.0.1", "--port", str(port), *args], env, log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, f"centroid serve did not become ready:\n{log.read_text()}"
        time.sleep(0.1)


def stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        process.send_signal(sig)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(30)
        raise AssertionError(f"process {process.args!r} ignored signal {sig} for 30 s") from None


def artifact_files(settings: Settings) -> list[str]:
    """Every file under the artifact directory, relative to it."""
    root = settings.resolved_artifact_dir
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def count(settings: Settings, table: Any, *where: Any) -> int:
    from sqlalchemy import create_engine

    engine = create_engine(settings.resolved_database_url)
    try:
        with Session(engine) as session:
            return int(session.scalar(select(func.count()).select_from(table).where(*where)) or 0)
    finally:
        engine.dispose()


# --- API SIGKILL mid-upload -----------------------------------------------------------------------


def _multipart(boundary: str, name: str) -> tuple[bytes, bytes]:
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\n{name}\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="key_column"\r\n\r\nid\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}.csv"\r\n'
        "Content-Type: text/csv\r\n\r\nid,a,b\r\n"
    ).encode()
    return head, f"\r\n--{boundary}--\r\n".encode()


def _stream_then_kill(server: subprocess.Popen[bytes], url: str) -> None:
    """Stream the body of a 40 MB CSV upload slowly; SIGKILL the server once 8 MB went through."""
    boundary = "centroid-fault-boundary"
    head, tail = _multipart(boundary, "half")
    declared_csv = 40 * 1024 * 1024
    chunk = b"".join(f"r{i:07d},{i % 97}.5,{i % 89}.25\n".encode() for i in range(3000))[: 64 * 1024]
    streamed = 0
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as connection:
        connection.sendall(
            (
                "POST /datasets HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                f"Content-Length: {len(head) + declared_csv + len(tail)}\r\n\r\n"
            ).encode()
            + head
        )
        while streamed < 8 * 1024 * 1024:  # more than socket buffers hold: the server is reading
            connection.sendall(chunk)
            streamed += len(chunk)
            time.sleep(0.005)
        server.send_signal(signal.SIGKILL)  # mid-stream: 32 MB of the declared body never arrive
        server.wait(30)


def _kill_while_writing(server: subprocess.Popen[bytes], url: str, datasets_dir: Path) -> None:
    """Upload a 150,000-row CSV; SIGKILL the server the moment its Parquet temp file appears."""
    values = np.random.default_rng(0).normal(size=(150_000, 2))  # its Parquet file takes ~50 ms to write
    big = ("id,a,b\n" + "".join(f"r{i},{a:.5f},{b:.5f}\n" for i, (a, b) in enumerate(values))).encode()
    before = set(os.listdir(datasets_dir))

    def upload() -> None:
        with contextlib.suppress(httpx.TransportError):  # the server dies under it: expected
            httpx.post(f"{url}/datasets", files={"file": ("big.csv", big)}, data={"name": "big"}, timeout=120)

    uploader = threading.Thread(target=upload, daemon=True)
    uploader.start()
    try:
        deadline = time.monotonic() + 120
        while not any(name.startswith(".tmp-") for name in set(os.listdir(datasets_dir)) - before):
            assert server.poll() is None and time.monotonic() < deadline, "no temp file was ever written"
            time.sleep(0.0005)
        server.send_signal(signal.SIGKILL)
        server.wait(30)
    finally:
        uploader.join(30)


def test_api_sigkill_mid_upload_leaves_no_half_dataset_and_no_orphan_file(settings: Settings, tmp_path: Path) -> None:
    """Killed (1) mid-stream of an upload's body, (2) between writing the Parquet file and
    committing its row; (3) the later window — file renamed into place, row not yet committed —
    planted for datasets and models. After each next start: no half dataset, no orphan file."""
    env = process_env(settings)
    restart_env = {**env, "CENTROID_ORPHAN_GRACE_SECONDS": "0"}
    datasets_dir = settings.resolved_artifact_dir / "datasets"

    server, url = serve(env, tmp_path / "serve1.log")
    try:
        kept = httpx.post(
            f"{url}/datasets", files={"file": ("kept.csv", BLOBS_CSV)}, data={"name": "kept", "key_column": "id"}
        )
        assert kept.status_code == 201, kept.text
        _stream_then_kill(server, url)
    finally:
        stop(server, signal.SIGKILL)
    kept_file = f"datasets/{kept.json()['id']}.parquet"

    server, url = serve(restart_env, tmp_path / "serve2.log")
    try:
        listing = httpx.get(f"{url}/datasets").json()
        assert [d["name"] for d in listing["items"]] == ["kept"] and listing["total"] == 1
        assert httpx.get(f"{url}/datasets/{kept.json()['id']}/rows").json()["total"] == 60
        assert artifact_files(settings) == [kept_file]
        _kill_while_writing(server, url, datasets_dir)
    finally:
        stop(server, signal.SIGKILL)
    left = sorted(set(artifact_files(settings)) - {kept_file})
    assert len(left) == 1 and left[0].startswith("datasets/.tmp-"), left  # killed mid-write, before the rename
    assert count(settings, DatasetTable) == 1

    # the publish -> commit window, planted: files in place with no row, as a crash would leave them
    (datasets_dir / "ds-0123456789abcdef0123.parquet").write_bytes(b"PAR1 renamed into place, row never committed")
    models_dir = settings.resolved_artifact_dir / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    (models_dir / "mdl-0123456789abcdef0123.tar.gz").write_bytes(write_model_tar(np.zeros((2, 2))))

    server, url = serve(restart_env, tmp_path / "serve3.log")
    try:
        assert [d["name"] for d in httpx.get(f"{url}/datasets").json()["items"]] == ["kept"]
        assert httpx.get(f"{url}/models").json()["total"] == 0
    finally:
        stop(server)
    assert artifact_files(settings) == [kept_file]
    assert "removed 1 orphan artifact file(s) under models" in (tmp_path / "serve3.log").read_text()


# --- worker SIGKILL mid-SageMaker-poll ------------------------------------------------------------


class PollGate:
    """Holds SageMaker's (moto's) answer to the first DescribeTrainingJob: the worker is mid-poll."""

    def __init__(self) -> None:
        self.armed = threading.Event()  # set once the job exists in SageMaker
        self.arrived = threading.Event()
        self.release = threading.Event()
        self.creates: list[str] = []


@pytest.fixture
def poll_gate(monkeypatch: pytest.MonkeyPatch, aws: FakeSageMaker) -> Iterator[PollGate]:  # noqa: F811
    gate = PollGate()
    describe = SageMakerResponse.describe_training_job
    create = SageMakerModelBackend.create_training_job

    def held_describe(self: SageMakerResponse) -> Any:
        if gate.armed.is_set() and not gate.arrived.is_set():
            gate.arrived.set()
            gate.release.wait(60)
        return describe(self)

    def create_in_progress(self: SageMakerModelBackend, training_job_name: str, **kwargs: Any) -> Any:
        gate.creates.append(training_job_name)
        job = create(self, training_job_name=training_job_name, **kwargs)
        job.training_job_status, job.secondary_status = "InProgress", "Training"  # moto starts at Completed
        gate.armed.set()
        return job

    monkeypatch.setattr(SageMakerResponse, "describe_training_job", held_describe)
    monkeypatch.setattr(SageMakerModelBackend, "create_training_job", create_in_progress)
    yield gate
    gate.release.set()


def test_worker_sigkill_mid_sagemaker_poll_then_restart_completes_exactly_once(
    settings: Settings,
    tmp_path: Path,
    moto_url: str,  # noqa: F811 - the fixture imported above
    aws: FakeSageMaker,  # noqa: F811
    poll_gate: PollGate,
) -> None:
    env = process_env(
        settings,
        CENTROID_AWS_REGION=REGION,
        CENTROID_SAGEMAKER_ROLE_ARN=ROLE,
        CENTROID_S3_BUCKET=BUCKET,
        CENTROID_S3_PREFIX="centroid-faults",
        CENTROID_AWS_ENDPOINT_URL=moto_url,
        CENTROID_REMOTE_POLL_SECONDS="0.2",
        CENTROID_LEASE_SECONDS="2",
        CENTROID_WORKER_POLL_INTERVAL="0.1",
    )
    sm_settings = settings.model_copy(
        update={"aws_region": REGION, "sagemaker_role_arn": ROLE, "s3_bucket": BUCKET, "aws_endpoint_url": moto_url}
    )
    with TestClient(create_app(sm_settings)) as client:
        dataset = upload_csv(client, "blobs", BLOBS_CSV, "id")
        body = {
            "name": "sm-crash",
            "train_dataset_id": dataset["id"],
            "backend": "sagemaker",
            "hyperparameters": {"k": 3},
        }
        assert client.post("/training-jobs", json=body).status_code == 202

        first = centroid_process(["worker"], env, tmp_path / "worker1.log")
        try:
            assert poll_gate.arrived.wait(60), (tmp_path / "worker1.log").read_text()
        finally:
            first.send_signal(signal.SIGKILL)  # while its DescribeTrainingJob is in flight
            first.wait(30)
        poll_gate.release.set()
        orphaned = client.get("/training-jobs/sm-crash").json()
        assert (orphaned["status"], orphaned["model_id"]) == ("InProgress", None)
        assert orphaned["remote"]["training_job_arn"].endswith("/sm-crash")

        # SageMaker finishes the job while no worker is alive
        aws.put_artifact("sm-crash", write_model_tar(np.array([[0.2, 0.1], [10.2, 0.1], [0.2, 10.1]])))
        aws.set_training("sm-crash", "Completed", "Completed", [("Completed", "Training job completed")])

        second = centroid_process(["worker"], env, tmp_path / "worker2.log")
        try:
            done = wait_for(
                lambda: client.get("/training-jobs/sm-crash").json(), lambda j: j["status"] == "Completed", timeout=60
            )
        finally:
            stop(second)
        assert second.returncode == 0, (tmp_path / "worker2.log").read_text()
        assert poll_gate.creates == ["sm-crash"]  # submitted to SageMaker once; the restart only polled
        assert done["attempts"] == 1 and done["model_id"]
        assert count(settings, ModelTable, ModelTable.training_job_name == "sm-crash") == 1
        centroids = client.get(f"/models/{done['model_id']}/centroids").json()["centroids"]
        np.testing.assert_allclose(centroids, [[0.2, 0.1], [10.2, 0.1], [0.2, 10.1]], rtol=1e-6)
        assert artifact_files(settings) == sorted(
            [f"datasets/{dataset['id']}.parquet", f"models/{done['model_id']}.tar.gz"]
        )


# --- the database away for a few seconds (PostgreSQL behind a TCP proxy) --------------------------


class FlakyTcpProxy:
    """127.0.0.1:<port> -> the database, with a switch.

    ``cut()``: every open connection is closed (as when the database restarts) and new ones are
    accepted but left unanswered (as when packets to the database host are dropped), so clients
    only get out through their own timeouts. ``restore()``: connections held meanwhile are
    forwarded, as delayed packets finally arrive.
    """

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self._lock = threading.Lock()
        self._cut = False
        self._closed = False
        self._open: list[socket.socket] = []
        self._held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True, name="flaky-proxy").start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                if self._cut:
                    self._held.append(client)
                    continue
            self._forward(client)

    def _forward(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        with self._lock:
            self._open += [client, upstream]
        for source, sink in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                _close(sock)

    def cut(self) -> None:
        with self._lock:
            self._cut = True
            doomed, self._open = self._open, []
        for sock in doomed:
            _close(sock)

    def restore(self) -> None:
        with self._lock:
            self._cut = False
            held, self._held = self._held, []
        for client in held:
            self._forward(client)

    def close(self) -> None:
        self.listener.close()
        self.cut()
        with self._lock:
            held, self._held = self._held, []
        for sock in held:
            _close(sock)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    if not PG_ADMIN_URL:
        pytest.skip("needs PostgreSQL: set CENTROID_TEST_DATABASE_URL (CI does); the outage is a cut TCP proxy to it")
    yield from _fresh_postgres_database()


def _timed(call: Callable[[], httpx.Response]) -> tuple[httpx.Response | Exception, float]:
    started = time.monotonic()
    try:
        response: httpx.Response | Exception = call()
    except httpx.HTTPError as exc:
        response = exc
    return response, time.monotonic() - started


def test_database_away_for_seconds_gives_503_then_everything_resumes(postgres_url: str, tmp_path: Path) -> None:
    target = make_url(postgres_url)
    proxy = FlakyTcpProxy(target.host or "127.0.0.1", target.port or 5432)
    proxied = target.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    settings = Settings(data_dir=tmp_path / "data", database_url=proxied)
    env = process_env(settings, CENTROID_LEASE_SECONDS="3", CENTROID_WORKER_POLL_INTERVAL="0.1")
    worker_log = tmp_path / "worker.log"
    server, url = serve(env, tmp_path / "serve.log", "--no-worker")
    worker = centroid_process(["worker"], {**env, "CENTROID_LOG_LEVEL": "INFO"}, worker_log)
    api = httpx.Client(base_url=url, timeout=60)
    try:
        before = api.post(
            "/datasets", files={"file": ("b.csv", BLOBS_CSV, "text/csv")}, data={"name": "before", "key_column": "id"}
        )
        slow = api.post(
            "/datasets", files={"file": ("s.csv", slow_csv(400), "text/csv")}, data={"name": "slow", "key_column": "id"}
        )
        assert before.status_code == slow.status_code == 201
        jobs = {
            "long": {
                "train_dataset_id": slow.json()["id"],
                "hyperparameters": {"k": 4, "mini_batch_size": 20, "epochs": 400, "seed": 2},
            },
            "queued": {"train_dataset_id": before.json()["id"], "hyperparameters": {"k": 3, "seed": 1}},
        }
        for name, body in jobs.items():
            assert api.post("/training-jobs", json={"name": name, **body}).status_code == 202
        wait_for(
            lambda: api.get("/training-jobs/long").json(),
            lambda j: j["status"] == "InProgress",
            timeout=60,
            interval=0.01,
        )

        proxy.cut()
        cut_at = time.monotonic()
        probes = {
            "list": lambda: api.get("/datasets"),
            "describe": lambda: api.get("/training-jobs/long"),
            "upload": lambda: api.post(
                "/datasets",
                files={"file": ("d.csv", BLOBS_CSV, "text/csv")},
                data={"name": "during", "key_column": "id"},
            ),
            "submit": lambda: api.post("/training-jobs", json={"name": "during", **jobs["queued"]}),
            "readyz": lambda: api.get("/readyz"),
        }
        results: dict[str, tuple[httpx.Response | Exception, float]] = {}
        threads = [
            threading.Thread(target=lambda n=n, p=p: results.__setitem__(n, _timed(p))) for n, p in probes.items()
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert set(results) == set(probes), f"requests still hanging after 60 s: {sorted(set(probes) - set(results))}"
        for name, (response, elapsed) in results.items():
            assert isinstance(response, httpx.Response), f"{name}: {response!r}"
            assert elapsed < BOUND_SECONDS, f"{name} took {elapsed:.1f} s"
            if name == "readyz":
                assert response.status_code == 503
                assert response.json()["checks"]["database"].startswith("unavailable"), response.json()
            else:
                assert_error(response, 503, "service_unavailable", "database is unavailable")
        # keep the database away until the worker met it too (the training ended and its write
        # failed), then bring it back at once: the worker's next write must not fail the job
        wait_for(
            worker_log.read_text,
            # the jobs loop's own failure: the endpoint loop meets the outage too, but that says
            # nothing about the training's result write
            lambda text: "(jobs loop)" in text or "training job long raised" in text,
            timeout=60,
            interval=0.05,
        )
        proxy.restore()
        outage = time.monotonic() - cut_at

        ready = wait_for(lambda: api.get("/readyz"), lambda r: r.status_code == 200, timeout=BOUND_SECONDS)
        assert ready.json()["checks"]["database"] == "ok"
        for name in jobs:
            done = wait_for(
                lambda n=name: api.get(f"/training-jobs/{n}").json(),
                lambda j: j["status"] in ("Completed", "Failed"),
                timeout=120,
            )
            assert done["status"] == "Completed", done
            # "long" finished training while the database was away; its result could not be
            # written, so it ran again once its lease ran out: completed, exactly once
            assert done["attempts"] == (2 if name == "long" else 1), done
            assert len([m for m in api.get("/models").json()["items"] if m["training_job_name"] == name]) == 1
        assert api.get("/training-jobs/during").status_code == 404  # refused during the outage: never half-created
        listing = api.get("/datasets").json()
        assert sorted(d["name"] for d in listing["items"]) == ["before", "slow"]
        assert api.get(f"/datasets/{before.json()['id']}/rows").json()["total"] == 60
        assert worker.poll() is None, worker_log.read_text()
    finally:
        api.close()
        stop(worker)
        stop(server)
        proxy.close()
    log = worker_log.read_text()
    assert "database unavailable, retrying in" in log  # it backed off, and came back by itself
    assert sorted(artifact_files(settings)) == sorted(
        [f"datasets/{before.json()['id']}.parquet", f"datasets/{slow.json()['id']}.parquet"]
        + [f"models/{m}.tar.gz" for m in _model_ids(postgres_url)]
    )
    print(f"outage lasted {outage:.1f} s; during it: " + ", ".join(f"{n} {e:.1f} s" for n, (_, e) in results.items()))


def _model_ids(url: str) -> list[str]:
    from sqlalchemy import create_engine

    engine = create_engine(url)
    try:
        with Session(engine) as session:
            return list(session.scalars(select(ModelTable.id)).all())
    finally:
        engine.dispose()


def test_connection_lost_after_the_handler_still_delivers_the_response(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database goes away between a handler's last query and the end of the request (found by
    the outage test above: the client's connection was reset instead of getting its answer)."""
    dataset = upload_csv(client, "blobs", BLOBS_CSV, "id")
    rollback = Session.rollback

    def dead_connection_rollback(self: Session) -> None:
        rollback(self)
        raise OperationalError("ROLLBACK", {}, Exception("server closed the connection unexpectedly"))

    monkeypatch.setattr(Session, "rollback", dead_connection_rollback)
    assert client.get(f"/datasets/{dataset['id']}").json()["row_count"] == 60
    assert client.get("/datasets").json()["total"] == 1
    assert client.get(f"/datasets/{dataset['id']}/csv").text.count("\n") == 61


def test_commit_failing_after_the_file_is_in_place_leaves_neither(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database fails exactly between publishing a file and committing its row (a crash of
    the database at the worst moment): 503, no row, and the published file is removed again."""
    dataset = upload_csv(client, "blobs", BLOBS_CSV, "id")
    before = artifact_files(settings)
    faults = {"left": 0, "armed": False}  # commits to fail, each right after a publish
    publish = StagedFile.publish
    commit = Session.commit

    def publish_then_arm(self: StagedFile) -> None:
        publish(self)
        faults["armed"] = faults["left"] > 0

    def failing_commit(self: Session) -> None:
        if faults["armed"]:
            faults["armed"] = False
            faults["left"] -= 1
            raise OperationalError("COMMIT", {}, Exception("server closed the connection unexpectedly"))
        commit(self)

    monkeypatch.setattr(StagedFile, "publish", publish_then_arm)
    monkeypatch.setattr(Session, "commit", failing_commit)
    calls = {
        "upload": lambda: client.post("/datasets", files={"file": ("x.csv", BLOBS_CSV)}, data={"name": "x"}),
        "derive": lambda: client.post(
            f"/datasets/{dataset['id']}/derive", json={"name": "d", "steps": [{"op": "drop", "columns": ["label"]}]}
        ),
        "import": lambda: client.post(
            "/models/import",
            files={"file": ("m.tar.gz", MODEL_TAR.read_bytes())},
            data={"name": "m", "feature_names": "x,y"},
        ),
    }
    for name, call in calls.items():
        faults["left"] = 1
        response = call()
        assert faults["left"] == 0, name
        assert_error(response, 503, "service_unavailable", "database is unavailable")
        assert artifact_files(settings) == before, name
    assert client.get("/datasets").json()["total"] == 1
    assert client.get("/models").json()["total"] == 0

    # the worker: the model file is published, then the commit fails -> no model, no file, and
    # the job is not failed by the database's hiccup: it runs again and completes exactly once
    assert (
        client.post(
            "/training-jobs",
            json={"name": "j", "train_dataset_id": dataset["id"], "hyperparameters": {"k": 3, "seed": 1}},
        ).status_code
        == 202
    )
    state = client.app.state.centroid  # type: ignore[attr-defined]
    state.settings = state.settings.model_copy(update={"lease_seconds": 0.3})
    worker = Worker(state, worker_id="w1")
    faults["left"] = 1
    with pytest.raises(OperationalError):
        worker.run_once()  # raised to `Worker.run`, which backs off
    assert faults["left"] == 0
    assert artifact_files(settings) == before
    assert client.get("/models").json()["total"] == 0
    assert client.get("/training-jobs/j").json()["status"] == "InProgress"
    time.sleep(0.4)  # the lease runs out
    run_worker_until_idle(client.app)
    job = client.get("/training-jobs/j").json()
    assert (job["status"], job["attempts"]) == ("Completed", 2)
    assert client.get("/models").json()["total"] == 1
    assert artifact_files(settings) == sorted([*before, f"models/{job['model_id']}.tar.gz"])


# --- disk full in the artifact directory ----------------------------------------------------------


def _full_disk(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Every write into the artifact directory (pandas' and pyarrow's Parquet writers, an upload's
    spool file, plain files) writes part of its bytes, then fails with ENOSPC."""
    to_parquet = pd.DataFrame.to_parquet
    write_bytes = Path.write_bytes

    def enospc(path: Any) -> OSError:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    def partial_parquet(self: pd.DataFrame, path: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(path).resolve().is_relative_to(root):
            to_parquet(self.head(max(len(self) // 2, 1)), path, *args, **kwargs)
            raise enospc(path)
        return to_parquet(self, path, *args, **kwargs)

    def partial_bytes(self: Path, data: bytes) -> int:
        if self.resolve().is_relative_to(root):
            write_bytes(self, data[: len(data) // 2])
            raise enospc(self)
        return write_bytes(self, data)

    write_table = pq.ParquetWriter.write_table
    spool_init = CsvSpool.__init__

    def partial_table(self: pq.ParquetWriter, table: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(str(self.where)).resolve().is_relative_to(root):
            write_table(self, table.slice(0, max(table.num_rows // 2, 1)), *args, **kwargs)
            raise enospc(self.where)
        return write_table(self, table, *args, **kwargs)

    class FullFile:
        """A file on a full disk: half of each write lands, then ENOSPC."""

        def __init__(self, real: Any) -> None:
            self.real = real

        def write(self, data: bytes) -> int:
            self.real.write(data[: len(data) // 2])
            raise enospc(self.real.name)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.real, name)

    def full_spool(self: CsvSpool, path: Path) -> None:
        spool_init(self, path)
        if path.resolve().is_relative_to(root):
            self._file = FullFile(self._file)  # type: ignore[assignment]

    monkeypatch.setattr(pd.DataFrame, "to_parquet", partial_parquet)
    monkeypatch.setattr(Path, "write_bytes", partial_bytes)
    monkeypatch.setattr(pq.ParquetWriter, "write_table", partial_table)
    monkeypatch.setattr(CsvSpool, "__init__", full_spool)


def _assert_disk_full_refusals(client: TestClient, settings: Settings, dataset_id: str) -> list[str]:
    """Upload (CSV and JSON), derive and import all get 507; no row, no file; returns files before."""
    before = artifact_files(settings)
    datasets, models = client.get("/datasets").json()["total"], client.get("/models").json()["total"]
    calls = {
        "upload": lambda: client.post(
            "/datasets", files={"file": ("x.csv", BLOBS_CSV)}, data={"name": "x", "key_column": "id"}
        ),
        "json": lambda: client.post("/datasets", json={"name": "j", "columns": ["a"], "rows": [[1.0], [2.0]]}),
        "derive": lambda: client.post(
            f"/datasets/{dataset_id}/derive", json={"name": "d", "steps": [{"op": "drop", "columns": ["label"]}]}
        ),
        "import": lambda: client.post(
            "/models/import",
            files={"file": ("m.tar.gz", MODEL_TAR.read_bytes())},
            data={"name": "m", "feature_names": "x,y"},
        ),
    }
    for name, call in calls.items():
        error = assert_error(call(), 507, "insufficient_storage", "no space left in the artifact store")
        assert error["request_id"], name
        assert artifact_files(settings) == before, name
    assert client.get("/datasets").json()["total"] == datasets
    assert client.get("/models").json()["total"] == models
    return before


def _assert_training_fails_cleanly(client: TestClient, settings: Settings, dataset_id: str, name: str) -> None:
    before = artifact_files(settings)
    body = {"name": name, "train_dataset_id": dataset_id, "hyperparameters": {"k": 3, "seed": 1}}
    assert client.post("/training-jobs", json=body).status_code == 202
    run_worker_until_idle(client.app)
    job = client.get(f"/training-jobs/{name}").json()
    assert job["status"] == "Failed" and job["model_id"] is None, job
    assert "no space left in the artifact store" in job["failure_reason"]
    assert "internal error" not in job["failure_reason"]
    assert count(settings, ModelTable, ModelTable.training_job_name == name) == 0
    assert artifact_files(settings) == before


def test_disk_full_gives_507_and_commits_nothing(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset = upload_csv(client, "blobs", BLOBS_CSV, "id")
    _full_disk(monkeypatch, settings.resolved_artifact_dir)
    _assert_disk_full_refusals(client, settings, dataset["id"])
    _assert_training_fails_cleanly(client, settings, dataset["id"], "no-room")
    assert count(settings, TrainingJobTable, TrainingJobTable.status == "Failed") == 1
    monkeypatch.undo()  # space freed: the same requests work again
    assert upload_csv(client, "x", BLOBS_CSV, "id")["row_count"] == 60


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB tmpfs (needs the right to mount: root in a container, say); skipped otherwise."""
    mount_point = tmp_path / "tiny-artifacts"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "centroid-test", str(mount_point)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({result.stderr.strip() or result.returncode});"
            " test_disk_full_gives_507_and_commits_nothing covers it with a failing writer"
        )
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_really_full_tmpfs_gives_507_and_commits_nothing(settings: Settings, tiny_tmpfs: Path) -> None:
    settings = settings.model_copy(update={"artifact_dir": tiny_tmpfs})
    with TestClient(create_app(settings)) as client:
        dataset = upload_csv(client, "blobs", BLOBS_CSV, "id")
        values = np.random.default_rng(0).normal(size=(100_000, 2))  # ~1.6 MB of Parquet: never fits
        big = ("id,a,b\n" + "".join(f"r{i},{a},{b}\n" for i, (a, b) in enumerate(values))).encode()
        response = client.post("/datasets", files={"file": ("big.csv", big)}, data={"name": "big", "key_column": "id"})
        assert_error(response, 507, "insufficient_storage", "no space left")
        assert artifact_files(settings) == [f"datasets/{dataset['id']}.parquet"]

        filler = tiny_tmpfs / "filler"  # fill what is left, to the last byte
        with open(filler, "wb", buffering=0) as handle:
            try:
                while handle.write(b"\0" * 4096):
                    pass
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
        _assert_disk_full_refusals(client, settings, dataset["id"])
        _assert_training_fails_cleanly(client, settings, dataset["id"], "no-room")
        assert client.get("/readyz").status_code == 503  # the store cannot take a write: not ready

        filler.unlink()
        assert client.get("/readyz").status_code == 200
        assert upload_csv(client, "again", BLOBS_CSV, "id")["row_count"] == 60
