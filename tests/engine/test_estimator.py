"""WebScaleKMeans as a scikit-learn estimator: the estimator checks, clone / params, Pipeline,
GridSearchCV, fitted attributes, and equality with the service's ``from_hyperparameters`` path."""

from __future__ import annotations

import inspect
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.base import clone
from sklearn.datasets import make_blobs
from sklearn.exceptions import NotFittedError
from sklearn.metrics import pairwise_distances_argmin_min
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import estimator_checks_generator

from service.engine import (
    ArrayBatchSource,
    EngineInputError,
    HyperparameterError,
    KMeansHyperparameters,
    ParquetBatchSource,
    TrainingStopped,
    WebScaleKMeans,
)

# Checks that fail on purpose, and why. Strict: a check listed here that starts passing fails
# the run, so the list cannot go stale.
EXPECTED_FAILED_CHECKS = {
    "check_estimators_nan_inf": (
        "NaN/inf are refused with the engine's EngineInputError (a ValueError) locating the first bad "
        "value, e.g. 'training batch 0: non-finite value nan at row 0, column 1' (the same message for "
        "in-memory and streamed data); the check wants the words 'NaN' or 'inf' in that case, and "
        "'nan' is lower-case"
    ),
    "check_fit2d_1sample": (
        "fewer training rows than k is the engine's HyperparameterError, worded as SageMaker's "
        "parameter rule ('k: must be <= the number of training rows (1), got 3'), not with the "
        "'1 sample' wording the check looks for"
    ),
}


# Checks that do not apply here, and why; they are left out of the run rather than skipped (a
# skip fails CI, see tests/ci_rules.py).
NOT_APPLICABLE = {
    "check_array_api_input": (
        "checks estimators that accept Array API inputs (CuPy, torch); the engine is numpy-only by "
        "design, and the check needs SCIPY_ARRAY_API=1 set before scipy is imported"
    ),
}


def _check_name(check: Any) -> str:
    function = getattr(check, "func", check)
    return str(function.__name__)


def _estimator_checks() -> list[Any]:
    """One pytest param per check; the expected failures come marked xfail (strict)."""
    params = []
    for item in estimator_checks_generator(
        WebScaleKMeans(k=3, seed=0), expected_failed_checks=EXPECTED_FAILED_CHECKS, mark="xfail", xfail_strict=True
    ):
        values, marks = (item.values, item.marks) if hasattr(item, "marks") else (item, ())
        estimator, check = values
        if _check_name(check) not in NOT_APPLICABLE:
            params.append(pytest.param(estimator, check, id=_check_name(check), marks=marks))
    return params


ESTIMATOR_CHECKS = _estimator_checks()


def test_the_estimator_checks_are_all_accounted_for() -> None:
    every = [_check_name(check) for _, check in estimator_checks_generator(WebScaleKMeans(k=3, seed=0))]
    assert set(EXPECTED_FAILED_CHECKS) <= set(every) and set(NOT_APPLICABLE) <= set(every)
    left_out = sum(name in NOT_APPLICABLE for name in every)
    assert len(ESTIMATOR_CHECKS) == len(every) - left_out >= 50


@pytest.mark.parametrize(("estimator", "check"), ESTIMATOR_CHECKS)
def test_scikit_learn_estimator_checks(estimator: WebScaleKMeans, check: Any) -> None:
    check(estimator)


@pytest.fixture(scope="module")
def blobs3() -> tuple[np.ndarray, np.ndarray]:
    X, y = make_blobs(n_samples=600, centers=3, n_features=4, cluster_std=1.0, random_state=2)
    return X, y


# --- parameters ---------------------------------------------------------------------------------


def test_parameters_are_the_hyperparameters_with_their_defaults() -> None:
    signature = inspect.signature(WebScaleKMeans.__init__).parameters
    names = [name for name in signature if name != "self"]
    assert names == [f.name for f in fields(KMeansHyperparameters)]
    assert all(signature[name].kind is inspect.Parameter.KEYWORD_ONLY for name in names)
    defaults = WebScaleKMeans().get_params()
    assert defaults.pop("k") == 8  # SageMaker has no default: scikit-learn's KMeans's
    assert defaults.pop("feature_dim") is None  # taken from the data
    for f in fields(KMeansHyperparameters):
        if f.name in defaults:
            assert defaults[f.name] == f.default, f.name


