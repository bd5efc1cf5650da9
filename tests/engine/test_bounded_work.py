"""Every long step of a fit asks ``should_stop`` often (issue 16, #2): streaming, reduction, evaluation.

A stop must take effect within a fraction of a second wherever the fit is, including the reduction
(trials one at a time, Lloyd iterations in groups) and inside one big mini-batch.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from sklearn.cluster import KMeans

import service.engine.webscale as webscale
from service.engine import KMeansHyperparameters, TrainingStopped, WebScaleKMeans, reduce_centers


def weighted_points(n: int = 3000, d: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)), rng.uniform(1.0, 5.0, size=n)


class Fits:
    """Counts scikit-learn KMeans fits (one per trial, or per group of Lloyd iterations)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[dict[str, object]] = []
        original = KMeans.fit

        def fit(model: KMeans, *args: object, **kwargs: object) -> KMeans:
            self.calls.append({"max_iter": model.max_iter, "init": model.init})
            return original(model, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(KMeans, "fit", fit)


def test_stop_is_checked_before_every_reduction_trial(monkeypatch: pytest.MonkeyPatch) -> None:
    points, weights = weighted_points(200)
    fits = Fits(monkeypatch)
    checks = 0

    def should_stop() -> bool:
        nonlocal checks
        checks += 1
        return checks > 3

    hp = KMeansHyperparameters(k=5, feature_dim=2, local_lloyd_num_trials=1000, seed=0)
    with pytest.raises(TrainingStopped):
        reduce_centers(points, weights, hp, seed=0, should_stop=should_stop)
    assert len(fits.calls) == 3  # trials 1-3 ran, the 4th check stopped before the 4th trial


def test_lloyd_iterations_run_in_groups_with_a_check_between(monkeypatch: pytest.MonkeyPatch) -> None:
    points, weights = weighted_points()
    hp = KMeansHyperparameters(k=50, feature_dim=2, local_lloyd_num_trials=1, local_lloyd_tol=0.0, seed=0)
    whole = reduce_centers(points, weights, hp, seed=4)

    monkeypatch.setattr(webscale, "WORK_PER_CHECK", 1)  # every group is MIN_LLOYD_GROUP iterations
    fits = Fits(monkeypatch)
    checks = 0

    def should_stop() -> bool:
        nonlocal checks
        checks += 1
        return False

    grouped = reduce_centers(points, weights, hp, seed=4, should_stop=should_stop)
    assert len(fits.calls) > 2 and {call["max_iter"] for call in fits.calls} == {webscale.MIN_LLOYD_GROUP}
    assert len(fits.calls) < 300 / webscale.MIN_LLOYD_GROUP  # convergence (with tol = 0) ended the run
    assert checks == len(fits.calls)  # once before the trial, then once between groups
    # Each group continues from the previous one's centers: the same run, up to re-centering rounding.
    np.testing.assert_allclose(grouped, whole, rtol=0, atol=1e-9)


def test_grouped_runs_respect_local_lloyd_max_iter(monkeypatch: pytest.MonkeyPatch) -> None:
    points, weights = weighted_points()
    monkeypatch.setattr(webscale, "WORK_PER_CHECK", 1)
    fits = Fits(monkeypatch)
    hp = KMeansHyperparameters(
        k=50, feature_dim=2, local_lloyd_num_trials=1, local_lloyd_max_iter=20, local_lloyd_tol=0.0, seed=0
    )
    reduce_centers(points, weights, hp, seed=1)
    assert [call["max_iter"] for call in fits.calls] == [3, 3, 3, 3, 3, 3, 2]


def test_a_small_reduction_is_one_fit_per_trial(monkeypatch: pytest.MonkeyPatch) -> None:
    points, weights = weighted_points(100)
    fits = Fits(monkeypatch)
    reduce_centers(points, weights, KMeansHyperparameters(k=4, feature_dim=2, local_lloyd_num_trials=3), seed=0)
    assert [call["max_iter"] for call in fits.calls] == [300, 300, 300]


def test_a_long_reduction_stops_within_a_fraction_of_a_second() -> None:
    points, weights = weighted_points(6000)
    hp = KMeansHyperparameters(k=600, feature_dim=2, local_lloyd_num_trials=100, seed=0)  # ~10 s if left alone
    started = time.monotonic()

    def should_stop() -> bool:
        return time.monotonic() - started > 0.3

    with pytest.raises(TrainingStopped):
        reduce_centers(points, weights, hp, seed=0, should_stop=should_stop)
    assert time.monotonic() - started < 1.5


def test_fit_stops_during_the_reduction_with_every_point_processed() -> None:
    X = np.random.default_rng(0).normal(size=(4000, 2))
    hp = KMeansHyperparameters(k=400, feature_dim=2, local_lloyd_num_trials=100, seed=0)
    done = 0

    def progress(points: int, total: int) -> None:
        nonlocal done
        done = points

    model = WebScaleKMeans.from_hyperparameters(hp)
    with pytest.raises(TrainingStopped) as caught:
        model.fit(X, progress=progress, should_stop=lambda: done == 4000)
    assert caught.value.points_processed == 4000
    assert not hasattr(model, "cluster_centers_")


def test_one_big_mini_batch_is_searched_in_slices_with_checks_between(monkeypatch: pytest.MonkeyPatch) -> None:
    X = np.random.default_rng(0).normal(size=(5000, 3))
    hp = KMeansHyperparameters(k=50, feature_dim=3, mini_batch_size=5000, seed=0)
    reference = WebScaleKMeans.from_hyperparameters(hp).fit(X)

    monkeypatch.setattr(webscale, "WORK_PER_CHECK", 500 * 3 * 500)  # 500 local centers: 500-row slices
    checks = 0

    def should_stop() -> bool:
        nonlocal checks
        checks += 1
        return False

    sliced = WebScaleKMeans.from_hyperparameters(hp).fit(X, should_stop=should_stop)
    # one batch: a check before it, 9 between its 10 slices; the evaluation pass: the same again
    # (50 final centers: one slice); plus one check before the reduction trials.
    assert checks >= 10
    np.testing.assert_array_equal(sliced.cluster_centers_, reference.cluster_centers_)
    assert sliced.metrics_ == reference.metrics_


def test_a_stop_inside_a_big_mini_batch_leaves_the_estimator_unfitted(monkeypatch: pytest.MonkeyPatch) -> None:
    X = np.random.default_rng(0).normal(size=(5000, 3))
    monkeypatch.setattr(webscale, "WORK_PER_CHECK", 500 * 3 * 500)
    checks = 0

    def should_stop() -> bool:
        nonlocal checks
        checks += 1
        return checks == 3  # the batch's first check passed, then the second slice boundary

    model = WebScaleKMeans.from_hyperparameters(
        KMeansHyperparameters(k=50, feature_dim=3, mini_batch_size=5000, seed=0)
    )
    with pytest.raises(TrainingStopped) as caught:
        model.fit(X, should_stop=should_stop)
    assert caught.value.points_processed == 0
    assert not hasattr(model, "cluster_centers_")
