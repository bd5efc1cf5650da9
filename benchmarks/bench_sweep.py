"""Benchmark the one-pass sweep (service/engine/sweep.py) against separate fits, in one process.

    python benchmarks/bench_sweep.py [--rows 1000000] [--repeat 3] [--sklearn-rows N]

On blobs (rows x 32 features, 20 true centers, seed 0), k = 2..30, it times, each ``--repeat``
times (the median and range are printed):

* ``sweep``: every k from one streaming pass (the data as a Parquet file, streamed in row groups,
  as a training job reads it), with its metrics and recommendation;
* ``fit k=30``: one ``WebScaleKMeans`` fit at the largest k, same data, same source;
* once each (they are slow): ``WebScaleKMeans`` fitted separately for every k (for the per-k msd
  comparison), scikit-learn ``KMeans(n_init=1)`` and ``MiniBatchKMeans`` looped over the same
  range (on ``--sklearn-rows`` rows when given, the time then scaled up linearly and marked so).

It prints the ratios the issue sets targets for (sweep / fit at k=30 <= 2; sweep / KMeans loop
<= 0.1), the recommended k (target: 20), the worst per-k msd ratio sweep / separate fit (target
<= 1.01), and the peak resident memory of a sweep over the Parquet file measured in a child
process for two row counts (flat in rows: streaming). Results go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import sklearn
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.datasets import make_blobs
from threadpoolctl import threadpool_info

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from service.engine import KMeansHyperparameters, ParquetBatchSource, WebScaleKMeans  # noqa: E402
from service.engine.sweep import sweep  # noqa: E402

KS = range(2, 31)
FEATURES = 32
TRUE_CENTERS = 20


def blobs(rows: int) -> np.ndarray:
    X, _ = make_blobs(n_samples=rows, n_features=FEATURES, centers=TRUE_CENTERS, random_state=0)
    return X


def write_parquet(X: np.ndarray, path: Path) -> None:
    table = pa.table({f"f{i}": X[:, i] for i in range(X.shape[1])})
    pq.write_table(table, path, row_group_size=100_000)


def hyperparameters(k: int) -> KMeansHyperparameters:
    return KMeansHyperparameters(k=k, feature_dim=FEATURES, seed=0)


def timed(function: object) -> tuple[float, object]:
    started = time.perf_counter()
    result = function()  # type: ignore[operator]
    return time.perf_counter() - started, result


def msd(X: np.ndarray, centers: np.ndarray) -> float:
    from sklearn.metrics import pairwise_distances_argmin_min

    _, distances = pairwise_distances_argmin_min(X, centers)
    return float(np.mean(distances.astype(np.float64) ** 2))


def summary(times: list[float]) -> str:
    return f"median {statistics.median(times):.2f} s (range {min(times):.2f}-{max(times):.2f})"


def peak_rss_of_sweep(path: Path) -> float:
    """Peak RSS (MB, VmHWM: ru_maxrss would carry the parent's over exec) of a child process that
    sweeps the Parquet file at ``path``."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[2])\n"
        "from service.engine import KMeansHyperparameters, ParquetBatchSource\n"
        "from service.engine.sweep import sweep\n"
        "import numpy as np\n"
        "source = ParquetBatchSource(sys.argv[1])\n"
        "sweep(source, range(2, 31), KMeansHyperparameters(k=2, feature_dim=source.n_features, seed=0))\n"
        "print(next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmHWM')) / 1024)\n"
    )
    output = subprocess.run(
        [sys.executable, "-c", code, str(path), str(REPO)], check=True, capture_output=True, text=True
    ).stdout
    return float(output.strip().splitlines()[-1])


def machine() -> str:
    pools = [f"{i['internal_api']} {i.get('num_threads')} threads" for i in threadpool_info()]
    return (
        f"{platform.platform()}, {os.cpu_count()} CPUs; Python {platform.python_version()}, numpy {np.__version__}, "
        f"scikit-learn {sklearn.__version__}; thread pools: {', '.join(pools)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sklearn-rows", type=int, help="rows for the scikit-learn loops (default: --rows)")
    args = parser.parse_args()
    print(machine())
    X = blobs(args.rows)
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "blobs.parquet"
        write_parquet(X, path)
        source = ParquetBatchSource(path)

        sweep_times, fit_times = [], []
        result = None
        for _ in range(args.repeat):
            seconds, result = timed(lambda: sweep(source, KS, hyperparameters(2)))
            sweep_times.append(seconds)
            seconds, _ = timed(lambda: WebScaleKMeans.from_hyperparameters(hyperparameters(30)).fit(source))
            fit_times.append(seconds)
        assert result is not None
        print(f"\nrows {args.rows:,} x {FEATURES}, {TRUE_CENTERS} true centers, k = 2..30, {args.repeat} runs")
        print(f"sweep:    {summary(sweep_times)}")
        print(f"fit k=30: {summary(fit_times)}")
        print(f"sweep / fit k=30 (medians): {statistics.median(sweep_times) / statistics.median(fit_times):.2f}")

        separate_seconds, ratios = 0.0, []
        for k in KS:
            seconds, fitted = timed(lambda k=k: WebScaleKMeans.from_hyperparameters(hyperparameters(k)).fit(source))
            separate_seconds += seconds
            ratios.append(result.result(k).msd / fitted.metrics_.train_msd)  # type: ignore[attr-defined]
        worst = int(np.argmax(ratios))
        print(f"WebScaleKMeans fitted per k: {separate_seconds:.2f} s in all")
        print(
            f"per-k msd, sweep / separate fit: worst {max(ratios):.4f} (k={list(KS)[worst]}), "
            f"median {statistics.median(ratios):.4f}, best {min(ratios):.4f}"
        )
        recommendation = result.recommendation  # type: ignore[attr-defined]
        print(
            f"recommended k: {recommendation.k} (elbow {recommendation.elbow_k}, best silhouette "
            f"{recommendation.best_silhouette_k}); sample {result.sample_rows} rows"
        )  # type: ignore[attr-defined]

        rows = args.sklearn_rows or args.rows
        scale = args.rows / rows
        subset = X[:rows]
        marked = "" if rows == args.rows else f" (on {rows:,} rows, x{scale:g})"
        loops = {}
        for name, make in (
            ("KMeans(n_init=1)", lambda k: KMeans(n_clusters=k, n_init=1, random_state=0)),
            ("MiniBatchKMeans", lambda k: MiniBatchKMeans(n_clusters=k, random_state=0)),
        ):
            seconds = sum(timed(lambda k=k, make=make: make(k).fit(subset))[0] for k in KS) * scale
            loops[name] = seconds
            print(
                f"scikit-learn {name} looped over k{marked}: {seconds:.2f} s; "
                f"sweep / loop {statistics.median(sweep_times) / seconds:.3f}"
            )

        small = Path(directory) / "small.parquet"
        write_parquet(X[: max(args.rows // 10, 10_000)], small)
        print(
            f"peak RSS of a sweep process: {peak_rss_of_sweep(small):.0f} MB on {max(args.rows // 10, 10_000):,} "
            f"rows, {peak_rss_of_sweep(path):.0f} MB on {args.rows:,} rows (this process holds the blobs: "
            f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB)"
        )


if __name__ == "__main__":
    main()
