"""Sweeps (service/engine/sweep.py): every k from one streaming pass, checked against separate
fits, scikit-learn's metric functions and exact nearest-center searches."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.datasets import make_blobs
from sklearn.metrics import calinski_harabasz_score, davies_bouldin_score, silhouette_score

from service.engine import ArrayBatchSource, CenterIndex, KMeansHyperparameters, TrainingStopped, WebScaleKMeans
from service.engine.errors import EngineInputError
from service.engine.hyperparameters import HyperparameterError
from service.engine.sweep import KResult, evaluate_centers, recommend_k, sweep
from service.sample_data import workshop_matrix


def _hp(d: int, **overrides: object) -> KMeansHyperparameters:
    return KMeansHyperparameters(**{"k": 2, "feature_dim": d, "seed": 7, "mini_batch_size": 500, **overrides})


@pytest.fixture(scope="module")
def six_blobs() -> np.ndarray:
    X, _ = make_blobs(n_samples=4000, n_features=4, centers=6, cluster_std=0.5, random_state=11)
    return X


@pytest.fixture(scope="module")
def blob_sweep(six_blobs: np.ndarray) -> object:
    return sweep(six_blobs, range(2, 11), _hp(4))


def _exact(X: np.ndarray, centers: np.ndarray) -> tuple[np.ndarray, float]:
    index = CenterIndex(centers.astype(np.float64))
    labels = index.nearest(X)
    return labels, float(index.squared_distances_to(X, labels).sum())


def test_every_k_is_as_good_as_a_separate_fit(six_blobs: np.ndarray, blob_sweep: object) -> None:
    for result in blob_sweep.results:  # type: ignore[attr-defined]
        separate = WebScaleKMeans.from_hyperparameters(_hp(4, k=result.k)).fit(six_blobs)
        assert result.msd <= separate.metrics_.train_msd * 1.01, result.k


def test_the_largest_k_is_the_fit_with_that_k(six_blobs: np.ndarray, blob_sweep: object) -> None:
    fit = WebScaleKMeans.from_hyperparameters(_hp(4, k=10)).fit(six_blobs)
    largest = blob_sweep.result(10)  # type: ignore[attr-defined]
    np.testing.assert_array_equal(largest.centers, fit.cluster_centers_)
    assert largest.cluster_sizes == fit.metrics_.cluster_sizes
    assert largest.reduction_msd == fit.metrics_.reduction_msd
    assert largest.ssd == pytest.approx(fit.metrics_.train_ssd, rel=1e-9)
    np.testing.assert_array_equal(blob_sweep.local_centers, fit.local_centers_)  # type: ignore[attr-defined]


def test_sizes_and_ssd_are_the_exact_nearest_centers(six_blobs: np.ndarray, blob_sweep: object) -> None:
    for result in blob_sweep.results:  # type: ignore[attr-defined]
        labels, ssd = _exact(six_blobs, result.centers)
        assert result.cluster_sizes == np.bincount(labels, minlength=result.k).tolist()
        assert result.ssd == pytest.approx(ssd, rel=1e-9)
        assert result.msd == pytest.approx(ssd / len(six_blobs), rel=1e-9)


def test_scores_are_scikit_learns_on_the_same_labels(six_blobs: np.ndarray, blob_sweep: object) -> None:
    assert blob_sweep.sample_rows == len(six_blobs)  # type: ignore[attr-defined]
    for result in blob_sweep.results:  # type: ignore[attr-defined]
        labels, _ = _exact(six_blobs, result.centers)
        assert result.silhouette == pytest.approx(silhouette_score(six_blobs, labels), abs=1e-9)
        assert result.davies_bouldin == pytest.approx(davies_bouldin_score(six_blobs, labels), rel=1e-9)
        assert result.calinski_harabasz == pytest.approx(calinski_harabasz_score(six_blobs, labels), rel=1e-9)


def test_the_true_k_is_recommended(blob_sweep: object) -> None:
    recommendation = blob_sweep.recommendation  # type: ignore[attr-defined]
    assert recommendation.k == 6
    assert recommendation.best_silhouette_k == 6 and recommendation.elbow_k in (5, 6, 7)
    assert any("k=6" in reason for reason in recommendation.reasons)


def test_a_large_evaluation_is_scored_on_a_seeded_sample(six_blobs: np.ndarray) -> None:
    first = sweep(six_blobs, [3, 6], _hp(4), sample_size=500)
    again = sweep(six_blobs, [3, 6], _hp(4), sample_size=500)
    assert first.sample_rows == 500
    assert [r.silhouette for r in first.results] == [r.silhouette for r in again.results]
    # msd, ssd and sizes still cover every row.
    assert sum(first.result(6).cluster_sizes) == len(six_blobs)
    assert first.result(6).silhouette == pytest.approx(sweep(six_blobs, [6], _hp(4)).result(6).silhouette, abs=0.05)


def test_test_data_is_what_is_evaluated(six_blobs: np.ndarray) -> None:
    result = sweep(six_blobs[:3000], [4, 6], _hp(4), test=six_blobs[3000:])
    assert result.evaluated_on == "test" and result.evaluated_rows == 1000
    for k_result in result.results:
        labels, ssd = _exact(six_blobs[3000:], k_result.centers)
        assert k_result.cluster_sizes == np.bincount(labels, minlength=k_result.k).tolist()
        assert k_result.ssd == pytest.approx(ssd, rel=1e-9)


def test_streamed_batches_give_the_same_sweep(six_blobs: np.ndarray, blob_sweep: object) -> None:
    streamed = sweep(ArrayBatchSource(six_blobs), range(2, 11), _hp(4))
    for mine, theirs in zip(streamed.results, blob_sweep.results, strict=True):  # type: ignore[attr-defined]
        np.testing.assert_array_equal(mine.centers, theirs.centers)
        assert mine.cluster_sizes == theirs.cluster_sizes and mine.ssd == theirs.ssd


def test_progress_and_stop(six_blobs: np.ndarray) -> None:
    seen: list[tuple[int, int]] = []
    sweep(six_blobs, [2, 3], _hp(4), progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (2 * len(six_blobs), 2 * len(six_blobs))
    with pytest.raises(TrainingStopped):
        sweep(six_blobs, [2, 3], _hp(4), should_stop=lambda: True)


def test_bad_ranges_are_refused(six_blobs: np.ndarray) -> None:
    with pytest.raises(EngineInputError):
        sweep(six_blobs, [], _hp(4))
    with pytest.raises(EngineInputError):
        sweep(six_blobs, [0, 2], _hp(4))
    with pytest.raises(EngineInputError):
        sweep(six_blobs, [1, 2], _hp(4))
    with pytest.raises(HyperparameterError, match="k: must be <= the number of training rows"):
        sweep(six_blobs[:5], [2, 30], _hp(4, extra_center_factor=1))


def test_the_workshop_sweep_runs_well_under_a_second() -> None:
    matrix = workshop_matrix()
    started = time.perf_counter()
    result = sweep(matrix, range(2, 16), _hp(5, seed=1))
    elapsed = time.perf_counter() - started
    assert elapsed < 1.0, elapsed
    assert [r.k for r in result.results] == list(range(2, 16))
    assert 2 <= result.recommendation.k <= 15 and result.recommendation.reasons


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(20, 300),
    st.integers(1, 4),
    st.lists(st.integers(2, 8), min_size=1, max_size=4),
    st.integers(0, 2**16),
    st.booleans(),
)
def test_labels_are_exact_on_any_data(rows: int, d: int, ks: list[int], seed: int, integers: bool) -> None:
    """Integer-valued data makes ties and points on the anchors' margins common: the proof by
    anchors must never pick a center that is not the exact first-on-ties nearest."""
    rng = np.random.default_rng(seed)
    X = rng.integers(-3, 4, size=(rows, d)).astype(np.float64) if integers else rng.normal(size=(rows, d))
    result = sweep(X, ks, _hp(d, seed=seed, mini_batch_size=64, extra_center_factor=2))
    for k_result in result.results:
        labels, ssd = _exact(X, k_result.centers)
        assert k_result.cluster_sizes == np.bincount(labels, minlength=k_result.k).tolist()
        assert k_result.ssd == pytest.approx(ssd, rel=1e-9, abs=1e-9)


def _result(k: int, msd: float, silhouette: float | None) -> KResult:
    return KResult(k, np.zeros((k, 1), np.float32), msd, msd, msd, [0] * k, silhouette, None, None)


def test_the_recommendation_rule() -> None:
    # A clear elbow at 4 that silhouette confirms.
    curve = [(2, 100.0, 0.5), (3, 60.0, 0.6), (4, 10.0, 0.8), (5, 9.0, 0.6), (6, 8.0, 0.5)]
    assert recommend_k([_result(*point) for point in curve]).k == 4
    # The elbow's silhouette is far below the best: the best silhouette wins.
    curve = [(2, 100.0, 0.9), (3, 60.0, 0.2), (4, 10.0, 0.3), (5, 9.0, 0.2), (6, 8.0, 0.1)]
    chosen = recommend_k([_result(*point) for point in curve])
    assert (chosen.k, chosen.elbow_k, chosen.best_silhouette_k) == (2, 4, 2)
    # A straight line has no elbow: the best silhouette.
    curve = [(2, 50.0, 0.1), (3, 40.0, 0.3), (4, 30.0, 0.2), (5, 20.0, 0.1), (6, 10.0, 0.1)]
    chosen = recommend_k([_result(*point) for point in curve])
    assert chosen.elbow_k is None and chosen.k == 3
    # Two ks, no silhouettes: the smallest k, said so.
    chosen = recommend_k([_result(2, 5.0, None), _result(3, 4.0, None)])
    assert chosen.k == 2 and any("smallest" in reason for reason in chosen.reasons)


def test_centers_trained_elsewhere_are_evaluated_as_a_sweep_evaluates_its_own(
    six_blobs: np.ndarray, blob_sweep: object
) -> None:
    """evaluate_centers (a sagemaker sweep's evaluation: one training job per k) gives what the
    sweep gave for the same centers: exact labels, sizes, msd, the sample scores, the same k."""
    own = blob_sweep
    centers = {r.k: r.centers for r in own.results}  # type: ignore[attr-defined]
    reported = {k: 0.5 * k for k in centers}
    other = evaluate_centers(ArrayBatchSource(six_blobs), centers, train_msd=reported, seed=7, batch_size=333)
    assert other.local_centers is None and other.evaluated_on == "training" and other.sample_rows == len(six_blobs)
    for mine, theirs in zip(own.results, other.results, strict=True):  # type: ignore[attr-defined]
        labels, ssd = _exact(six_blobs, theirs.centers)
        assert theirs.cluster_sizes == mine.cluster_sizes == np.bincount(labels, minlength=theirs.k).tolist()
        assert theirs.ssd == pytest.approx(ssd, rel=1e-9) and theirs.msd == pytest.approx(mine.msd, rel=1e-9)
        assert theirs.silhouette == pytest.approx(silhouette_score(six_blobs, labels), abs=1e-9)
        assert theirs.reduction_msd == reported[theirs.k]
    assert other.recommendation.k == own.recommendation.k  # type: ignore[attr-defined]
    missing = evaluate_centers(six_blobs, {3: centers[3]}, seed=7)
    assert np.isnan(missing.results[0].reduction_msd)
    with pytest.raises(EngineInputError, match="k=4: expected 4 centers"):
        evaluate_centers(six_blobs, {3: centers[3], 4: centers[3]})