def test_init_only_stores_and_fit_validates() -> None:
    model = WebScaleKMeans(k=1, epochs="x", local_lloyd_tol=5)  # type: ignore[arg-type]
    assert model.get_params()["epochs"] == "x"
    with pytest.raises(HyperparameterError) as caught:
        model.fit(np.zeros((10, 2)))
    with pytest.raises(HyperparameterError) as expected:
        KMeansHyperparameters(k=1, feature_dim=2, epochs="x", local_lloyd_tol=5)  # type: ignore[arg-type]
    assert str(caught.value) == str(expected.value)
    assert caught.value.errors == expected.value.errors
    assert not hasattr(model, "n_features_in_")


def test_clone_and_params_round_trip() -> None:
    model = WebScaleKMeans(k=4, mini_batch_size=100, eval_metrics=["msd", "ssd"], seed=3)
    params = model.get_params()
    assert clone(model).get_params() == params
    other = WebScaleKMeans().set_params(**params)
    assert other.get_params() == params
    assert other.set_params(k=5).get_params()["k"] == 5
    X = np.random.default_rng(0).normal(size=(300, 2))
    fitted = model.fit(X)
    copy = clone(fitted)
    assert copy.get_params() == params and not hasattr(copy, "cluster_centers_")
    assert fitted.hyperparameters_.eval_metrics == ("msd", "ssd")  # normalized in the validated copy only
    assert fitted.get_params()["eval_metrics"] == ["msd", "ssd"]


def test_from_hyperparameters_keeps_every_field() -> None:
    hp = KMeansHyperparameters.from_mapping(
        {"k": "4", "feature_dim": "2", "epochs": "2", "seed": "5", "force_dense": "True", "_num_gpus": "auto"}
    )
    model = WebScaleKMeans.from_hyperparameters(hp)
    assert model.get_params() == {f.name: getattr(hp, f.name) for f in fields(hp)}
    model.fit(np.random.default_rng(0).normal(size=(100, 2)))
    assert model.hyperparameters_ == hp


# --- results --------------------------------------------------------------------------------------


def test_results_are_bit_identical_to_from_hyperparameters(blobs3: tuple[np.ndarray, np.ndarray]) -> None:
    X, _ = blobs3
    settings = {"k": 3, "mini_batch_size": 64, "epochs": 2, "init_method": "kmeans++", "seed": 7}
    keywords = WebScaleKMeans(**settings).fit(X, test=X[:50])  # type: ignore[arg-type]
    hp = KMeansHyperparameters(feature_dim=X.shape[1], eval_metrics=("msd",), **settings)  # type: ignore[arg-type]
    service = WebScaleKMeans.from_hyperparameters(hp).fit(X, test=X[:50])
    for name in ("cluster_centers_", "local_centers_", "local_weights_", "cluster_sizes_", "labels_"):
        np.testing.assert_array_equal(getattr(keywords, name), getattr(service, name))
    assert keywords.metrics_ == service.metrics_
    assert keywords.inertia_ == service.inertia_
    assert keywords.hyperparameters_ == service.hyperparameters_ == hp


