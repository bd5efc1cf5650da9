"""predict() agrees with brute force, reports Euclidean distances and validates its input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from threadpoolctl import threadpool_limits

from service.engine import EngineInputError, predict
from service.engine.predict import CenterIndex


def brute_force(X: np.ndarray, centers: np.ndarray) -> np.ndarray:
    return np.linalg.norm(X[:, None, :] - centers[None, :, :], axis=2)


def assert_matches_brute_force(X: np.ndarray, centers: np.ndarray) -> None:
    result = predict(X, centers, all_distances=True)
    expected = brute_force(X.astype(np.float64), centers.astype(np.float64))
    best = expected.min(axis=1)
    chosen = expected[np.arange(len(X)), result.closest_cluster]
    # The chosen center is the closest up to float64 rounding (exact ties may go either way in
    # brute force, which sums in a different order); where the minimum is clear, labels agree.
    np.testing.assert_allclose(chosen, best, rtol=1e-12, atol=1e-12)
    ranked = np.sort(expected, axis=1)
    clear = ranked[:, 1] - ranked[:, 0] > 1e-9 * (1 + ranked[:, 0]) if len(centers) > 1 else np.ones(len(X), bool)
    np.testing.assert_array_equal(result.closest_cluster[clear], expected.argmin(axis=1)[clear])
    np.testing.assert_allclose(result.distance_to_cluster, best, rtol=1e-12, atol=1e-12)
    assert result.distances is not None
    np.testing.assert_allclose(result.distances, expected, rtol=1e-6, atol=1e-6 * (1 + np.abs(X).max()))


def test_matches_brute_force_on_random_data() -> None:
    rng = np.random.default_rng(1)
    X, centers = rng.normal(size=(500, 7)), rng.normal(size=(13, 7))
    assert_matches_brute_force(X, centers)


def test_distances_are_euclidean_not_squared() -> None:
    result = predict([[3.0, 4.0], [0.0, 0.0]], [[0.0, 0.0], [10.0, 10.0]])
    np.testing.assert_array_equal(result.closest_cluster, [0, 0])
    np.testing.assert_array_equal(result.distance_to_cluster, [5.0, 0.0])
    assert result.distances is None


def test_ties_go_to_the_lowest_center_index() -> None:
    centers = np.array([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0]])
    result = predict(np.array([[0.0, 0.0], [0.0, 5.0], [2.0, 0.0]]), centers)
    np.testing.assert_array_equal(result.closest_cluster, [0, 0, 0])


def test_offset_data_keeps_full_precision() -> None:
    """Values far from the origin (1e7 + small spread) must not confuse the float32 fast pass."""
    rng = np.random.default_rng(2)
    centers = 1e7 + rng.normal(size=(20, 3))
    X = 1e7 + rng.normal(size=(2000, 3))
    assert_matches_brute_force(X, centers)


def test_huge_values_fall_back_to_float64() -> None:
    centers = np.array([[0.0, 0.0], [1e30, 1e30]])
    result = predict(np.array([[1e29, 1e29], [9e29, 9e29]]), centers)
    np.testing.assert_array_equal(result.closest_cluster, [0, 1])


@pytest.mark.slow
def test_large_inputs_are_chunked() -> None:
    rng = np.random.default_rng(3)
    X, centers = (
        rng.normal(size=(9000, 4)),
        rng.normal(size=(700, 4)),
    )  # > one chunk of rows x centers
    assert_matches_brute_force(X, centers)


def test_integer_data_with_many_exact_ties() -> None:
    rng = np.random.default_rng(4)
    X = rng.integers(0, 3, size=(3000, 6)).astype(float)
    centers = X[rng.integers(0, len(X), size=40)]
    labels = CenterIndex(centers).nearest(X)
    squared = ((X[:, None, :] - centers[None]) ** 2).sum(axis=2)  # exact: small integers
    np.testing.assert_array_equal(labels, squared.argmin(axis=1))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["integers", "offset", "heavy-tailed", "near-duplicates"])
def test_labels_are_the_exact_float64_argmin_whatever_the_threads(kind: str) -> None:
    """The float32 fast pass plus exact re-decision equals a float64 argmin of ‖x − c‖² (first
    index on ties) on adversarial data, with any BLAS thread count."""
    rng = np.random.default_rng(len(kind))
    X = {
        "integers": rng.integers(0, 4, size=(3000, 40)) * 1e-3 + 1e6,
        "offset": rng.normal(size=(3000, 40)) * 1e-3 - 1e9,
        "heavy-tailed": rng.standard_cauchy(size=(3000, 40)),
        "near-duplicates": rng.normal(size=(3000, 40)),
    }[kind]
    centers = X[rng.integers(0, len(X), size=300)]
    if kind == "near-duplicates":
        centers = np.vstack([centers, centers + 1e-9])
    labels = CenterIndex(centers).nearest(X)
    with threadpool_limits(limits=1):
        np.testing.assert_array_equal(CenterIndex(centers).nearest(X), labels)
    diff = X[:, None, :] - centers[None, :, :]
    np.testing.assert_array_equal(labels, np.einsum("ijk,ijk->ij", diff, diff).argmin(axis=1))


@settings(max_examples=60, deadline=None)
@given(
    X=hnp.arrays(
        np.float64,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=40),
        elements=st.floats(-1e3, 1e3),
    ),
    k=st.integers(1, 12),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_matches_brute_force(X: np.ndarray, k: int, seed: int) -> None:
    centers = np.random.default_rng(seed).uniform(-1e3, 1e3, size=(k, X.shape[1]))
    assert_matches_brute_force(X, centers)


def test_empty_input_gives_empty_prediction() -> None:
    result = predict(np.empty((0, 2)), [[0.0, 0.0], [1.0, 1.0]], all_distances=True)
    assert result.closest_cluster.shape == (0,) and result.distances is not None and result.distances.shape == (0, 2)


@pytest.mark.parametrize(
    ("X", "centers", "message"),
    [
        ([[1.0, 2.0, 3.0]], [[0.0, 0.0]], "has 3 features but the model has 2"),
        ([1.0, 2.0], [[0.0, 0.0]], "must be a 2-D matrix"),
        ([[1.0, np.nan]], [[0.0, 0.0]], "non-finite value nan at row 0, column 1"),
        ([[1.0, np.inf]], [[0.0, 0.0]], "non-finite value inf"),
        ([["a", "b"]], [[0.0, 0.0]], "must be numeric"),
        ([[1.0, 2.0]], np.empty((0, 2)), "non-empty"),
        ([[1.0, 2.0]], [0.0, 0.0], "non-empty"),
        ([[1.0, 2.0]], [[np.nan, 0.0]], "centers: non-finite"),
    ],
)
def test_invalid_input_raises_engine_input_error(X: object, centers: object, message: str) -> None:
    with pytest.raises(EngineInputError, match=message):
        predict(X, centers)  # type: ignore[arg-type]
