"""Plots over HTTP: every kind decodes as PNG and SVG at its size and is not blank; formats by
extension or Accept (406 otherwise); ETag, 304 and the in-process cache; 404, 409 and 422; the
workshop's state map; a large dataset's projection is a bounded, stated sample."""

from __future__ import annotations

import io
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from matplotlib.image import imread

from service.main import create_app
from service.plots import router as plots_router
from service.plots import service as plots_service
from service.plots.render import FIGURE_PIXELS
from service.plots.router import choose_format
from service.plots.service import PlotService, sample_plan
from service.plots.states import STATE_NAMES, TILES, state_code
from service.sample_data import KEY_COLUMN, workshop_frame
from service.settings import Settings
from tests.helpers import (
    BLOBS_CSV,
    assert_error,
    run_worker_until_idle,
    trained_model,
    upload_csv,
    workshop_dataset,
)

MODEL_KINDS = ["sizes", "centroids", "projection", "states"]
SVG_NS = "{http://www.w3.org/2000/svg}"


# --- what a good image is -------------------------------------------------------------------------


def assert_png(body: bytes, kind: str) -> np.ndarray:
    """A PNG of the kind's size in pixels, with real content (many colours, not one flat fill)."""
    assert body[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = imread(io.BytesIO(body), format="png")
    width, height = FIGURE_PIXELS[kind]
    assert pixels.shape[:2] == (height, width), pixels.shape
    rgb = pixels[..., :3].reshape(-1, 3)
    assert len(np.unique(rgb, axis=0)) > 20
    assert float(rgb.std()) > 0.05
    return pixels


def svg_text(body: bytes, kind: str) -> str:
    """An SVG document whose root is <svg>, sized as the kind's PNG; its text, joined."""
    root = ET.fromstring(body)
    assert root.tag == f"{SVG_NS}svg"
    width, height = FIGURE_PIXELS[kind]
    box = [float(v) for v in root.attrib["viewBox"].split()]
    assert box[2:] == pytest.approx([width * 72 / 100, height * 72 / 100])  # points, at 100 px per inch
    texts = [text for element in root.iter(f"{SVG_NS}text") for text in element.itertext()]
    assert len(list(root.iter())) > 50  # drawn, not empty
    return " ".join(texts)


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture
def workshop(client: TestClient, sample_csv: dict[str, bytes]) -> dict[str, Any]:
    """The workshop's model: k = 10 on the 50 states (density scaled to [-1, 1])."""
    dataset = workshop_dataset(client, sample_csv["crimes"], sample_csv["densities"])
    return trained_model(client, dataset["id"], hyperparameters={"k": 10, "seed": 1})


@pytest.fixture
def blobs_model(client: TestClient) -> dict[str, Any]:
    blobs = upload_csv(client, "blobs", BLOBS_CSV, "id")
    return trained_model(client, blobs["id"], name="blobs-job")


@pytest.fixture
def renders(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every drawing the routes make: (kind, format)."""
    calls: list[tuple[str, str]] = []
    original = plots_router.render

    def counted(plot: Any, fmt: Any) -> bytes:
        calls.append((type(plot).__name__, fmt))
        return original(plot, fmt)

    monkeypatch.setattr(plots_router, "render", counted)
    return calls


def plot(client: TestClient, model_id: str, kind: str, **headers: str) -> Any:
    return client.get(f"/models/{model_id}/plots/{kind}", headers=headers)


# --- the workshop ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_every_model_plot_of_the_workshop_decodes_at_its_size(
    client: TestClient, workshop: dict[str, Any], kind: str
) -> None:
    png = plot(client, workshop["id"], kind)
    assert png.status_code == 200, png.text
    assert png.headers["content-type"] == "image/png"
    assert_png(png.content, kind)
    svg = plot(client, workshop["id"], f"{kind}.svg")
    assert svg.status_code == 200, svg.text
    assert svg.headers["content-type"].startswith("image/svg+xml")
    text = svg_text(svg.content, kind)
    assert "model job (k = 10)" in text, text  # the title names the model
    if kind == "centroids":
        assert "in original units" in text and "DensityPerMile" in text and "cluster" in text
        # density is back in people per square mile (it was trained scaled to [-1, 1])
        high = re.search(r"DensityPerMile +\[[\d.]+ … ([\d.]+)\]", text)
        assert high is not None and float(high.group(1)) > 100, text
    if kind == "projection":
        assert "all 50 rows" in text and "principal component" in text and "centroid" in text


def test_the_workshop_states_map(client: TestClient, workshop: dict[str, Any]) -> None:
    """Each of the 50 states is a tile labelled with its code and coloured by its cluster."""
    assignments = client.get(f"/models/{workshop['id']}/assignments").json()["clusters"]
    assert len(assignments) == 50 and set(workshop_frame().index) == set(assignments)
    text = svg_text(plot(client, workshop["id"], "states.svg").content, "states")
    codes = set(re.findall(r"\b[A-Z]{2}\b", text))
    assert {code for code in STATE_NAMES if code != "DC"} <= codes
    assert "50 of the 50 states" in text and "DC" not in codes  # the District is not in the data
    counts: dict[int, int] = {}
    for cluster in assignments.values():
        counts[cluster] = counts.get(cluster, 0) + 1
    for cluster, count in counts.items():  # the legend counts the states of each cluster
        assert f"cluster {cluster}: {count} state" in text


def test_repeats_are_cached_and_revalidated(
    client: TestClient, workshop: dict[str, Any], renders: list[tuple[str, str]]
) -> None:
    first = plot(client, workshop["id"], "sizes")
    assert first.status_code == 200
    etag = first.headers["etag"]
    assert first.headers["cache-control"] == "private, max-age=86400, immutable"
    assert "accept" in first.headers["vary"].lower()
    again = plot(client, workshop["id"], "sizes.png")  # same plot, same format: same bytes, no drawing
    assert again.content == first.content and again.headers["etag"] == etag
    assert renders == [("SizesPlot", "png")]
    not_modified = plot(client, workshop["id"], "sizes", **{"If-None-Match": f'W/"x", {etag}'})
    assert not_modified.status_code == 304 and not_modified.content == b""
    assert not_modified.headers["etag"] == etag and "cache-control" in not_modified.headers
    svg = plot(client, workshop["id"], "sizes", accept="image/svg+xml")
    assert svg.status_code == 200 and svg.headers["etag"] != etag  # another representation
    assert plot(client, workshop["id"], "sizes", **{"If-None-Match": "*"}).status_code == 304
    assert len(renders) == 2


def test_formats_by_extension_or_accept(client: TestClient, blobs_model: dict[str, Any]) -> None:
    model = blobs_model["id"]
    for accept, expected in [
        ("", "image/png"),
        ("*/*", "image/png"),
        ("image/*", "image/png"),
        ("image/svg+xml", "image/svg+xml"),
        ("image/png;q=0.5, image/svg+xml", "image/svg+xml"),
        ("image/*;q=0.3, image/png;q=0", "image/svg+xml"),
        ("text/html,application/xhtml+xml,*/*;q=0.8", "image/png"),  # a browser
    ]:
        response = plot(client, model, "sizes", accept=accept)
        assert response.status_code == 200, (accept, response.text)
        assert response.headers["content-type"].startswith(expected), accept
    assert plot(client, model, "sizes.svg", accept="*/*").headers["content-type"].startswith("image/svg+xml")
    assert plot(client, model, "sizes.png", accept="image/*").headers["content-type"] == "image/png"
    for kind, accept in [
        ("sizes", "application/json"),
        ("sizes", "image/png;q=0, image/svg+xml;q=0"),
        ("sizes", "image/jpeg"),
        ("sizes.svg", "image/png"),  # the extension's format is not acceptable
        ("centroids.png", "text/csv"),
    ]:
        error = assert_error(plot(client, model, kind, accept=accept), 406, "not_acceptable", "cannot respond")
        assert error["details"]["acceptable"]


def test_unknown_model_sweep_or_kind(client: TestClient, blobs_model: dict[str, Any]) -> None:
    assert_error(plot(client, "mdl-nope", "sizes"), 404, "not_found", "mdl-nope")
    assert_error(client.get("/sweeps/nope/plots/elbow"), 404, "not_found", "nope")
    assert_error(plot(client, blobs_model["id"], "pie"), 422, "validation_error")
    assert_error(plot(client, blobs_model["id"], "sizes.jpg"), 422, "validation_error")
    assert_error(client.get("/sweeps/x/plots/sizes"), 422, "validation_error")
    # a deleted model's plots are gone at once, though they were cached
    assert plot(client, blobs_model["id"], "sizes").status_code == 200
    assert client.delete(f"/models/{blobs_model['id']}").status_code == 204
    assert_error(plot(client, blobs_model["id"], "sizes"), 404, "not_found")


def test_states_need_state_keys(client: TestClient, blobs_model: dict[str, Any]) -> None:
    """409 (not 400: the request is valid, the model's data is not states) naming the reason."""
    error = assert_error(plot(client, blobs_model["id"], "states"), 409, "conflict", "a state map needs")
    assert error["details"]["reason"] == "keys_not_states"
    few = upload_csv(client, "few", b"id,x\nAlabama,1\nTexas,2\nAtlantis,3\nOhio,4\nGotham,9\n", "id")
    model = trained_model(client, few["id"], name="few-job", hyperparameters={"k": 2, "seed": 1})
    error = assert_error(plot(client, model["id"], "states.svg"), 409, "conflict", "not US state names")
    assert "'Atlantis'" in error["message"] and error["details"]["keys"] == ["Atlantis", "Gotham"]
    # the other plots of that model are fine
    assert plot(client, model["id"], "sizes").status_code == 200


def test_codes_and_dc_on_the_map(client: TestClient) -> None:
    rows = b"state,x\nDC,1\nny,2\n  California ,3\nTX,10\nWashington,11\n"
    dataset = upload_csv(client, "codes", rows, "state")
    model = trained_model(client, dataset["id"], name="codes-job", hyperparameters={"k": 2, "seed": 1})
    response = plot(client, model["id"], "states.svg")
    assert response.status_code == 200, response.text
    text = svg_text(response.content, "states")
    assert "DC" in text and "4 of the 50 states and DC" in text and "no data: 46" in text


def test_an_imported_model_plots_its_centroids_in_its_own_units(
    client: TestClient, blobs_model: dict[str, Any]
) -> None:
    artifact = client.get(f"/models/{blobs_model['id']}/artifact").content
    imported = client.post(
        "/models/import",
        files={"file": ("model.tar.gz", artifact, "application/gzip")},
        data={"name": "imported", "feature_names": "x,y"},
    ).json()
    text = svg_text(plot(client, imported["id"], "centroids.svg").content, "centroids")
    assert "in the model's units" in text and "imported model" in text
    for kind in ("projection", "states", "sizes"):  # no training data (and no stored sizes)
        error = assert_error(plot(client, imported["id"], kind), 409, "conflict", "no training dataset")
        assert error["details"]["reason"] == "no_training_dataset"


def test_sizes_without_stored_sizes_are_counted(client: TestClient, blobs_model: dict[str, Any]) -> None:
    from service.db.tables import ModelTable

    state = client.app.state.centroid  # type: ignore[attr-defined]
    with state.database.session() as session:
        session.get(ModelTable, blobs_model["id"]).cluster_sizes = None
        session.commit()
        plots = PlotService(session, state.store)
        counted = plots.sizes(plots.model(blobs_model["id"]))
    assert sorted(counted.sizes.tolist()) == sorted(blobs_model["cluster_sizes"]) == [20, 20, 20]
    assert "assigned now" in counted.source
    assert_png(plot(client, blobs_model["id"], "sizes").content, "sizes")


# --- sweeps ---------------------------------------------------------------------------------------


def test_the_elbow_of_a_completed_sweep(client: TestClient, renders: list[tuple[str, str]]) -> None:
    blobs = upload_csv(client, "blobs", BLOBS_CSV, "id")
    body = {"name": "which-k", "train_dataset_id": blobs["id"], "k": {"min": 2, "max": 4}}
    created = client.post("/sweeps", json={**body, "hyperparameters": {"seed": 1, "mini_batch_size": 20}})
    assert created.status_code == 202, created.text
    error = assert_error(client.get("/sweeps/which-k/plots/elbow"), 409, "conflict", "once it is Completed")
    assert error["details"]["status"] == "Pending"
    run_worker_until_idle(client.app)
    sweep = client.get("/sweeps/which-k").json()
    png = client.get("/sweeps/which-k/plots/elbow")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert_png(png.content, "elbow")
    text = svg_text(client.get("/sweeps/which-k/plots/elbow.svg").content, "elbow")
    assert f"recommended k = {sweep['recommendation']['k']}" in text
    assert "msd" in text and "silhouette" in text and "k (number of clusters)" in text
    etag = png.headers["etag"]
    assert client.get("/sweeps/which-k/plots/elbow", headers={"If-None-Match": etag}).status_code == 304
    # registering a k changes the sweep's outcome, not its plot
    assert client.post("/sweeps/which-k/models", json={}).status_code == 201
    again = client.get("/sweeps/which-k/plots/elbow.png")
    assert again.headers["etag"] == etag and again.content == png.content
    assert renders == [("ElbowPlot", "png"), ("ElbowPlot", "svg")]


# --- a large dataset: a bounded, stated sample ------------------------------------------------------

ROWS, GROUP_ROWS, SAMPLE = 3000, 100, 200


@pytest.fixture
def small_groups(settings: Settings) -> Iterator[TestClient]:
    """Row groups of 100 rows, so a few thousand rows are many row groups."""
    with TestClient(create_app(settings.model_copy(update={"parquet_row_group_rows": GROUP_ROWS}))) as client:
        yield client


@pytest.fixture
def rows_read(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Rows every Parquet read in the process decodes (whoever reads)."""
    counts: list[int] = []
    original_batches = pq.ParquetFile.iter_batches
    original_group = pq.ParquetFile.read_row_group
    original_read = pq.ParquetFile.read

    def iter_batches(self: pq.ParquetFile, *args: Any, **kwargs: Any) -> Iterator[Any]:
        for batch in original_batches(self, *args, **kwargs):
            counts.append(batch.num_rows)
            yield batch

    def read_row_group(self: pq.ParquetFile, *args: Any, **kwargs: Any) -> Any:
        table = original_group(self, *args, **kwargs)
        counts.append(table.num_rows)
        return table

    def read(self: pq.ParquetFile, *args: Any, **kwargs: Any) -> Any:
        table = original_read(self, *args, **kwargs)
        counts.append(table.num_rows)
        return table

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", iter_batches)
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", read_row_group)
    monkeypatch.setattr(pq.ParquetFile, "read", read)
    return counts


def test_a_large_projection_reads_a_bounded_sample_and_says_so(
    small_groups: TestClient, monkeypatch: pytest.MonkeyPatch, rows_read: list[int]
) -> None:
    client = small_groups
    rng = np.random.default_rng(1)
    centers = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = centers[np.arange(ROWS) % 3] + rng.normal(scale=0.5, size=(ROWS, 2))
    csv = "x,y\n" + "".join(f"{x:.3f},{y:.3f}\n" for x, y in points)
    dataset = upload_csv(client, "big", csv.encode())
    model = trained_model(client, dataset["id"], name="big-job", hyperparameters={"k": 3, "seed": 1})
    state = client.app.state.centroid  # type: ignore[attr-defined]
    with state.database.session() as session:
        path = state.store.path(PlotService(session, state.store).datasets.get(dataset["id"]).storage_key)
    metadata = pq.ParquetFile(path).metadata
    assert metadata.num_rows == ROWS and metadata.row_group(0).num_rows == GROUP_ROWS

    monkeypatch.setattr(plots_service, "PROJECTION_SAMPLE_ROWS", SAMPLE)
    rows_read.clear()
    response = plot(client, model["id"], "projection.svg")
    assert response.status_code == 200, response.text
    text = svg_text(response.content, "projection")
    assert f"{SAMPLE} of {ROWS:,} rows" in text, text
    groups = plots_service.SAMPLE_ROW_GROUPS
    assert f"from {groups} of {ROWS // GROUP_ROWS} row groups" in text
    # only the sampled row groups were decoded: a bound set by the sample, not by the dataset
    assert 0 < sum(rows_read) <= groups * GROUP_ROWS < ROWS
    assert_png(plot(client, model["id"], "projection").content, "projection")


# --- units --------------------------------------------------------------------------------------------


def test_a_sample_plan_is_seeded_bounded_and_uniform() -> None:
    groups = [1000] * 500  # 500,000 rows
    plan = sample_plan(groups, 5000, seed=0, max_groups=16)
    assert len(plan) == 16 and sum(len(rows) for rows in plan.values()) == 5000
    assert all(np.all(np.diff(rows) > 0) and rows[0] >= 0 and rows[-1] < 1000 for rows in plan.values())
    assert plan.keys() == sample_plan(groups, 5000, seed=0, max_groups=16).keys()  # seeded
    assert plan.keys() != sample_plan(groups, 5000, seed=1, max_groups=16).keys()
    # tiny row groups: as many as the sample needs
    tiny = sample_plan([10] * 10_000, 500, seed=0, max_groups=16)
    assert sum(len(rows) for rows in tiny.values()) == 500 and len(tiny) <= 500
    # few rows: everything, in every non-empty group
    assert sample_plan([3, 0, 4], 5000, seed=0) == {0: None, 2: None}


def test_choose_format() -> None:
    assert choose_format("sizes", None) == ("sizes", "png")
    assert choose_format("states.svg", None) == ("states", "svg")
    assert choose_format("elbow", "image/svg+xml;q=0.9, image/png;q=0.1") == ("elbow", "svg")
    assert choose_format("elbow", "image/png;q=nan, */*;q=0.2") == ("elbow", "svg")  # q=nan refuses png only


def test_states_layout_and_names() -> None:
    assert set(TILES) == set(STATE_NAMES) and len(TILES) == 51
    assert len(set(TILES.values())) == 51  # one tile per square
    assert state_code(" New  York ") == "NY" and state_code("ca") == "CA"
    assert state_code("Washington, D.C.") == "DC" and state_code("Washington") == "WA"
    assert state_code("Atlantis") is None and state_code("") is None
    assert all(state_code(name) == code for code, name in STATE_NAMES.items())
    assert all(state_code(name) is not None for name in workshop_frame().index)
    assert KEY_COLUMN == "State"


def test_openapi_documents_the_plots(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()
    schemas = paths["components"]["schemas"]
    for path, kinds in [
        ("/models/{model_id}/plots/{kind}", MODEL_KINDS),
        ("/sweeps/{name}/plots/{kind}", ["elbow"]),
    ]:
        operation = paths["paths"][path]["get"]
        assert operation["summary"] and operation["description"]
        (kind,) = [p for p in operation["parameters"] if p["name"] == "kind"]
        enum = schemas[kind["schema"]["$ref"].rsplit("/", 1)[1]]["enum"]
        assert enum == [f"{k}{ext}" for k in kinds for ext in ("", ".png", ".svg")]
        responses = operation["responses"]
        assert set(responses["200"]["content"]) == {"image/png", "image/svg+xml"}
        assert {"ETag", "Cache-Control", "Vary"} <= set(responses["200"]["headers"])
        assert "content" not in responses["304"]
        for status in ("404", "406", "409", "422"):
            assert responses[status]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorResponse")


def test_plots_are_drawn_without_pyplot() -> None:
    """pyplot's global state machine is not thread-safe: nothing here may import it."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "from service.plots.render import SizesPlot, render\n"
        "render(SizesPlot('m', np.array([1, 2]), 'x'), 'png')\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=60)
