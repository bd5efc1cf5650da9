"""Benchmark the projection plot of a 10,000,000-row dataset, through HTTP, in one process.

    python benchmarks/bench_plots.py [--rows 10000000] [--features 5] [--repeat 5] [--keep DIR]

It writes a Parquet file of ``--rows`` rows x ``--features`` float64 columns (blobs around 8
centers, seed 0) with pyarrow, one row group of ``CENTROID_PARQUET_ROW_GROUP_ROWS`` (65,536) rows
at a time, never the whole table in memory; registers it as a dataset of a fresh Centroid (SQLite,
a temporary data directory) with a model of 8 centroids trained on it (the rows are not read to
make the model: its centroids are the generator's centers, which is all the plot needs); then asks
``GET /models/{id}/plots/projection.png`` ``--repeat`` times through FastAPI's TestClient, emptying
the plot cache before each request, so every request samples the file, projects and draws. It
prints the median and range, the time of the sampling alone (``read_sample``), the rows the
sample decoded, and the process's peak resident memory, for this row count and for a 100 times
smaller file (flat: the sample never grows with the dataset). Results go to docs/plots.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fastapi.testclient import TestClient  # noqa: E402

from service.db.tables import DatasetTable, ModelTable  # noqa: E402
from service.main import create_app  # noqa: E402
from service.plots import router as plots_router  # noqa: E402
from service.plots.service import PLOT_SEED, PROJECTION_SAMPLE_ROWS, read_sample  # noqa: E402
from service.settings import Settings  # noqa: E402

GROUP_ROWS = 65_536
CENTERS = 8


def write_blobs(path: Path, rows: int, features: int) -> np.ndarray:
    """``rows`` rows around :data:`CENTERS` centers, written a row group at a time; the centers."""
    rng = np.random.default_rng(0)
    centers = rng.uniform(-10, 10, size=(CENTERS, features))
    schema = pa.schema([(f"f{i}", pa.float64()) for i in range(features)])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, GROUP_ROWS):
            count = min(GROUP_ROWS, rows - start)
            values = centers[rng.integers(0, CENTERS, count)] + rng.normal(size=(count, features))
            writer.write_table(pa.table({f"f{i}": values[:, i] for i in range(features)}, schema=schema))
    return centers


def register(client: TestClient, source: Path, rows: int, features: int, centers: np.ndarray, tag: str) -> str:
    """The file as a dataset, and a model on it; the model's id."""
    state = client.app.state.centroid  # type: ignore[attr-defined]
    dataset_id, model_id = f"ds-bench{tag}", f"mdl-bench{tag}"
    key = f"datasets/{dataset_id}.parquet"
    target = state.store.path(key)
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.stat().st_dev == target.parent.stat().st_dev:
        os.link(source, target)  # the same bytes, without copying hundreds of MB
    else:
        shutil.copy(source, target)
    names = [f"f{i}" for i in range(features)]
    with state.database.session() as session:
        session.add(
            DatasetTable(
                id=dataset_id,
                name=f"blobs-{tag}",
                key_column=None,
                columns=[{"name": name, "dtype": "float64"} for name in names],
                row_count=rows,
                size_bytes=target.stat().st_size,
                storage_key=key,
                recipe={"source": "upload", "filename": "blobs.csv", "columns": names},
            )
        )
        session.flush()
        session.add(
            ModelTable(
                id=model_id,
                name=f"blobs-{tag}",
                source="import",
                train_dataset_id=dataset_id,
                feature_names=names,
                k=CENTERS,
                feature_dim=features,
                centroids=centers.tolist(),
                hyperparameters={"k": CENTERS},
                metrics={},
                artifact_key=f"models/{model_id}.tar.gz",
                artifact_sha256=hashlib.sha256(tag.encode()).hexdigest(),
                artifact_size=0,
            )
        )
        session.commit()
    return model_id


def time_plot(client: TestClient, model_id: str, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        plots_router.PLOT_CACHE.clear()
        start = time.perf_counter()
        response = client.get(f"/models/{model_id}/plots/projection.png")
        times.append(time.perf_counter() - start)
        assert response.status_code == 200, response.text
    return times


def summary(times: list[float]) -> str:
    return f"median {statistics.median(times):.3f} s (range {min(times):.3f} to {max(times):.3f} s, {len(times)} runs)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--features", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--keep", type=Path, default=None, help="keep (and reuse) the generated files here")
    args = parser.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="centroid-bench-plots-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"python {platform.python_version()}, {os.cpu_count()} cpus, {platform.machine()}")
    sizes = {"small": max(PROJECTION_SAMPLE_ROWS * 2, args.rows // 100), "large": args.rows}
    files: dict[str, tuple[Path, np.ndarray]] = {}
    for tag, rows in sizes.items():
        path = work / f"blobs-{rows}x{args.features}.parquet"
        start = time.perf_counter()
        centers = write_blobs(path, rows, args.features) if not path.exists() else _centers(args.features)
        files[tag] = (path, centers)
        print(
            f"{tag}: {rows:,} rows x {args.features} features, {pq.ParquetFile(path).metadata.num_row_groups} row "
            f"groups, {path.stat().st_size / 1e6:,.0f} MB (ready in {time.perf_counter() - start:.1f} s)"
        )
    settings = Settings(
        data_dir=work / "data",
        database_url=f"sqlite:///{work / 'data' / 'bench.db'}",
        log_level="WARNING",
        log_format="text",
        embedded_worker=False,
    )
    (work / "data").mkdir(exist_ok=True)
    try:
        with TestClient(create_app(settings)) as client:
            time_plot(client, register(client, *_tiny(work, args.features), tag="warm"), 1)  # import matplotlib
            print(f"peak RSS after start-up and one small plot: {_peak_mib():,.0f} MiB")
            for tag, rows in sizes.items():
                path, centers = files[tag]
                model_id = register(client, path, rows, args.features, centers, tag)
                names = [f"f{i}" for i in range(args.features)]
                sampled = []
                for _ in range(args.repeat):
                    start = time.perf_counter()
                    sample = read_sample(path, names, PROJECTION_SAMPLE_ROWS, PLOT_SEED)
                    sampled.append(time.perf_counter() - start)
                times = time_plot(client, model_id, args.repeat)
                peak = _peak_mib()
                print(
                    f"{tag} ({rows:,} rows): projection.png {summary(times)}; sampling alone "
                    f"{statistics.median(sampled) * 1000:.0f} ms ({sample.describe()}, {sample.rows_read:,} rows "
                    f"decoded); peak RSS so far {peak:,.0f} MiB"
                )
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            shutil.rmtree(work / "data", ignore_errors=True)


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _centers(features: int) -> np.ndarray:
    """The centers :func:`write_blobs` uses (its generator's first draw)."""
    return np.random.default_rng(0).uniform(-10, 10, size=(CENTERS, features))


def _tiny(work: Path, features: int) -> tuple[Path, int, int, np.ndarray]:
    path = work / "tiny.parquet"
    return path, 100, features, write_blobs(path, 100, features)


if __name__ == "__main__":
    main()
