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

Memory is O(mini_batch_size x d + K x d): data only ever arrives one mini-batch at a time. Center
updates and metrics are float64 (nearest centers are ranked by a float32 BLAS pass whose close
calls are re-decided in float64, see predict.py); the returned centers are float32 like SageMaker's
model. With a seed, results are bit-identical across runs, thread counts and storage (array or
Parquet) for the same batch order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from sklearn.cluster import KMeans, kmeans_plusplus
from sklearn.exceptions import NotFittedError
from threadpoolctl import threadpool_limits

from service.engine.errors import EngineInputError, TrainingStopped
from service.engine.hyperparameters import KMeansHyperparameters
from service.engine.metrics import ClusterAccumulator, TrainingMetrics
from service.engine.mxnet_format import ModelState
from service.engine.predict import CenterIndex, Prediction, predict
from service.engine.sources import BatchSource, as_batch_source, checked_batches

ProgressCallback = Callable[[int, int], None]
StopCallback = Callable[[], bool]
SeedLike = int | np.random.SeedSequence | None

# Multiply-adds (rows x centers x features) of work between two stop checks: tens of milliseconds.
WORK_PER_CHECK = 1 << 25
# Fewest Lloyd iterations per group. A group that converges stops early, which is how the end of
# a run is seen: a group continuing from converged centers stops after 1 iteration (2 with
# local_lloyd_tol = 0, the labels must repeat), so 3 always tells.
MIN_LLOYD_GROUP = 3


class WebScaleKMeans:
    """SageMaker-compatible k-means with a scikit-learn-style ``fit`` / ``predict`` interface."""

    cluster_centers_: np.ndarray  # (k, d) float32
    cluster_sizes_: np.ndarray  # (k,) int64 training points closest to each center
    local_centers_: np.ndarray  # (K, d) float64 centers before the reduction to k
    local_weights_: np.ndarray  # (K,) float64 weights: 1 + points received (decayed)
    metrics_: TrainingMetrics

    def __init__(self, hyperparameters: KMeansHyperparameters) -> None:
        self.hyperparameters = hyperparameters

    def fit(
        self,
        data: BatchSource | ArrayLike,
        *,
        test: BatchSource | ArrayLike | None = None,
        progress: ProgressCallback | None = None,
        should_stop: StopCallback | None = None,
    ) -> WebScaleKMeans:
        """Train on ``data`` (a matrix or a re-iterable BatchSource); optionally score ``test``.

        ``progress(points_done, total)`` runs after every training mini-batch, with
        total = rows x epochs; the final evaluation pass is not reported. ``should_stop()`` is
        checked before every mini-batch of every pass and between slices of every long step (see
        the module docstring); when it returns True, TrainingStopped is raised and the estimator
        keeps its previous state.
        """
        hp = self.hyperparameters
        train = _checked_source(data, hp, "training")
        scored = None if test is None else _checked_source(test, hp, "test")
        monitor = _Monitor(progress, should_stop, total=train.n_rows * hp.epochs)
        init_seed, reduce_seed = np.random.SeedSequence(hp.seed).spawn(2)
        state = _initial_state(train, hp, np.random.default_rng(init_seed))
        for _ in range(hp.epochs):
            for batch in checked_batches(train, hp.mini_batch_size):
                monitor.check()
                state.update(batch, _decay(len(batch), hp.half_life_time_size), monitor.check)
                monitor.advance(len(batch))
        centers = _reduce(state.centers, state.counts, hp, reduce_seed, monitor.check).astype(np.float32)
        reduction_msd = weighted_msd(state.centers, state.counts, centers, monitor.check)
        on_train = _evaluate(train, centers, hp.mini_batch_size, monitor, "training")
        on_test = None if scored is None else _evaluate(scored, centers, hp.mini_batch_size, monitor, "test")
        self._set_fitted(centers, state, on_train, on_test, reduction_msd)
        return self

    def predict(self, X: ArrayLike) -> Prediction:
        """Closest cluster and Euclidean distance for each row of ``X``."""
        return predict(X, self._centers())

    def transform(self, X: ArrayLike) -> np.ndarray:
        """(n, k) Euclidean distances from each row of ``X`` to every center."""
        distances = predict(X, self._centers(), all_distances=True).distances
        assert distances is not None
        return distances

    @property
    def state_(self) -> ModelState:
        """The K local centers and their weights: what SageMaker's ``state_<uuid>`` member holds
        (``write_model_tar(model.cluster_centers_, model.state_)``)."""
        if not hasattr(self, "local_centers_"):
            raise NotFittedError("this WebScaleKMeans is not fitted yet; call fit() first")
        return ModelState(centers=self.local_centers_, weights=self.local_weights_)

    def _centers(self) -> np.ndarray:
        if not hasattr(self, "cluster_centers_"):
            raise NotFittedError("this WebScaleKMeans is not fitted yet; call fit() first")
        return self.cluster_centers_

    def _set_fitted(
        self,
        centers: np.ndarray,
        state: _LocalState,
        on_train: ClusterAccumulator,
        on_test: ClusterAccumulator | None,
        reduction_msd: float,
    ) -> None:
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
    init: str,
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


def _checked_source(data: BatchSource | ArrayLike, hp: KMeansHyperparameters, what: str) -> BatchSource:
    source = as_batch_source(data)
    if source.n_rows == 0:
        raise EngineInputError(f"{what} data has no rows")
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
    source: BatchSource, centers: np.ndarray, batch_size: int, monitor: _Monitor, what: str
) -> ClusterAccumulator:
    index = CenterIndex(centers.astype(np.float64))
    totals = ClusterAccumulator(len(centers))
    for batch in checked_batches(source, batch_size, what):
        monitor.check()
        labels = nearest_in_slices(index, batch, monitor.check)
        totals.add(labels, index.squared_distances_to(batch, labels))
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
