"""Web-scale (mini-batch) k-means as SageMaker's built-in KMeans documents it.

1. **Initialize** K = k x extra_center_factor local centers from the first mini-batch (``random``
   distinct rows, or scikit-learn's ``kmeans_plusplus``). When ``mini_batch_size`` < K the first
   ``K`` rows are used instead, and K never exceeds the number of rows.
2. **Stream** ``epochs`` passes of mini-batches. Each point goes to its nearest local center; a
   center with running count n that receives m points with mean d moves to
   (1 - p) c + p d with p = m / (n + m). With ``half_life_time_size`` h > 0 every count is first
   multiplied by 2^(-b/h) for a batch of b points, so old points weigh less. Each initial center
   starts with weight 1, as SageMaker's do (its seeding row counts once; the evidence, from real
   ``state_<uuid>`` files, is in docs/engine.md), and the first batch, which also seeded them, is
   then streamed like any other — no point is skipped.
3. **Reduce** the K weighted centers to k with scikit-learn's weighted Lloyd ``KMeans``, best of
   ``local_lloyd_num_trials`` seeded trials by weighted inertia.
4. **Evaluate** SageMaker's ``train:msd`` (the local centers' weighted mean squared distance to
   the final centers: the best trial's figure), then msd / ssd / cluster sizes of the final
   centers in one more streaming pass over the training data (and the optional test data); see
   metrics.py for the names they are reported under.

Stopping: ``should_stop()`` is asked between slices of at most about :data:`WORK_PER_CHECK`
multiply-adds everywhere a fit spends time — within every mini-batch of every pass, before each
reduction trial and between groups of Lloyd iterations, and within every evaluation batch — so a
stop (or a worker's shutdown) takes effect within milliseconds to a fraction of a second. The
only steps not split are scikit-learn's k-means++ seedings (``init_method`` and
``local_lloyd_init_method`` = ``kmeans++``) and, in a reduction so large that one Lloyd iteration
exceeds that work, a group of MIN_LLOYD_GROUP iterations; their size is bounded by the
hyperparameters' ceilings.

:class:`WebScaleKMeans` is a scikit-learn estimator whose parameters are these hyperparameters; see
its docstring for validation, the fitted attributes and why ``labels_`` exists only for in-memory
training data.

Memory is O(mini_batch_size x d + K x d): data only ever arrives one mini-batch at a time. Center
updates and metrics are float64 (nearest centers are ranked by a float32 BLAS pass whose close
calls are re-decided in float64, see predict.py); the returned centers are float32 like SageMaker's
model. With a seed, results are bit-identical across runs, thread counts and storage (array or
Parquet) for the same batch order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np
from numpy.typing import ArrayLike
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, ClusterMixin, TransformerMixin
from sklearn.cluster import KMeans, kmeans_plusplus
from sklearn.utils import Tags
from sklearn.utils.validation import check_is_fitted, validate_data
from threadpoolctl import threadpool_limits

from service.engine.errors import EngineInputError, TrainingStopped
from service.engine.hyperparameters import AUTO, Auto, Extras, KMeansHyperparameters
from service.engine.metrics import ClusterAccumulator, TrainingMetrics
from service.engine.mxnet_format import ModelState
from service.engine.predict import CenterIndex, Prediction, as_feature_matrix, predict
from service.engine.sources import ArrayBatchSource, BatchSource, as_batch_source, checked_batches

ProgressCallback = Callable[[int, int], None]
StopCallback = Callable[[], bool]
SeedLike = int | np.random.SeedSequence | None

# Multiply-adds (rows x centers x features) of work between two stop checks: tens of milliseconds.
WORK_PER_CHECK = 1 << 25
# Fewest Lloyd iterations per group. A group that converges stops early, which is how the end of
# a run is seen: a group continuing from converged centers stops after 1 iteration (2 with
# local_lloyd_tol = 0, the labels must repeat), so 3 always tells.
MIN_LLOYD_GROUP = 3
# k when none is given: scikit-learn's KMeans default (SageMaker has no default; it requires k).
DEFAULT_K = 8
# What scikit-learn's validate_data sets from an input matrix; a failed fit puts them back.
_INPUT_ATTRIBUTES = ("n_features_in_", "feature_names_in_")


class WebScaleKMeans(ClassNamePrefixFeaturesOutMixin, TransformerMixin, ClusterMixin, BaseEstimator):
    """SageMaker-compatible web-scale k-means as a scikit-learn estimator.

    The keyword parameters are SageMaker KMeans's hyperparameters, named and defaulted exactly as
    :class:`KMeansHyperparameters` (plus its ``seed`` and ``sagemaker_extras``), with two
    differences: ``k`` defaults to 8 (scikit-learn's ``KMeans`` default; SageMaker has none and
    :meth:`KMeansHyperparameters.from_mapping` still requires it) and ``feature_dim`` defaults to
    None, which takes it from the training data. As scikit-learn requires, ``__init__`` only
    stores them (so ``clone``, ``get_params`` / ``set_params``, ``Pipeline`` and ``GridSearchCV``
    work); :meth:`fit` validates them by building a :class:`KMeansHyperparameters`, raising the
    same ``HyperparameterError`` as that class, and keeps it as ``hyperparameters_``. A
    ``feature_dim`` that is given and differs from the data's width raises EngineInputError.
    The service builds the estimator with :meth:`from_hyperparameters`. ``seed=None`` fits are
    not reproducible (the estimator's tags say ``non_deterministic`` then); ``seed`` plays the
    role of scikit-learn's ``random_state`` but keeps Centroid's name.

    ``X`` is an in-memory matrix (numpy, pandas, lists), checked with scikit-learn's
    ``validate_data`` (a DataFrame's column names become ``feature_names_in_``, checked again by
    ``predict`` / ``transform`` / ``score``), or a :class:`BatchSource` streamed as is (Parquet
    files of any size). Data errors are EngineInputError (a ValueError); non-numeric values
    inside an object array stay numpy's TypeError.

    Fitted attributes:

    * ``cluster_centers_`` (k, d) float32, the SageMaker model; ``cluster_sizes_`` (k,) int64
      training rows closest to each center; ``local_centers_`` (K, d) float64 and
      ``local_weights_`` (K,) the mini-batch stage's centers before the reduction (``state_``);
      ``metrics_`` (:class:`TrainingMetrics`); ``hyperparameters_`` (validated, ``feature_dim``
      filled in).
    * ``inertia_``: the sum of squared distances of the training rows to their closest center
      (``metrics_.train_ssd``, from the evaluation pass); ``n_iter_``: passes over the data
      (``epochs``); ``n_steps_``: mini-batches streamed (``epochs`` x batches per pass).
    * ``n_features_in_`` always; ``feature_names_in_`` only when ``X`` was a DataFrame with
      string column names (a BatchSource's columns are not taken as feature names, so predicting
      on plain arrays afterwards does not warn).
    * ``labels_`` (n,) int64 — **only when X is an in-memory matrix**. The labels are collected
      during the evaluation pass the fit makes anyway (no extra pass) and cost 8 bytes a row,
      next to the matrix the caller already holds. A :class:`BatchSource` (including an
      explicit ``ArrayBatchSource``) exists so that memory does not grow with the rows — a
      streamed Parquet file of millions of rows trains in O(mini_batch_size x d + K x d) — so a
      fit on one sets no ``labels_`` (and removes the ``labels_`` of an earlier fit). To label
      streamed data, ``predict`` it batch by batch (bounded memory), or call
      :meth:`fit_predict`, which asks for the labels explicitly and collects them during the
      same evaluation pass.
    """

    cluster_centers_: np.ndarray  # (k, d) float32
    cluster_sizes_: np.ndarray  # (k,) int64 training points closest to each center
    local_centers_: np.ndarray  # (K, d) float64 centers before the reduction to k
    local_weights_: np.ndarray  # (K,) float64 weights: 1 + points received (decayed)
    metrics_: TrainingMetrics
    hyperparameters_: KMeansHyperparameters
    inertia_: float
    n_iter_: int
    n_steps_: int
    n_features_in_: int
    labels_: np.ndarray  # (n,) int64; set only for in-memory training data, see above

    def __init__(
        self,
        *,
        k: int = DEFAULT_K,
        feature_dim: int | None = None,
        mini_batch_size: int = 5000,
        epochs: int = 1,
        init_method: str = "random",
        extra_center_factor: Auto = AUTO,
        local_lloyd_max_iter: int = 300,
        local_lloyd_tol: float = 0.0001,
        local_lloyd_init_method: str = "kmeans++",
        local_lloyd_num_trials: Auto = AUTO,
        half_life_time_size: int = 0,
        eval_metrics: Sequence[str] = ("msd",),
        seed: int | None = None,
        sagemaker_extras: Extras | Mapping[str, object] = (),
    ) -> None:
        self.k = k
        self.feature_dim = feature_dim
        self.mini_batch_size = mini_batch_size
        self.epochs = epochs
        self.init_method = init_method
        self.extra_center_factor = extra_center_factor
        self.local_lloyd_max_iter = local_lloyd_max_iter
        self.local_lloyd_tol = local_lloyd_tol
        self.local_lloyd_init_method = local_lloyd_init_method
        self.local_lloyd_num_trials = local_lloyd_num_trials
        self.half_life_time_size = half_life_time_size
        self.eval_metrics = eval_metrics
        self.seed = seed
        self.sagemaker_extras = sagemaker_extras

    @classmethod
    def from_hyperparameters(cls, hyperparameters: KMeansHyperparameters) -> WebScaleKMeans:
        """An estimator with every hyperparameter of ``hyperparameters`` (``feature_dim`` included,
        so data of another width is refused): what the service trains with."""
        return cls(**{f.name: getattr(hyperparameters, f.name) for f in fields(hyperparameters)})

    def fit(
        self,
        X: BatchSource | ArrayLike,
        y: object = None,
        *,
        test: BatchSource | ArrayLike | None = None,
        progress: ProgressCallback | None = None,
        should_stop: StopCallback | None = None,
    ) -> WebScaleKMeans:
        """Train on ``X`` (a matrix or a re-iterable BatchSource); optionally score ``test``.

        ``y`` is ignored (scikit-learn's API). ``progress(points_done, total)`` runs after every
        training mini-batch, with total = rows x epochs; the final evaluation pass is not
        reported. ``should_stop()`` is checked before every mini-batch of every pass and between
        slices of every long step (see the module docstring); when it returns True,
        TrainingStopped is raised. A fit that raises, for any reason, leaves the estimator as it
        was (fitted attributes, ``n_features_in_`` and ``feature_names_in_`` included).
        """
        return self._fit(X, test, progress, should_stop, keep_labels=not isinstance(X, BatchSource))

    def fit_predict(
        self,
        X: BatchSource | ArrayLike,
        y: object = None,
        *,
        test: BatchSource | ArrayLike | None = None,
        progress: ProgressCallback | None = None,
        should_stop: StopCallback | None = None,
    ) -> np.ndarray:
        """Fit, and return the training rows' labels (``labels_``), collected during the fit's
        evaluation pass: no extra pass, for a BatchSource too (then ``labels_`` is set as well,
        since the caller asked for one label per row)."""
        self._fit(X, test, progress, should_stop, keep_labels=True)
        return self.labels_

    def predict(self, X: ArrayLike) -> np.ndarray:
        """(n,) int64 index of the closest center for each row of ``X`` (first on ties)."""
        data = self._prediction_input(X)
        return CenterIndex(self.cluster_centers_).nearest(data)

    def predict_with_distances(self, X: ArrayLike) -> Prediction:
        """Closest cluster and Euclidean distance to it for each row of ``X`` (SageMaker's
        ``closest_cluster`` / ``distance_to_cluster``)."""
        return predict(self._prediction_input(X), self.cluster_centers_)

    def transform(self, X: ArrayLike) -> np.ndarray:
        """(n, k) Euclidean distances from each row of ``X`` to every center."""
        distances = predict(self._prediction_input(X), self.cluster_centers_, all_distances=True).distances
        assert distances is not None
        return distances

    def score(self, X: ArrayLike, y: object = None) -> float:
        """Minus the sum of squared distances of the rows of ``X`` to their closest center, as
        scikit-learn's ``KMeans.score`` (higher is better; on the training data, ``-inertia_``
        up to the order of summation)."""
        data = self._prediction_input(X)
        index = CenterIndex(self.cluster_centers_)
        return -float(index.squared_distances_to(data, index.nearest(data)).sum())

    @property
    def state_(self) -> ModelState:
        """The K local centers and their weights: what SageMaker's ``state_<uuid>`` member holds
        (``write_model_tar(model.cluster_centers_, model.state_)``)."""
        check_is_fitted(self, "local_centers_")
        return ModelState(centers=self.local_centers_, weights=self.local_weights_)

    @property
    def _n_features_out(self) -> int:
        """Columns of :meth:`transform` (one per center), for ``get_feature_names_out``."""
        return int(self.cluster_centers_.shape[0])

    def __sklearn_tags__(self) -> Tags:
        tags = super().__sklearn_tags__()
        tags.non_deterministic = self.seed is None
        return tags

    def _fit(
        self,
        X: BatchSource | ArrayLike,
        test: BatchSource | ArrayLike | None,
        progress: ProgressCallback | None,
        should_stop: StopCallback | None,
        *,
        keep_labels: bool,
    ) -> WebScaleKMeans:
        before = {name: self.__dict__[name] for name in _INPUT_ATTRIBUTES if name in self.__dict__}
        try:
            train = self._training_source(X)
            hp = self._hyperparameters_for(train)
            scored = None if test is None else _checked_source(as_batch_source(test), hp, "test")
            monitor = _Monitor(progress, should_stop, total=train.n_rows * hp.epochs)
            init_seed, reduce_seed = np.random.SeedSequence(hp.seed).spawn(2)
            state = _initial_state(train, hp, np.random.default_rng(init_seed))
            steps = 0
            for _ in range(hp.epochs):
                for batch in checked_batches(train, hp.mini_batch_size):
                    monitor.check()
                    state.update(batch, _decay(len(batch), hp.half_life_time_size), monitor.check)
                    monitor.advance(len(batch))
                    steps += 1
            centers = _reduce(state.centers, state.counts, hp, reduce_seed, monitor.check).astype(np.float32)
            reduction_msd = weighted_msd(state.centers, state.counts, centers, monitor.check)
            labels = np.empty(train.n_rows, dtype=np.int64) if keep_labels else None
            on_train = _evaluate(train, centers, hp.mini_batch_size, monitor, "training", labels)
            on_test = None if scored is None else _evaluate(scored, centers, hp.mini_batch_size, monitor, "test")
        except BaseException:
            for name in _INPUT_ATTRIBUTES:  # validate_data may have set them for this X
                self.__dict__.pop(name, None)
            self.__dict__.update(before)
            raise
        self._set_fitted(hp, train, centers, state, on_train, on_test, reduction_msd, labels, steps)
        return self

    def _training_source(self, X: BatchSource | ArrayLike) -> BatchSource:
        """``X`` as a BatchSource; an in-memory matrix goes through scikit-learn's validation."""
        if isinstance(X, BatchSource):
            self.__dict__.pop("feature_names_in_", None)  # from an earlier DataFrame fit
            return X
        return ArrayBatchSource(self._validated(X, reset=True))

    def _hyperparameters_for(self, train: BatchSource) -> KMeansHyperparameters:
        """The parameters validated as KMeansHyperparameters (HyperparameterError, as that class
        raises), ``feature_dim`` taken from the data if not given; then checked against it."""
        params = self.get_params(deep=False)
        if params["feature_dim"] is None:
            params["feature_dim"] = train.n_features
        hp = KMeansHyperparameters(**params)
        _checked_source(train, hp, "training")
        return hp

    def _prediction_input(self, X: ArrayLike) -> np.ndarray:
        """Prediction input checked against the fit (width, feature names) as finite float64."""
        check_is_fitted(self, "cluster_centers_")
        return as_feature_matrix(self._validated(X, reset=False), self.n_features_in_, "prediction input")

    def _validated(self, X: ArrayLike, *, reset: bool) -> np.ndarray:
        """scikit-learn's ``validate_data`` (2-D, numeric, dense, at least one column; sets or checks
        ``n_features_in_`` and ``feature_names_in_``) with its ValueErrors as EngineInputError.
        Values keep their dtype, so the engine converts them exactly as before, and finiteness
        (and an empty matrix) is left to the engine, whose errors locate the bad value."""
        try:
            return validate_data(self, X, reset=reset, dtype="numeric", ensure_all_finite=False, ensure_min_samples=0)
        except EngineInputError:
            raise
        except ValueError as exc:
            raise EngineInputError(str(exc)) from exc

    def _set_fitted(
        self,
        hp: KMeansHyperparameters,
        train: BatchSource,
        centers: np.ndarray,
        state: _LocalState,
        on_train: ClusterAccumulator,
        on_test: ClusterAccumulator | None,
        reduction_msd: float,
        labels: np.ndarray | None,
        steps: int,
    ) -> None:
        self.hyperparameters_ = hp
        self.n_features_in_ = train.n_features
        self.local_centers_ = state.centers
        self.local_weights_ = state.counts
        self.cluster_sizes_ = np.array(on_train.sizes, dtype=np.int64)
        self.metrics_ = TrainingMetrics(
            train_msd=on_train.msd,
            train_ssd=on_train.ssd,
            cluster_sizes=on_train.sizes,
            test_msd=None if on_test is None else on_test.msd,
            test_ssd=None if on_test is None else on_test.ssd,
            test_cluster_sizes=None if on_test is None else on_test.sizes,
            reduction_msd=reduction_msd,
        )
        self.inertia_ = on_train.ssd
        self.n_iter_ = hp.epochs
        self.n_steps_ = steps
        if labels is None:
            self.__dict__.pop("labels_", None)
        else:
            self.labels_ = labels
        self.cluster_centers_ = centers


@dataclass
class _LocalState:
    """The K local centers being streamed over, with their running (decayed) counts."""

    centers: np.ndarray  # (K, d) float64
    counts: np.ndarray  # (K,) float64
    origin: np.ndarray  # (d,) shift that keeps the float32 distance ranking precise

    def update(self, batch: np.ndarray, decay: float, check: Callable[[], None] = lambda: None) -> None:
        """Move every center that wins points towards their mean, by its share of the count.

        ``check`` runs between slices of the nearest-center search; nothing changes if it raises.
        """
        labels = nearest_in_slices(CenterIndex(self.centers, self.origin), batch, check)
        hit, sizes, means = _cluster_means(batch, labels)
        self.counts *= decay
        old = self.counts[hit]
        share = (sizes / (old + sizes))[:, None]
        self.centers[hit] = (1.0 - share) * self.centers[hit] + share * means
        self.counts[hit] = old + sizes


def _cluster_means(batch: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels present, their point counts, their mean points); sums run in row order."""
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    sizes = np.diff(np.r_[starts, len(labels)]).astype(np.float64)
    sums = np.add.reduceat(batch[order], starts, axis=0)
    return sorted_labels[starts], sizes, sums / sizes[:, None]


def nearest_in_slices(index: CenterIndex, batch: np.ndarray, check: Callable[[], None]) -> np.ndarray:
    """``index.nearest(batch)``, computed in row slices of about WORK_PER_CHECK with ``check()``
    between them. Labels do not depend on the slicing (see predict.py), so results are the same."""
    rows = max(1, WORK_PER_CHECK // max(1, len(index.centers) * batch.shape[1]))
    if len(batch) <= rows:
        return index.nearest(batch)
    labels = np.empty(len(batch), dtype=np.int64)
    for start in range(0, len(batch), rows):
        if start:
            check()
        labels[start : start + rows] = index.nearest(batch[start : start + rows])
    return labels


def _decay(batch_rows: int, half_life: int) -> float:
    return 2.0 ** (-batch_rows / half_life) if half_life else 1.0


def _initial_state(source: BatchSource, hp: KMeansHyperparameters, rng: np.random.Generator) -> _LocalState:
    requested = hp.k * hp.effective_extra_center_factor
    sample = _first_batch(source, min(source.n_rows, max(hp.mini_batch_size, requested)))
    n_centers = min(requested, len(sample))
    if hp.init_method == "kmeans++":
        seed = int(rng.integers(2**32))
        with threadpool_limits(limits=1):  # BLAS-thread-independent, hence reproducible
            centers, _ = kmeans_plusplus(sample, n_centers, random_state=seed)
    else:
        centers = sample[rng.choice(len(sample), size=n_centers, replace=False)]
    # Weight 1 each, like SageMaker's local centers (see the module docstring).
    return _LocalState(centers=centers.copy(), counts=np.ones(n_centers), origin=sample.mean(axis=0))


def _first_batch(source: BatchSource, rows: int) -> np.ndarray:
    batches = checked_batches(source, rows)
    try:
        return next(batches)
    finally:
        batches.close()


def reduce_centers(
    centers: np.ndarray,
    weights: np.ndarray,
    hyperparameters: KMeansHyperparameters,
    *,
    seed: SeedLike = None,
    should_stop: StopCallback | None = None,
) -> np.ndarray:
    """Reduce weighted local centers to ``k`` centers (float64) with scikit-learn's Lloyd KMeans.

    Runs ``local_lloyd_num_trials`` single-init trials with seeds derived from ``seed`` and keeps
    the lowest weighted inertia. Zero-weight centers are dropped unless fewer than k would remain,
    in which case they stay with a tiny weight so k centers can still be chosen. scikit-learn's
    OpenMP reductions sum in thread-arrival order, so the trials run single-threaded (the input is
    only K rows) to keep results reproducible.

    ``should_stop()`` is asked before every trial and between groups of Lloyd iterations (see
    :func:`_lloyd_trial`); when it returns True, TrainingStopped is raised.
    """

    def check() -> None:
        if should_stop is not None and should_stop():
            raise TrainingStopped(0)

    sequence = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    return _reduce(centers, weights, hyperparameters, sequence, check)


def _reduce(
    centers: np.ndarray,
    weights: np.ndarray,
    hp: KMeansHyperparameters,
    sequence: np.random.SeedSequence,
    check: Callable[[], None],
) -> np.ndarray:
    points, point_weights = _reduction_input(np.asarray(centers, np.float64), np.asarray(weights, np.float64), hp.k)
    init = "k-means++" if hp.local_lloyd_init_method == "kmeans++" else "random"
    best: KMeans | None = None
    with threadpool_limits(limits=1):
        for trial_seed in sequence.generate_state(hp.effective_num_trials):
            check()
            model = _lloyd_trial(points, point_weights, hp, init, int(trial_seed), check)
            if best is None or model.inertia_ < best.inertia_:
                best = model
    assert best is not None
    return best.cluster_centers_


def _lloyd_trial(
    points: np.ndarray,
    weights: np.ndarray,
    hp: KMeansHyperparameters,
    init: str | np.ndarray,
    seed: int,
    check: Callable[[], None],
) -> KMeans:
    """One seeded weighted Lloyd run of at most ``local_lloyd_max_iter`` iterations, stoppable.

    The iterations run in groups of about WORK_PER_CHECK multiply-adds (at least
    MIN_LLOYD_GROUP iterations), ``check()`` between groups; each group continues from the
    centers the previous one ended with. A run that fits in one group (every small reduction) is
    a single ``KMeans.fit``, exactly as without groups; the group size depends only on the
    problem's size, so results stay reproducible.
    """

    def lloyd(start: str | np.ndarray, iterations: int, random_state: int | None) -> KMeans:
        return KMeans(
            n_clusters=hp.k,
            init=start,
            n_init=1,
            max_iter=iterations,
            tol=hp.local_lloyd_tol,
            random_state=random_state,
        ).fit(points, sample_weight=weights)

    per_iteration = max(1, len(points) * hp.k * points.shape[1])
    group = int(min(hp.local_lloyd_max_iter, max(MIN_LLOYD_GROUP, WORK_PER_CHECK // per_iteration)))
    model = lloyd(init, group, seed)
    done = int(model.n_iter_)
    while done < hp.local_lloyd_max_iter and model.n_iter_ >= group:  # the group ended unconverged
        check()
        group = min(group, hp.local_lloyd_max_iter - done)
        model = lloyd(model.cluster_centers_, group, None)
        done += int(model.n_iter_)
    return model


def _reduction_input(centers: np.ndarray, weights: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    if len(centers) < k:
        raise EngineInputError(f"cannot reduce {len(centers)} centers to k={k}")
    positive = weights > 0
    if positive.sum() >= k:
        return centers[positive], weights[positive]
    floor = weights[positive].min() * 1e-6 if positive.any() else 1.0
    return centers, np.where(positive, weights, floor)


def _checked_source(source: BatchSource, hp: KMeansHyperparameters, what: str) -> BatchSource:
    """``source`` has rows, ``feature_dim`` columns (else EngineInputError) and, for training
    data, at least k rows (else HyperparameterError)."""
    if source.n_rows == 0:
        raise EngineInputError(f"{what} data has no rows")
    if source.n_features != hp.feature_dim:
        raise EngineInputError(f"{what} data has {source.n_features} columns but feature_dim is {hp.feature_dim}")
    hp.validate_against(source.n_rows, source.n_features, what=what)
    return source


def weighted_msd(
    points: np.ndarray, weights: np.ndarray, centers: np.ndarray, check: Callable[[], None] = lambda: None
) -> float:
    """SageMaker's ``train:msd``: the mean squared distance from ``points`` (the local centers) to
    their closest of ``centers``, weighted by ``weights`` (their streaming counts); NaN when every
    weight is 0. ``check`` runs between slices of the nearest-center search."""
    points, weights = np.asarray(points, np.float64), np.asarray(weights, np.float64)
    total = float(weights.sum())
    if not total > 0:
        return float("nan")
    index = CenterIndex(np.asarray(centers, np.float64))
    labels = nearest_in_slices(index, points, check)
    return float(np.dot(weights, index.squared_distances_to(points, labels)) / total)


def evaluate(
    data: BatchSource | ArrayLike,
    centers: ArrayLike,
    *,
    batch_size: int = 5000,
    should_stop: StopCallback | None = None,
    what: str = "training",
) -> ClusterAccumulator:
    """msd / ssd / cluster sizes of ``centers`` over ``data`` in one streaming pass (what a fit's
    full-pass metrics are; the SageMaker backend uses it on a SageMaker-trained model).

    ``should_stop()`` is asked between batches and slices; True raises TrainingStopped."""
    matrix = np.asarray(centers, np.float64)
    source = as_batch_source(data)
    if source.n_features != matrix.shape[1]:
        raise EngineInputError(f"{what} data has {source.n_features} columns, the centers {matrix.shape[1]}")
    return _evaluate(source, matrix, batch_size, _Monitor(None, should_stop, total=0), what)


def _evaluate(
    source: BatchSource,
    centers: np.ndarray,
    batch_size: int,
    monitor: _Monitor,
    what: str,
    labels: np.ndarray | None = None,
) -> ClusterAccumulator:
    """One pass: msd / ssd / cluster sizes of ``centers`` over ``source``; with ``labels`` (one
    slot per row), each row's closest center is stored there too."""
    index = CenterIndex(centers.astype(np.float64))
    totals = ClusterAccumulator(len(centers))
    done = 0
    for batch in checked_batches(source, batch_size, what):
        monitor.check()
        nearest = nearest_in_slices(index, batch, monitor.check)
        totals.add(nearest, index.squared_distances_to(batch, nearest))
        if labels is not None:
            labels[done : done + len(batch)] = nearest
        done += len(batch)
    return totals


class _Monitor:
    """Reports progress and honours stop requests between mini-batches."""

    def __init__(self, progress: ProgressCallback | None, should_stop: StopCallback | None, total: int) -> None:
        self._progress = progress
        self._should_stop = should_stop
        self._total = total
        self._done = 0

    def check(self) -> None:
        if self._should_stop is not None and self._should_stop():
            raise TrainingStopped(self._done)

    def advance(self, rows: int) -> None:
        self._done += rows
        if self._progress is not None:
            self._progress(self._done, self._total)
