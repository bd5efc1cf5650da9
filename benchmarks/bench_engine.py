"""Benchmark Centroid's engine against scikit-learn in one process, on the same data.

    python benchmarks/bench_engine.py [--quick] [--seeds N]

For each case it fits scikit-learn's ``KMeans(algorithm="lloyd", n_init=1, init="k-means++")``,
``MiniBatchKMeans()`` (defaults) and our ``WebScaleKMeans`` with every seed, then prints the median
fit wall time and the median final MSD (mean squared Euclidean distance of every point to its
closest center, computed identically for all three from the returned centers) and the ratios.
Targets (issue 3): MSD <= 1.02 x KMeans and <= MiniBatchKMeans; time <= 0.5 x KMeans on blobs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sklearn
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.datasets import load_digits, make_blobs
from sklearn.metrics import pairwise_distances_argmin_min
from threadpoolctl import threadpool_info

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.engine import KMeansHyperparameters, WebScaleKMeans  # noqa: E402
from service.sample_data import workshop_matrix  # noqa: E402

# Ours: SageMaker's defaults (mini_batch_size=5000, epochs=1, init_method=random,
# extra_center_factor=auto -> 10, local_lloyd_num_trials=auto -> 10, kmeans++ reduction); only k,
# feature_dim and the seed are set.
OUR_OVERRIDES: dict[str, object] = {}


@dataclass(frozen=True)
class Case:
    name: str
    X: np.ndarray
    k: int


@dataclass(frozen=True)
class Result:
    seconds: float
    msd: float


def cases(quick: bool) -> list[Case]:
    rows = 50_000 if quick else 200_000
    blobs, _ = make_blobs(n_samples=rows, n_features=32, centers=64, random_state=0)
    return [
        Case(f"blobs {rows:,} x 32, k=64", blobs, 64),
        Case("digits 1,797 x 64, k=10", load_digits().data, 10),
        Case("workshop 50 x 5, k=10", workshop_matrix(), 10),
    ]


def msd(X: np.ndarray, centers: np.ndarray) -> float:
    """Mean squared Euclidean distance to the closest center (scikit-learn's helper, float64)."""
    _, distances = pairwise_distances_argmin_min(X.astype(np.float64), centers.astype(np.float64))
    return float(np.mean(distances**2))


def timed(X: np.ndarray, fit: Callable[[np.ndarray], np.ndarray]) -> Result:
    start = time.perf_counter()
    centers = fit(X)
    seconds = time.perf_counter() - start
    return Result(seconds, msd(X, centers))


def contenders(k: int, d: int, seed: int) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    params = {"k": k, "feature_dim": d, "seed": seed, **OUR_OVERRIDES}
    hp = KMeansHyperparameters.from_mapping(params)
    return {
        "KMeans": lambda X: (
            KMeans(n_clusters=k, algorithm="lloyd", n_init=1, init="k-means++", random_state=seed)
            .fit(X)
            .cluster_centers_
        ),
        "MiniBatchKMeans": lambda X: MiniBatchKMeans(n_clusters=k, random_state=seed).fit(X).cluster_centers_,
        "ours": lambda X: WebScaleKMeans.from_hyperparameters(hp).fit(X).cluster_centers_,
    }


def run(case: Case, seeds: int) -> dict[str, list[Result]]:
    results: dict[str, list[Result]] = {}
    contenders(case.k, case.X.shape[1], 0)["ours"](case.X[: max(case.k, 100)])  # warm-up
    for seed in range(seeds):
        for name, fit in contenders(case.k, case.X.shape[1], seed).items():
            results.setdefault(name, []).append(timed(case.X, fit))
    return results


def median(results: list[Result], field: str) -> float:
    return statistics.median(getattr(result, field) for result in results)


def report_case(case: Case, results: dict[str, list[Result]]) -> str:
    t = {name: median(rs, "seconds") for name, rs in results.items()}
    m = {name: median(rs, "msd") for name, rs in results.items()}
    return (
        f"| {case.name} | {t['KMeans']:.3f} | {t['MiniBatchKMeans']:.3f} | {t['ours']:.3f} "
        f"| {t['ours'] / t['KMeans']:.2f} | {t['ours'] / t['MiniBatchKMeans']:.2f} "
        f"| {m['KMeans']:.4g} | {m['MiniBatchKMeans']:.4g} | {m['ours']:.4g} "
        f"| {m['ours'] / m['KMeans']:.4f} | {m['ours'] / m['MiniBatchKMeans']:.4f} |"
    )


def machine() -> str:
    blas = [f"{i['internal_api']} {i.get('num_threads')} threads" for i in threadpool_info()]
    return (
        f"{platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs; Python {platform.python_version()}, numpy {np.__version__}, "
        f"scikit-learn {sklearn.__version__}; thread pools: {', '.join(blas)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="50,000 blob rows and 2 seeds")
    parser.add_argument("--seeds", type=int, help="seeds per case (default 5, or 2 with --quick)")
    args = parser.parse_args()
    seeds = args.seeds or (2 if args.quick else 5)
    print(machine())
    print(f"ours: SageMaker defaults + {OUR_OVERRIDES or 'nothing'}; median of {seeds} seeds\n")
    print(
        "| case | KMeans s | MiniBatch s | ours s | ours/KMeans time | ours/MiniBatch time "
        "| KMeans MSD | MiniBatch MSD | ours MSD | ours/KMeans MSD | ours/MiniBatch MSD |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for case in cases(args.quick):
        print(report_case(case, run(case, seeds)), flush=True)


if __name__ == "__main__":
    main()
