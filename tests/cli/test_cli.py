"""The ``centroid`` command's client side: the workshop in one command, and the subcommands scripts
use (upload, train, deploy, predict, assignments), against a real server on 127.0.0.1.

The server is the app in a uvicorn thread (``LiveServer``) with its embedded worker, on the test's
database; the CLI's ``main([...])`` runs in-process (stdout and stderr captured). ``centroid
workshop`` without ``--url`` runs once as a real subprocess: it starts and stops a server of its own.
"""

from __future__ import annotations

import ast
import csv
import json
import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.auth import generate_key, hash_key
from service.cli import main
from service.client.http import ApiError, CentroidClient, ClientError, parse_event_stream, resolve_target
from service.main import create_app
from service.settings import ApiKeyEntry, Settings
from tests.helpers import LiveServer, free_port

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "service" / "sample_data"
CRIMES = SAMPLES / "crimes.csv"
STATES = {row["State"] for row in csv.DictReader(CRIMES.open())}
PLOT_KINDS = ("sizes", "centroids", "projection", "states")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ADMIN = generate_key()


@pytest.fixture(autouse=True)
def _no_client_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests choose the URL and key themselves."""
    monkeypatch.delenv("CENTROID_URL", raising=False)
    monkeypatch.delenv("CENTROID_API_KEY", raising=False)


def _live(settings: Settings, **update: Any) -> LiveServer:
    quick = {"embedded_worker": True, "event_poll_seconds": 0.05, **update}
    return LiveServer(create_app(settings.model_copy(update=quick)))


@pytest.fixture
def server(settings: Settings) -> Iterator[LiveServer]:
    with _live(settings) as live:
        yield live


@pytest.fixture
def secured(settings: Settings) -> Iterator[LiveServer]:
    with _live(settings, api_keys=[ApiKeyEntry(name="ops", scope="admin", sha256=hash_key(ADMIN))]) as live:
        yield live


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    """``centroid <argv> --json``: exit code 0 and one JSON document on stdout."""
    assert main([*argv, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def check_workshop_order(rows: list[tuple[str, int, float]], counts: dict[int, int]) -> None:
    """50 states, each once, sorted by cluster then distance; counts per cluster match and sum to 50."""
    assert len(rows) == 50 and {state for state, _, _ in rows} == STATES
    assert rows == sorted(rows, key=lambda row: (row[1], row[2]))
    assert sum(counts.values()) == 50
    assert {cluster: n for cluster, n in counts.items() if n} == dict(Counter(cluster for _, cluster, _ in rows))
    assert len(counts) == 10


# --- scripts: upload, train, deploy, predict, assignments -----------------------------------------------------


def test_a_script_uploads_trains_deploys_predicts_and_reads_assignments(
    server: LiveServer, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    url = ["--url", server.url]
    dataset = run_json(capsys, "datasets", "upload", str(CRIMES), "--key", "State", *url)
    assert (dataset["name"], dataset["key_column"], dataset["row_count"]) == ("crimes", "State", 50)

    job = run_json(capsys, "train", dataset["id"], "--k", "3", "--seed", "1", "--name", "crime-k3", "--wait", *url)
    assert job["name"] == "crime-k3" and job["status"] == "Completed" and job["model_id"]
    assert job["hyperparameters"]["k"] in (3, "3")

    endpoint = run_json(capsys, "deploy", job["model_id"], "--name", "crime", "--wait", *url)
    assert (endpoint["name"], endpoint["status"], endpoint["model_id"]) == ("crime", "InService", job["model_id"])

    # A CSV with a header (and the key column): rows keyed by column, through /predictions.
    answer = run_json(capsys, "predict", "crime", str(CRIMES), "--sort", "cluster,distance", *url)
    rows = [(p["key"], p["closest_cluster"], p["distance_to_cluster"]) for p in answer["predictions"]]
    assert {key for key, _, _ in rows} == STATES and rows == sorted(rows, key=lambda row: (row[1], row[2]))
    assert sum(answer["cluster_counts"].values()) == 50

    # A headerless CSV of numbers: SageMaker's contract, through /invocations.
    numbers = tmp_path / "rows.csv"
    numbers.write_text("13.2,236,58,21.2\n10.0,263,48,44.5\n")
    invocation = run_json(capsys, "predict", "crime", str(numbers), *url)
    assert [p["closest_cluster"] for p in invocation["predictions"]] == [
        float(answer_row["closest_cluster"])
        for key in ("Alabama", "Alaska")
        for answer_row in answer["predictions"]
        if answer_row["key"] == key
    ]

    assignments = run_json(capsys, "assignments", job["model_id"], *url)
    assert set(assignments["clusters"]) == STATES and sum(assignments["counts"].values()) == 50
    only = run_json(capsys, "assignments", job["model_id"], "--cluster", "0", *url)
    assert set(only["clusters"].values()) == {0}

    # The same for people: tables on stdout.
    assert main(["assignments", job["model_id"], *url]) == 0
    table = capsys.readouterr().out
    assert "State" in table and "Alabama" in table and re.search(r"total\s*│\s*50", table), table
    assert main(["predict", "crime", str(CRIMES), *url]) == 0
    assert "Wyoming" in capsys.readouterr().out


def test_train_wait_shows_a_progress_bar_then_the_final_status(
    server: LiveServer, capsys: pytest.CaptureFixture[str]
) -> None:
    dataset = run_json(capsys, "datasets", "upload", str(CRIMES), "--key", "State", "--name", "c", "--url", server.url)
    assert main(["train", dataset["id"], "--k", "4", "--name", "watched", "--wait", "--url", server.url]) == 0
    captured = capsys.readouterr()
    assert "watched: Completed; model mdl-" in captured.out
    assert "Training job watched" in captured.out
    assert "points" in captured.err and "50/50" in captured.err  # the bar, ended at every point processed


def test_the_workshop_against_a_running_server_prints_one_json_document(
    server: LiveServer, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "plots"
    document = run_json(capsys, "workshop", "--url", server.url, "--out", str(out))
    rows = [(p["key"], p["closest_cluster"], p["distance_to_cluster"]) for p in document["predictions"]]
    check_workshop_order(rows, {int(c): n for c, n in document["cluster_counts"].items()})
    assert document["url"] == server.url and set(document["datasets"]) == {
        "crimes",
        "densities",
        "densities_scaled",
        "workshop",
    }
    # On a shared server the names carry a suffix, so a second run does not collide.
    assert re.fullmatch(r"crime-k10-[0-9a-f]{6}", document["training_job"])
    assert re.fullmatch(r"crime-[0-9a-f]{6}", document["endpoint"])
    for kind in PLOT_KINDS:
        if kind in document["plots"]:
            assert Path(document["plots"][kind]) == out / f"{kind}.png"
            assert (out / f"{kind}.png").read_bytes().startswith(PNG_SIGNATURE)
        else:  # the plot routes are not there yet: a note, not a failure
            assert any(f"no {kind} plot" in note for note in document["notes"]), document["notes"]
    assert document["seconds"]["total"] > 0
    again = run_json(capsys, "workshop", "--url", server.url, "--out", str(out))
    assert again["training_job"] != document["training_job"]


@pytest.mark.slow
def test_the_workshop_starts_its_own_server_when_no_url_is_given(tmp_path: Path) -> None:
    """The real command, in a subprocess: its own `centroid serve` (SQLite in a temporary
    directory), the table of states by cluster and distance, the counts, the plots; then the server
    is stopped and its directory removed."""
    env = {name: value for name, value in os.environ.items() if name not in ("CENTROID_URL", "CENTROID_API_KEY")}
    env["COLUMNS"] = "100"
    out = tmp_path / "plots"
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "workshop", "--out", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    states_part, counts_part = done.stdout.split("States per cluster", 1)
    rows = [(cells[0], int(cells[1]), float(cells[2])) for cells in _table_rows(states_part)]
    counts = {int(cells[0]): int(cells[1]) for cells in _table_rows(counts_part) if cells[0].isdigit()}
    check_workshop_order(rows, counts)
    assert ["total", "50"] in _table_rows(counts_part)
    assert re.search(r"workshop done in \d+\.\d\d s on its own server", done.stdout)

    started = re.search(r"started centroid serve at (http://127\.0\.0\.1:\d+) \(in (\S+)\)", done.stderr)
    assert started, done.stderr
    assert not Path(started.group(2)).exists(), "the server's temporary directory is removed"
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{started.group(1)}/healthz", timeout=2)  # and the server is stopped
    for kind in PLOT_KINDS:
        png = out / f"{kind}.png"
        assert (png.exists() and png.read_bytes().startswith(PNG_SIGNATURE)) or f"no {kind} plot" in done.stderr


def _table_rows(text: str) -> list[list[str]]:
    """The body rows of a rich table (lines between │ bars)."""
    return [[cell.strip() for cell in line.strip().strip("│").split("│")] for line in text.splitlines() if "│" in line]


# --- failures: exit codes and messages ---------------------------------------------------------------------


def test_an_unknown_dataset_is_exit_code_1_with_the_services_message(
    server: LiveServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", "ds-nope", "--k", "3", "--url", server.url]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "dataset 'ds-nope' not found" in captured.err and "HTTP 404 not_found" in captured.err, captured.err
    assert main(["assignments", "mdl-nope", "--url", server.url, "--json"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "mdl-nope" in captured.err


def test_an_unreachable_url_is_exit_code_1_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["assignments", "mdl-x", "--url", url]) == 1
    assert f"could not reach Centroid at {url}: connection refused" in capsys.readouterr().err
    assert main(["workshop", "--url", url, "--json"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and f"could not reach Centroid at {url}" in captured.err


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "ds-x"],  # no --k
        ["train", "ds-x", "--k", "0"],
        ["deploy", "mdl-x"],  # no --name
        ["datasets"],  # no action
        ["frobnicate"],
    ],
)
def test_bad_usage_is_exit_code_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert "usage: centroid" in capsys.readouterr().err


def test_usage_errors_found_after_parsing_are_exit_code_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["predict", "ep", str(tmp_path / "missing.csv"), "--url", url]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["datasets", "upload", str(tmp_path), "--url", url]) == 2
    assert main(["assignments", "mdl-x", "--url", "ftp://example.com"]) == 2
    assert "not an http:// or https:// URL" in capsys.readouterr().err
    monkeypatch.setenv("CENTROID_URL", "127.0.0.1:8000")
    assert main(["assignments", "mdl-x"]) == 2
    empty = tmp_path / "empty.csv"
    empty.write_text("\n")
    assert main(["predict", "ep", str(empty), "--url", url]) == 2
    assert "no rows" in capsys.readouterr().err


def test_the_url_and_api_key_come_from_the_environment(
    secured: LiveServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CENTROID_URL", secured.url)
    assert main(["datasets", "upload", str(CRIMES), "--key", "State"]) == 1
    assert "missing API key" in capsys.readouterr().err

    monkeypatch.setenv("CENTROID_API_KEY", ADMIN)
    dataset = run_json(capsys, "datasets", "upload", str(CRIMES), "--key", "State")
    assert dataset["row_count"] == 50

    assert main(["datasets", "upload", str(CRIMES), "--api-key", "cnt_wrong"]) == 1  # the flag wins
    assert "invalid API key (HTTP 401 unauthorized)" in capsys.readouterr().err


def test_the_server_commands_still_work(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "create", "--name", "ci", "--scope", "read"]) == 0
    assert '"scope": "read"' in capsys.readouterr().out


# --- the client: events, polling, targets ----------------------------------------------------------------


def _job(status: str, done: int = 0) -> dict[str, Any]:
    return {"name": "j", "status": status, "progress": {"points_processed": done, "points_total": 10}}


def _client(handler: Callable[[httpx.Request], httpx.Response]) -> CentroidClient:
    return CentroidClient("http://centroid.test", transport=httpx.MockTransport(handler))


def _stream(text: str) -> httpx.Response:
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=text.encode())


def test_waiting_follows_the_event_stream() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        assert request.headers["accept"] == "text/event-stream"
        first = json.dumps(_job("InProgress", 5))
        last = json.dumps(_job("Completed", 10))
        half = last.index('"status"')
        return _stream(
            ": keep-alive\r\n\r\n"
            f"event: progress\r\ndata: {first}\r\n\r\n"
            ": keep-alive\n\n"
            f"event: end\ndata: {last[:half]}\ndata: {last[half:]}\n\n"  # data over two lines
        )

    updates: list[tuple[str, int]] = []

    def record(job: dict[str, Any]) -> None:
        updates.append((job["status"], job["progress"]["points_processed"]))

    with _client(handler) as client:
        job = client.wait_for_training_job("j", record)
    assert job["status"] == "Completed"
    assert updates == [("InProgress", 5), ("Completed", 10)]
    assert seen == ["/training-jobs/j/events"]  # no polling


def test_waiting_reconnects_after_the_servers_stream_timeout() -> None:
    streams = iter(
        [
            f"event: timeout\ndata: {json.dumps(_job('InProgress', 3))}\n\n",
            "event: end\ndata: " + json.dumps(_job("Completed", 10)) + "\n\n",
        ]
    )

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/training-jobs/j/events"
        return _stream(next(streams))

    with _client(handler) as client:
        assert client.wait_for_training_job("j")["status"] == "Completed"


def test_waiting_polls_when_the_server_has_no_event_route() -> None:
    states = iter([_job("Pending"), _job("InProgress", 4), _job("Completed", 10)])
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if request.url.path.endswith("/events"):  # FastAPI's bare 404: no such route
            return httpx.Response(404, json={"error": {"code": "not_found", "message": "Not Found", "details": None}})
        return httpx.Response(200, json=next(states))

    with _client(handler) as client:
        assert client.wait_for_training_job("j", poll_seconds=0)["status"] == "Completed"
    assert seen == ["/training-jobs/j/events"] + ["/training-jobs/j"] * 3


def test_a_missing_job_is_an_error_not_a_missing_route() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = {"error": {"code": "not_found", "message": "training job 'j' not found", "details": {"name": "j"}}}
        return httpx.Response(404, json=body)

    with _client(handler) as client, pytest.raises(ApiError) as error:
        client.wait_for_training_job("j")
    assert not error.value.route_missing and error.value.message == "training job 'j' not found"


def test_error_bodies_in_other_shapes_still_give_the_status() -> None:
    bad_gateway = _client(lambda request: httpx.Response(502, text="<html>Bad Gateway</html>"))
    with bad_gateway as client, pytest.raises(ApiError) as error:
        client.model("m")
    assert error.value.status == 502 and "Bad Gateway" in str(error.value)
    assert isinstance(error.value, ClientError)


def test_event_stream_parsing_follows_the_sse_rules() -> None:
    lines = ["event: a", "data:x", "id: 1", "", "data: no event name", "", "event: empty", "", ": c", "data: cut"]
    events = list(parse_event_stream(lines))
    assert [(e.event, e.data, e.id) for e in events] == [("a", "x", "1"), ("message", "no event name", "1")]


def test_targets_come_from_flags_then_the_environment() -> None:
    env = {"CENTROID_URL": "https://centroid.example.com/", "CENTROID_API_KEY": "cnt_env"}
    assert resolve_target(None, None, env) == resolve_target(None, None, env)
    assert resolve_target(None, None, env).url == "https://centroid.example.com"
    assert resolve_target(None, None, env).api_key == "cnt_env"
    assert resolve_target("http://127.0.0.1:1", "cnt_flag", env).api_key == "cnt_flag"
    assert resolve_target(None, None, {}).url == "http://127.0.0.1:8000"
    assert resolve_target(None, None, {}).api_key is None
    with pytest.raises(ValueError):
        resolve_target("127.0.0.1:8000", None, {})


# --- layering: the client is an HTTP client, and `centroid --help` stays light ------------------------------


def test_the_client_imports_nothing_of_the_server_but_the_sample_data() -> None:
    """Every import in service/client (function-level ones included)."""
    allowed = ("service.client", "service.sample_data")
    for path in sorted((ROOT / "service" / "client").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            for name in names:
                if name == "service" or name.startswith("service."):
                    assert name.startswith(allowed), f"{path.name} imports {name}"
                assert name.split(".")[0] not in ("fastapi", "starlette", "sqlalchemy", "uvicorn", "workers", "schemas")


def test_the_command_line_loads_no_server_and_no_client_until_a_command_runs() -> None:
    script = (
        "import sys\n"
        "from service.cli import build_parser\n"
        "build_parser()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'fastapi', 'sqlalchemy', 'pandas', 'numpy', 'httpx', 'rich', 'uvicorn'} or m.startswith('service.client')))\n"
        "import service.client.http, service.client.output, service.client.workshop\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in {'fastapi', 'sqlalchemy', 'pandas', 'uvicorn'}"
        " or (m.startswith('service.') and not m.startswith(('service.cli', 'service.client')))))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[]", "[]"]
