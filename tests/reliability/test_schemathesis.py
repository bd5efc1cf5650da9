"""Fuzz every operation of the live API from its own OpenAPI schema with schemathesis.

How: the app is seeded through its API (workshop datasets, a model trained by the in-process worker,
the InService endpoint ``ep``, an imported SageMaker model, victims for the DELETEs), served by a
real uvicorn on 127.0.0.1 (``tests.helpers.LiveServer``), and schemathesis's own CLI (``st run``, in
a subprocess) loads ``/openapi.json`` from it and runs all its phases -- schema examples, coverage
(boundary values, missing and extra fields, wrong types, unexpected methods), fuzzing in positive
and negative mode, and stateful sequences over the schema's OpenAPI links (``service.openapi.LINKS``:
upload → derive → train → model → deploy → predict) and those it infers -- on every operation, with
every check (``--checks all``: also positive data accepted, negative data rejected, ``Allow`` on a
405, use after free, ...). The config ``fuzz_support.schemathesis_config()`` lets the operations
listed in ``POSITIVE_REFUSALS`` refuse schema-valid requests for the rules JSON Schema cannot state.
Any failure or error fails the test, with schemathesis's report (and a curl command reproducing each
failure) in the output. This is the same command docs/reliability.md gives for the long local run,
with a smaller example count and a fixed seed.

A second run, ``test_a_fresh_server_passes_every_check_without_hooks``, is what anyone gets from
``st run URL/openapi.json --checks all`` against an empty server: no hooks, only the schema.

Reaching seeded resources: the hooks module ``tests.reliability.st_hooks`` (``SCHEMATHESIS_HOOKS``)
replaces, in about half of the generated cases, path parameters, id-valued body fields and feature
rows with seeded values; the rest stays as generated (and DELETE/PUT aimed at ``ep`` and the other
shared resources are redirected to victims). The test then reads the app's own Prometheus
counters to prove that the operations behind those ids answered 2xx, not only 404.

(Why the CLI and not ``schemathesis.pytest.from_fixture``: schemathesis 4.32's lazy fixture loader
reads ``request.node._nodeid``, which pytest 9.2 no longer has.)

CI bounds: ``CENTROID_FUZZ_EXAMPLES`` fuzzing examples per operation (default 30), fixed seed
``CENTROID_FUZZ_SEED`` (default below; printed), ``--generation-database none`` and the subprocess
runs in tmp, so nothing (no ``.hypothesis``/``.schemathesis`` directory) lands in the repository.

Databases: like every API test, it runs on SQLite, and on PostgreSQL too when
``CENTROID_TEST_DATABASE_URL`` is set (about 35-40 s each at the CI example count; the fresh run about
25 s, on SQLite only). PostgreSQL matters here: it refuses NUL characters that SQLite stores, which
schemathesis puts in path parameters.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.main import create_app
from service.settings import Settings
from tests.helpers import LiveServer, run_worker_until_idle
from tests.reliability.fuzz_support import ROOT, SEEDS_ENV, Seeds, schemathesis_config, seed

FUZZ_SEED = int(os.environ.get("CENTROID_FUZZ_SEED", "20261127"))
FUZZ_EXAMPLES = int(os.environ.get("CENTROID_FUZZ_EXAMPLES", "30"))
# The run against a fresh server meets no data to reach deep, so fewer examples tell as much.
FRESH_EXAMPLES = int(os.environ.get("CENTROID_FUZZ_FRESH_EXAMPLES", "10"))
# Operations that only answer 2xx when they hit a seeded resource (or a well-aimed body).
MUST_REACH = [
    ("GET", "/datasets/{dataset_id}"),
    ("GET", "/datasets/{dataset_id}/rows"),
    ("GET", "/datasets/{dataset_id}/csv"),
    ("POST", "/datasets/{dataset_id}/derive"),
    ("GET", "/models/{model_id}"),
    ("GET", "/models/{model_id}/centroids"),
    ("GET", "/models/{model_id}/artifact"),
    ("GET", "/models/{model_id}/assignments"),
    ("GET", "/training-jobs/{name}"),
    ("POST", "/training-jobs"),
    ("GET", "/endpoints/{name}"),
    ("POST", "/endpoints"),
    ("POST", "/endpoints/{name}/invocations"),
    ("POST", "/endpoints/{name}/predictions"),
]


@pytest.fixture
def seeds(client: TestClient) -> Seeds:
    return seed(client, run_worker=lambda: run_worker_until_idle(client.app))


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """An events stream of a job no worker runs (none runs here) would stay open for an hour:
    here it ends after a second, as `CENTROID_EVENT_STREAM_SECONDS` lets an operator decide."""
    return settings.model_copy(update={"event_stream_seconds": 1.0})


@pytest.fixture
def live(client: TestClient, seeds: Seeds) -> Iterator[LiveServer]:
    with LiveServer(client.app) as server:
        yield server


def st_run_command(schema_url: str, examples: int, fuzz_seed: int, config: Path) -> list[str]:
    return [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run", schema_url,
        "--checks", "all",
        "--mode", "all",
        "--max-examples", str(examples),
        "--seed", str(fuzz_seed),
        "--generation-database", "none",
        "--workers", "1",
        "--request-timeout", "30",
        "--no-color",
    ]  # fmt: skip


def test_schemathesis_finds_no_failure_on_any_operation(live: LiveServer, seeds: Seeds, tmp_path: Path) -> None:
    seeds_file = tmp_path / "seeds.json"
    seeds.save(seeds_file)
    hooks = {"SCHEMATHESIS_HOOKS": "tests.reliability.st_hooks", SEEDS_ENV: str(seeds_file)}
    before = _successes_by_route(live)
    result = _st_run(live, tmp_path, FUZZ_EXAMPLES, hooks)
    assert result.returncode == 0, f"schemathesis reported failures or errors:\n{result.stdout[-20000:]}"

    after = _successes_by_route(live)
    reached = {route: n - before.get(route, 0.0) for route, n in after.items() if n > before.get(route, 0.0)}
    print(
        "2xx responses during the run, by route:",
        *(f"  {m} {p}: {n:g}" for (m, p), n in sorted(reached.items())),
        sep="\n",
    )
    missing = [f"{method} {path}" for method, path in MUST_REACH if not reached.get((method, path))]
    assert not missing, f"the fuzzer never got a 2xx from {missing}; reached: {sorted(reached)}"


def test_a_fresh_server_passes_every_check_without_hooks(tmp_path: Path) -> None:
    """What anyone gets from ``st run URL/openapi.json --checks all`` (with the config of
    ``fuzz_support.schemathesis_config``): no hooks, no seeded data, only the schema and its links.

    On SQLite only: without data to aim at, the requests hardly reach the database (what PostgreSQL
    refuses, NUL characters in ids, is fuzzed on both databases by the test above), and the run
    costs as much again as the seeded one.

    Schemathesis cannot encode one request media type without a hook, SageMaker's
    ``application/jsonlines`` invocation input: that operation's JSON Lines cases are an error (not
    a failure) in its report; anything else, failure or error, fails the test."""
    fresh = Settings(
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'fresh.db'}",
        log_format="text",
        log_level="WARNING",
        embedded_worker=False,
        event_stream_seconds=1.0,
    )
    with TestClient(create_app(fresh)) as client, LiveServer(client.app) as server:
        result = _st_run(server, tmp_path, FRESH_EXAMPLES, {})
    failures = re.search(r"^Failures:$", result.stdout, re.MULTILINE)
    unserializable = set(re.findall(r"No supported serializers for media types: (\S+)", result.stdout))
    errors = re.findall(r"^  🚫 (.+): \d+$", result.stdout, re.MULTILINE)
    assert not failures and unserializable <= {"application/jsonlines"}, result.stdout[-20000:]
    assert set(errors) <= {"Serialization not possible"}, result.stdout[-20000:]
    assert result.returncode == 0 or errors, result.stdout[-20000:]


def _st_run(live: LiveServer, tmp_path: Path, examples: int, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``st run`` (a subprocess in ``tmp_path``) against ``live`` with every check and the config."""
    config = tmp_path / "schemathesis.toml"
    config.write_text(schemathesis_config())
    environment = {key: value for key, value in os.environ.items() if key not in ("SCHEMATHESIS_HOOKS", SEEDS_ENV)}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    command = st_run_command(f"{live.url}/openapi.json", examples, FUZZ_SEED, config)
    print(f"schemathesis seed {FUZZ_SEED}, {examples} fuzzing examples per operation:\n  {' '.join(command)}")
    started = time.monotonic()
    result = subprocess.run(
        command, cwd=tmp_path, env={**environment, **env}, capture_output=True, text=True, timeout=600, check=False
    )
    print(result.stdout[-12000:], result.stderr[-4000:], f"st run took {time.monotonic() - started:.1f}s", sep="\n")
    assert re.search(r"Operations:\s+(\d+) selected / \1 total", result.stdout), "not every operation was selected"
    return result


def _successes_by_route(live: LiveServer) -> dict[tuple[str, str], float]:
    """2xx responses per (method, route template), from the app's own /metrics."""
    import httpx

    text = httpx.get(f"{live.url}/metrics", timeout=30).text
    counts: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        if not line.startswith("centroid_http_requests_total{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
        if labels.get("status", "").startswith("2"):
            key = (labels["method"], labels["route"])
            counts[key] = counts.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def test_schema_declares_every_error_with_the_error_body(settings: Settings) -> None:
    """What schemathesis checks responses against: every 4xx/5xx of every operation is JSON with
    the ErrorResponse model, and 500/503 (and 422 where there is input) are declared everywhere."""
    schema = create_app(settings).openapi()
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            expected = {"500", "503"} | (
                {"422"} if operation.get("parameters") or "requestBody" in operation else set()
            )
            assert expected <= set(responses), (method, path, sorted(responses))
            for status, response in responses.items():
                if status[0] in "45" and not (path == "/readyz" and status == "503"):
                    assert response.get("content") == {
                        "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}
                    }, (method, path, status)