def test_fitted_attributes(blobs3: tuple[np.ndarray, np.ndarray]) -> None:
    X, _ = blobs3
    model = WebScaleKMeans(k=3, mini_batch_size=100, epochs=3, seed=0).fit(X)
    assert model.n_features_in_ == 4 and not hasattr(model, "feature_names_in_")
    assert model.hyperparameters_.feature_dim == 4
    assert model.n_iter_ == 3 and model.n_steps_ == 3 * 6
    assert model.labels_.shape == (600,) and model.labels_.dtype == np.int64
    np.testing.assert_array_equal(model.labels_, model.predict(X))
    np.testing.assert_array_equal(np.bincount(model.labels_, minlength=3), model.cluster_sizes_)
    # inertia_: the training ssd, as scikit-learn computes it for these labels and centers
    centers = model.cluster_centers_.astype(np.float64)
    labels, distances = pairwise_distances_argmin_min(X, centers)
    np.testing.assert_array_equal(labels, model.labels_)
    assert model.inertia_ == pytest.approx(float((distances**2).sum()), rel=1e-9)
    assert model.inertia_ == pytest.approx(float(((X - centers[model.labels_]) ** 2).sum()), rel=1e-12)
    assert model.inertia_ == model.metrics_.train_ssd


def test_feature_dim_is_inferred_or_checked() -> None:
    X = np.random.default_rng(0).normal(size=(200, 3))
    assert WebScaleKMeans(k=2, seed=0).fit(X).hyperparameters_.feature_dim == 3
    assert WebScaleKMeans(k=2, feature_dim="3", seed=0).fit(X).hyperparameters_.feature_dim == 3  # type: ignore[arg-type]
    model = WebScaleKMeans(k=2, feature_dim=4)
    with pytest.raises(EngineInputError, match="training data has 3 columns but feature_dim is 4"):
        model.fit(X)
    assert not hasattr(model, "n_features_in_")  # a failed fit leaves the estimator as it was
    with pytest.raises(HyperparameterError, match="feature_dim: must be an integer >= 1"):
        WebScaleKMeans(k=2, feature_dim=0).fit(X)
    with pytest.raises(EngineInputError, match="test data has 2 columns but feature_dim is 3"):
        WebScaleKMeans(k=2).fit(X, test=X[:, :2])


def test_fit_predict_score_and_predict_with_distances(blobs3: tuple[np.ndarray, np.ndarray]) -> None:
    X, _ = blobs3
    model = WebScaleKMeans(k=3, seed=1)
    labels = model.fit_predict(X)
    np.testing.assert_array_equal(labels, model.labels_)
    np.testing.assert_array_equal(labels, WebScaleKMeans(k=3, seed=1).fit(X).labels_)
    assert model.score(X) == pytest.approx(-model.inertia_, rel=1e-12)
    new = X[:40] + 0.25
    _, distances = pairwise_distances_argmin_min(new, model.cluster_centers_.astype(np.float64))
    assert model.score(new) == pytest.approx(-float((distances**2).sum()), rel=1e-9)
    prediction = model.predict_with_distances(new)
    np.testing.assert_array_equal(prediction.closest_cluster, model.predict(new))
    np.testing.assert_allclose(prediction.distance_to_cluster, distances, rtol=1e-12)
    np.testing.assert_allclose(model.transform(new).min(axis=1), distances, rtol=1e-9)
    assert list(model.get_feature_names_out()) == ["webscalekmeans0", "webscalekmeans1", "webscalekmeans2"]


def test_unfitted_estimator_refuses_to_predict() -> None:
    model = WebScaleKMeans(k=2)
    for method in (model.predict, model.predict_with_distances, model.transform, model.score):
        with pytest.raises(NotFittedError):
            method([[0.0, 0.0]])
    with pytest.raises(NotFittedError):
        model.state_  # noqa: B018


# --- scikit-learn composition ---------------------------------------------------------------------


def test_pipeline_with_a_scaler(blobs3: tuple[np.ndarray, np.ndarray]) -> None:
    X, y = blobs3
    pipeline = make_pipeline(StandardScaler(), WebScaleKMeans(k=3, seed=0)).fit(X)
    scaled = StandardScaler().fit_transform(X)
    alone = WebScaleKMeans(k=3, seed=0).fit(scaled)
    np.testing.assert_array_equal(pipeline.predict(X), alone.predict(scaled))
    np.testing.assert_array_equal(pipeline[-1].labels_, alone.labels_)
    np.testing.assert_array_equal(pipeline.fit_predict(X), alone.labels_)
    assert pipeline.transform(X).shape == (600, 3)


