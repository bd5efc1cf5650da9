"""WebScaleKMeans: quality against scikit-learn, SageMaker's semantics, determinism, callbacks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from sklearn.cluster import KMeans
from sklearn.datasets import load_digits
from sklearn.exceptions import NotFittedError
from sklearn.metrics import adjusted_rand_score
from threadpoolctl import threadpool_limits

from service.engine import (
    ArrayBatchSource,
    EngineInputError,
    HyperparameterError,
    KMeansHyperparameters,
    ParquetBatchSource,
    TrainingStopped,
    WebScaleKMeans,
    predict,
)


def fit(X: np.ndarray, **params: object) -> WebScaleKMeans:
    hp = KMeansHyperparameters.from_mapping({"feature_dim": X.shape[1], **params})
    return WebScaleKMeans.from_hyperparameters(hp).fit(X)


def msd(X: np.ndarray, centers: np.ndarray) -> float:
    return float(np.mean(predict(X, centers).distance_to_cluster ** 2))


def sklearn_msd(X: np.ndarray, k: int) -> float:
    return msd(X, KMeans(n_clusters=k, n_init=10, random_state=0).fit(X).cluster_centers_)


# --- quality, with scikit-learn as the oracle -------------------------------------------------


@pytest.mark.parametrize("init_method", ["random", "kmeans++"])
def test_recovers_well_separated_blobs(blobs: tuple[np.ndarray, np.ndarray], init_method: str) -> None:
    X, y = blobs
    model = fit(X, k=6, mini_batch_size=1000, init_method=init_method, seed=0)
    assert adjusted_rand_score(y, model.predict(X)) >= 0.99


def test_workshop_quality_close_to_sklearn(workshop_matrix: np.ndarray) -> None:
    """50 states x 5 features, k=10 (the workshop). Measured over seeds 0-9: ratios 0.96-1.10,
    median 1.00 (seeds 0-4: median 1.01, max 1.10)."""
    reference = sklearn_msd(workshop_matrix, 10)
    ratios = [fit(workshop_matrix, k=10, seed=seed).metrics_.train_msd / reference for seed in range(5)]
    assert np.median(ratios) <= 1.05
    assert max(ratios) <= 1.15


def test_digits_quality_close_to_sklearn() -> None:
    """load_digits (1,797 x 64), k=10, SageMaker defaults. Measured over seeds 0-9: 1.007-1.016."""
    X = load_digits().data
    reference = sklearn_msd(X, 10)
    ratios = [fit(X, k=10, seed=seed).metrics_.train_msd / reference for seed in range(3)]
    assert np.median(ratios) <= 1.03
    assert max(ratios) <= 1.05


# --- SageMaker semantics ------------------------------------------------------------------------


def test_local_centers_and_weights(blobs: tuple[np.ndarray, np.ndarray]) -> None:
    X, _ = blobs
    model = fit(X, k=6, extra_center_factor=3, mini_batch_size=500, epochs=2, seed=1)
    assert model.local_centers_.shape == (18, 4)
    # Every center starts at weight 1 (as SageMaker's), then every point counts once per epoch.
    assert model.local_weights_.sum() == 18 + 2 * len(X)
    assert (model.local_weights_ >= 1).all()
    assert model.cluster_centers_.shape == (6, 4) and model.cluster_centers_.dtype == np.float32
    state = model.state_
    assert state.centers is model.local_centers_ and state.weights is model.local_weights_


def test_initial_weight_is_one_seeding_row_included() -> None:
    """SageMaker's convention (docs/engine.md): with no decay, the local centers are weighted means
    that include their seeding rows once, so sum(w) = K + epochs x n and sum(w c) = (sum of the K
    seeding rows) + epochs x (sum of all rows). mini_batch_size < K makes the seeds the first K rows."""
    X = np.random.default_rng(4).normal(size=(500, 3)) * [1.0, 5.0, 20.0] + [0.0, -3.0, 40.0]
    model = fit(X, k=5, extra_center_factor=10, mini_batch_size=7, epochs=2, seed=0)
    weights, centers = model.local_weights_, model.local_centers_
    assert len(weights) == 50 and weights.sum() == 50 + 2 * len(X)
    np.testing.assert_allclose((weights[:, None] * centers).sum(axis=0), X[:50].sum(axis=0) + 2 * X.sum(axis=0))


def test_auto_extra_center_factor_is_ten_and_capped_by_rows() -> None:
    X = np.random.default_rng(0).normal(size=(300, 2))
    assert fit(X, k=5, seed=0).local_centers_.shape == (50, 2)
    assert fit(X, k=50, seed=0).local_centers_.shape == (300, 2)  # 500 requested, 300 rows


def test_small_mini_batches_still_get_all_local_centers() -> None:
    X = np.random.default_rng(0).normal(size=(300, 2))
    assert fit(X, k=5, mini_batch_size=7, seed=0).local_centers_.shape == (50, 2)


def test_first_batch_is_processed_after_initialization() -> None:
    """Initial centers start with weight 1: with one center per row, one pass leaves each center on
    its own row with weight 2 (its seeding, then the init batch counted again, not skipped)."""
    X = np.random.default_rng(0).normal(size=(40, 3))
    model = fit(X, k=4, extra_center_factor=10, seed=0)
    assert sorted(map(tuple, model.local_centers_)) == sorted(map(tuple, X))
    np.testing.assert_array_equal(model.local_weights_, np.full(40, 2.0))


def test_update_rule_on_a_hand_computed_case() -> None:
    """Centers seeded at 0 and 10 with weight 1; each batch moves them by p = m / (n + m)."""
    X = np.array([[0.0], [10.0], [2.0], [12.0], [4.0], [14.0]])
    model = fit(X, k=2, extra_center_factor=1, mini_batch_size=2, seed=0)
    # Batch 1 {0, 10} seeds the two centers (n=1), then is streamed: m=1 on its own seed, stays;
    # batch 2 {2, 12}: n=2, m=1 -> 1/3 of the way (2/3, 32/3); batch 3 {4, 14}: n=3, m=1 -> 1/4 of
    # the way. So each ends at the mean of {seed, 0 or 10, 2 or 12, 4 or 14}.
    np.testing.assert_allclose(sorted(model.local_centers_[:, 0]), [1.5, 11.5])
    np.testing.assert_array_equal(model.local_weights_, [4.0, 4.0])


def _shifting_data() -> np.ndarray:
    """Two clusters that move up by 5 halfway through the stream."""
    rng = np.random.default_rng(0)
    phases = []
    for dy in (0, 5):
        base = np.array([[0.0, dy], [10.0, dy]])
        phases.append(base[rng.integers(0, 2, 4000)] + rng.normal(scale=0.3, size=(4000, 2)))
    return np.vstack(phases)


def test_half_life_decay_tracks_a_distribution_shift() -> None:
    X = _shifting_data()
    remembering = fit(X, k=2, mini_batch_size=250, seed=0)
    forgetting = fit(X, k=2, mini_batch_size=250, half_life_time_size=500, seed=0)
    # Without decay the centers average both phases (y ~ 2.5); with decay they follow the shift.
    np.testing.assert_allclose(remembering.cluster_centers_[:, 1], [2.5, 2.5], atol=0.3)
    np.testing.assert_allclose(forgetting.cluster_centers_[:, 1], [5.0, 5.0], atol=0.1)
    # Total weight: 250 points per batch, each earlier batch weighs 2^(-250/500) less; the 20
    # initial weights of 1 have decayed over all 32 batches.
    ratio = 2 ** (-250 / 500)
    expected = 250 * (1 - ratio**32) / (1 - ratio) + 20 * ratio**32
    assert forgetting.local_weights_.sum() == pytest.approx(expected)


def test_centers_that_win_no_points_keep_their_initial_weight() -> None:
    X = np.repeat(np.array([[0.0, 0.0], [5.0, 5.0], [9.0, 0.0]]), 20, axis=0)
    model = fit(X, k=3, seed=0)  # 30 local centers on 3 distinct values; ties go to the lowest index
    np.testing.assert_array_equal(np.sort(model.local_weights_), [1.0] * 27 + [21.0] * 3)
    np.testing.assert_allclose(np.sort(model.cluster_centers_, axis=0), [[0, 0], [5, 0], [9, 5]], atol=1e-6)


def test_zero_weight_centers_are_dropped_or_kept_to_reach_k() -> None:
    """Weights only reach 0 by decay (2^-(b/h) underflows for b/h > 1074): such centers are
    dropped, or kept with a tiny weight when fewer than k would remain."""
    X = np.repeat(np.array([[0.0, 0.0], [5.0, 5.0], [9.0, 0.0]]), 400, axis=0)
    model = fit(X, k=3, mini_batch_size=1200, half_life_time_size=1, seed=0)
    assert (model.local_weights_ == 0).sum() == 27  # only the 3 winners of the (only) batch weigh
    np.testing.assert_allclose(np.sort(model.cluster_centers_, axis=0), [[0, 0], [5, 0], [9, 5]], atol=1e-6)
    lopsided = np.vstack([np.zeros((1100, 2)), [[5.0, 5.0]], [[9.0, 0.0]]])
    with pytest.warns(Warning):  # scikit-learn notes it found fewer distinct clusters than k
        few = fit(
            lopsided,
            k=3,
            extra_center_factor=1,
            init_method="random",
            mini_batch_size=1102,
            half_life_time_size=1,
            seed=1,
        )
    assert (few.local_weights_ > 0).sum() < 3  # fewer than k weigh: the zero-weight centers were kept
    assert few.cluster_centers_.shape == (3, 2) and np.isfinite(few.cluster_centers_).all()


# --- metrics --------------------------------------------------------------------------------------


def test_metrics_match_predictions(blobs: tuple[np.ndarray, np.ndarray]) -> None:
    X, _ = blobs
    test = X[:1000] + 0.1
    hp = KMeansHyperparameters(k=6, feature_dim=4, seed=0, eval_metrics=("msd", "ssd"))
    model = WebScaleKMeans.from_hyperparameters(hp).fit(X, test=test)
    for data, m, s, sizes in [
        (X, model.metrics_.train_msd, model.metrics_.train_ssd, model.metrics_.cluster_sizes),
        (test, model.metrics_.test_msd, model.metrics_.test_ssd, model.metrics_.test_cluster_sizes),
    ]:
        prediction = model.predict_with_distances(data)
        squared = prediction.distance_to_cluster**2
        assert m == pytest.approx(squared.mean(), rel=1e-12)
        assert s == pytest.approx(squared.sum(), rel=1e-12)
        assert sizes == np.bincount(prediction.closest_cluster, minlength=6).tolist()
    np.testing.assert_array_equal(model.cluster_sizes_, model.metrics_.cluster_sizes)
    assert set(model.metrics_.named(hp.eval_metrics)) == {
        "train:msd",
        "train:ssd",
        "test:msd",
        "test:ssd",
    }
    assert set(model.metrics_.named(["msd"])) == {"train:msd", "test:msd"}
    assert fit(X, k=6, seed=0).metrics_.test_msd is None


def test_transform_gives_euclidean_distances_to_all_centers(
    blobs: tuple[np.ndarray, np.ndarray],
) -> None:
    X, _ = blobs
    model = fit(X, k=6, seed=0)
    distances = model.transform(X[:50])
    expected = np.linalg.norm(X[:50, None, :] - model.cluster_centers_.astype(float)[None], axis=2)
    np.testing.assert_allclose(distances, expected, rtol=1e-9, atol=1e-9)


# --- determinism and streaming --------------------------------------------------------------------


@pytest.mark.parametrize("init_method", ["random", "kmeans++"])
def test_same_seed_is_bit_identical_across_thread_counts(init_method: str) -> None:
    X = load_digits().data
    params = {"k": 10, "mini_batch_size": 300, "epochs": 2, "init_method": init_method, "seed": 5}
    default = fit(X, **params)
    with threadpool_limits(limits=1):
        single = fit(X, **params)
    again = fit(X, **params)
    for other in (single, again):
        np.testing.assert_array_equal(other.cluster_centers_, default.cluster_centers_)
        np.testing.assert_array_equal(other.local_centers_, default.local_centers_)
        assert other.metrics_ == default.metrics_


def test_different_seeds_differ() -> None:
    X = load_digits().data
    a, b = fit(X, k=10, seed=1), fit(X, k=10, seed=2)
    assert not np.array_equal(a.local_centers_, b.local_centers_)


def test_parquet_stream_equals_in_memory_fit(tmp_path: Path) -> None:
    X = np.random.default_rng(0).normal(size=(5000, 3)) + np.repeat(np.eye(3) * 8, [1700, 1700, 1600], axis=0)
    pq.write_table(pa.table({f"c{i}": X[:, i] for i in range(3)}), tmp_path / "x.parquet", row_group_size=999)
    hp = KMeansHyperparameters(k=3, feature_dim=3, mini_batch_size=256, epochs=2, seed=11)
    streamed = WebScaleKMeans.from_hyperparameters(hp).fit(
        ParquetBatchSource(tmp_path / "x.parquet"), test=ParquetBatchSource(tmp_path / "x.parquet")
    )
    in_memory = WebScaleKMeans.from_hyperparameters(hp).fit(X, test=ArrayBatchSource(X))
    np.testing.assert_array_equal(streamed.cluster_centers_, in_memory.cluster_centers_)
    np.testing.assert_array_equal(streamed.local_weights_, in_memory.local_weights_)
    assert streamed.metrics_ == in_memory.metrics_


def test_float32_and_float64_inputs_agree(workshop_matrix: np.ndarray) -> None:
    a = fit(workshop_matrix, k=10, seed=3)
    b = fit(workshop_matrix.astype(np.float64), k=10, seed=3)
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)


# --- callbacks --------------------------------------------------------------------------------


def test_progress_is_monotone_and_reaches_the_total() -> None:
    X = np.random.default_rng(0).normal(size=(1050, 2))
    calls: list[tuple[int, int]] = []
    hp = KMeansHyperparameters(k=3, feature_dim=2, mini_batch_size=100, epochs=3, seed=0)
    WebScaleKMeans.from_hyperparameters(hp).fit(X, progress=lambda done, total: calls.append((done, total)))
    assert len(calls) == 33
    assert {total for _, total in calls} == {3150}
    done = [d for d, _ in calls]
    assert done == sorted(done) and done[-1] == 3150 and done[0] == 100


def test_stop_request_raises_and_leaves_the_model_unfitted() -> None:
    X = np.random.default_rng(0).normal(size=(1000, 2))
    checks = 0

    def should_stop() -> bool:
        nonlocal checks
        checks += 1
        return checks > 4

    model = WebScaleKMeans.from_hyperparameters(KMeansHyperparameters(k=3, feature_dim=2, mini_batch_size=100, seed=0))
    with pytest.raises(TrainingStopped) as caught:
        model.fit(X, should_stop=should_stop)
    assert caught.value.points_processed == 400
    with pytest.raises(NotFittedError):
        model.predict(X)


def test_stop_is_also_honoured_during_evaluation() -> None:
    X = np.random.default_rng(0).normal(size=(500, 2))
    checks = 0

    def should_stop() -> bool:
        nonlocal checks
        checks += 1
        return checks > 5  # 5 training batches, then the evaluation pass

    hp = KMeansHyperparameters(k=3, feature_dim=2, mini_batch_size=100, seed=0)
    with pytest.raises(TrainingStopped):
        WebScaleKMeans.from_hyperparameters(hp).fit(X, should_stop=should_stop)


# --- input validation -------------------------------------------------------------------------


def test_non_finite_values_are_located() -> None:
    X = np.random.default_rng(0).normal(size=(1000, 2))
    X[734, 1] = np.inf
    with pytest.raises(EngineInputError, match="training batch 7: non-finite value inf at row 734, column 1"):
        fit(X, k=3, mini_batch_size=100)


def test_non_finite_test_data_is_rejected() -> None:
    X = np.random.default_rng(0).normal(size=(100, 2))
    with pytest.raises(EngineInputError, match="test batch 0: non-finite value nan"):
        WebScaleKMeans.from_hyperparameters(KMeansHyperparameters(k=3, feature_dim=2)).fit(X, test=[[np.nan, 0.0]])


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        (np.empty((0, 2)), EngineInputError, "training data has no rows"),
        (np.zeros((10, 3)), EngineInputError, "training data has 3 columns but feature_dim is 2"),
        (
            np.zeros((2, 2)),
            HyperparameterError,
            r"k: must be <= the number of training rows \(2\), got 3",
        ),
        (np.zeros(5), EngineInputError, "Expected 2D array"),
    ],
)
def test_bad_training_data(data: np.ndarray, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        WebScaleKMeans.from_hyperparameters(KMeansHyperparameters(k=3, feature_dim=2)).fit(data)


def test_bad_test_data() -> None:
    X = np.zeros((10, 2))
    model = WebScaleKMeans.from_hyperparameters(KMeansHyperparameters(k=3, feature_dim=2))
    with pytest.raises(EngineInputError, match="test data has 3 columns but feature_dim is 2"):
        model.fit(X, test=np.zeros((4, 3)))
    with pytest.raises(EngineInputError, match="test data has no rows"):
        model.fit(X, test=np.empty((0, 2)))


def test_predict_before_fit() -> None:
    with pytest.raises(NotFittedError):
        WebScaleKMeans.from_hyperparameters(KMeansHyperparameters(k=3, feature_dim=2)).transform([[0.0, 0.0]])


# --- properties -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # < k distinct points
@settings(max_examples=25, deadline=None)
@given(
    X=hnp.arrays(np.float64, st.tuples(st.integers(4, 60), st.integers(1, 4)), elements=st.floats(-100, 100)),
    k=st.integers(2, 4),
    mini_batch_size=st.integers(1, 70),
    epochs=st.integers(1, 2),
    init_method=st.sampled_from(["random", "kmeans++"]),
    half_life_time_size=st.sampled_from([0, 1, 50]),
)
def test_any_valid_input_gives_k_finite_centers_and_consistent_metrics(
    X: np.ndarray,
    k: int,
    mini_batch_size: int,
    epochs: int,
    init_method: str,
    half_life_time_size: int,
) -> None:
    hp = KMeansHyperparameters(
        k=k,
        feature_dim=X.shape[1],
        mini_batch_size=mini_batch_size,
        epochs=epochs,
        init_method=init_method,
        half_life_time_size=half_life_time_size,
        local_lloyd_num_trials=2,
        seed=0,
    )
    model = WebScaleKMeans.from_hyperparameters(hp).fit(X)
    assert model.cluster_centers_.shape == (k, X.shape[1])
    assert np.isfinite(model.cluster_centers_).all()
    assert sum(model.metrics_.cluster_sizes) == len(X)
    assert model.metrics_.train_msd == pytest.approx(msd(X, model.cluster_centers_), rel=1e-9, abs=1e-12)
    assert model.metrics_.train_ssd == pytest.approx(model.metrics_.train_msd * len(X))