def neg_msd(estimator: Any, X: np.ndarray, y: object = None) -> float:
    """Held-out mean squared distance to the closest center, negated (higher is better)."""
    return float(estimator.score(X)) / len(X)


def test_grid_search_over_k(blobs3: tuple[np.ndarray, np.ndarray]) -> None:
    X, _ = blobs3
    search = GridSearchCV(WebScaleKMeans(seed=0), {"k": [2, 3, 4]}, scoring=neg_msd, cv=3).fit(X)
    scores = search.cv_results_["mean_test_score"]
    assert scores[1] > scores[0]  # three blobs: k=3 is far better than k=2
    assert search.best_params_["k"] in (3, 4)
    assert search.best_estimator_.cluster_centers_.shape == (search.best_params_["k"], 4)
    default_scoring = GridSearchCV(WebScaleKMeans(seed=0), {"k": [2, 3]}, cv=2).fit(X)  # score(): -ssd
    assert default_scoring.best_params_ == {"k": 3}


def test_dataframes_give_feature_names_and_pandas_output(blobs3: tuple[np.ndarray, np.ndarray]) -> None:
    X, _ = blobs3
    frame = pd.DataFrame(X, columns=["a", "b", "c", "d"])
    model = WebScaleKMeans(k=3, seed=0).fit(frame)
    assert list(model.feature_names_in_) == ["a", "b", "c", "d"]
    np.testing.assert_array_equal(model.cluster_centers_, WebScaleKMeans(k=3, seed=0).fit(X).cluster_centers_)
    np.testing.assert_array_equal(model.predict(frame), model.labels_)
    with pytest.raises(ValueError, match="feature names should match"):
        model.predict(frame[["b", "a", "c", "d"]])
    distances = model.set_output(transform="pandas").transform(frame)
    assert isinstance(distances, pd.DataFrame)
    assert list(distances.columns) == ["webscalekmeans0", "webscalekmeans1", "webscalekmeans2"]


# --- streamed data --------------------------------------------------------------------------------


def test_a_batch_source_fit_keeps_no_labels(tmp_path: Path, blobs3: tuple[np.ndarray, np.ndarray]) -> None:
    X, _ = blobs3
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({f"c{i}": X[:, i] for i in range(4)}), path, row_group_size=128)
    in_memory = WebScaleKMeans(k=3, mini_batch_size=50, seed=4).fit(pd.DataFrame(X, columns=list("abcd")))
    assert hasattr(in_memory, "labels_") and hasattr(in_memory, "feature_names_in_")
    streamed = in_memory.fit(ParquetBatchSource(path))  # refitting drops the earlier fit's labels and names
    assert not hasattr(streamed, "labels_") and not hasattr(streamed, "feature_names_in_")
    assert streamed.n_features_in_ == 4
    np.testing.assert_array_equal(
        streamed.cluster_centers_, WebScaleKMeans(k=3, mini_batch_size=50, seed=4).fit(X).cluster_centers_
    )
    assert not hasattr(WebScaleKMeans(k=3, seed=4).fit(ArrayBatchSource(X)), "labels_")
    # fit_predict asks for the labels: collected in the same evaluation pass
    model = WebScaleKMeans(k=3, mini_batch_size=50, seed=4)
    labels = model.fit_predict(ParquetBatchSource(path))
    np.testing.assert_array_equal(labels, model.predict(X))
    np.testing.assert_array_equal(labels, model.labels_)


def test_a_stopped_fit_keeps_the_previous_fit(blobs3: tuple[np.ndarray, np.ndarray]) -> None:
    X, _ = blobs3
    model = WebScaleKMeans(k=3, seed=0).fit(X)
    before = {name: getattr(model, name) for name in ("cluster_centers_", "labels_", "n_features_in_")}
    with pytest.raises(TrainingStopped):
        model.fit(pd.DataFrame(X[:, :2], columns=["a", "b"]), should_stop=lambda: True)
    assert not hasattr(model, "feature_names_in_")
    for name, value in before.items():
        assert getattr(model, name) is value
