"""Every k of a range from one streaming pass: the sweep behind "which k?".

SageMaker's web-scale k-means has two stages (see webscale.py): a mini-batch stage that streams the
data into K = k x ``extra_center_factor`` weighted local centers, and a reduction of those K
centers to k. The first stage does not need to know k, only K. A sweep therefore:

1. streams the data **once** (``epochs`` passes, as a fit would) with K sized for the largest k
   of the range — exactly the mini-batch stage of a fit with that k, from the same seed;
2. reduces the K local centers to **every** k of the range (scikit-learn's weighted Lloyd, best of
   ``local_lloyd_num_trials``, each k from the same seed a fit uses), which costs K-sized work
   per k, independent of the rows;
3. evaluates every candidate set of centers in **one more pass** over the evaluation data (the
   test data when given, else the training data): one float32 BLAS product against all
   candidate centers at once per batch, then each k's exact nearest center (close calls
   re-decided in float64, as :mod:`service.engine.predict` does), msd / ssd / cluster sizes;
4. scores each k on a seeded sample of the evaluated rows (all of them when there are at most
   ``sample_size``): silhouette (computed exactly on the sample with one matrix product per row
   block, equal to scikit-learn's ``silhouette_score``), Davies–Bouldin and Calinski–Harabasz
   (scikit-learn's functions), and recommends a k (:func:`recommend_k`).

The largest k's result is bit-identical to ``WebScaleKMeans`` fitted with that k and the same
hyperparameters. For a smaller k the reduction starts from more local centers than a separate fit
would keep (K for the largest k, not for this k): a finer summary of the same stream, which scores
as well or better (tests/engine/test_sweep.py checks it against separate fits).

Memory is O(mini_batch_size x (d + sum of k) + K x d + sample_size x (d + sum of k)): independent of
the rows. ``should_stop()`` is honoured between slices everywhere, as in a fit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike
from scipy import sparse
from threadpoolctl import threadpool_limits

from service.engine.errors import EngineInputError
from service.engine.hyperparameters import KMeansHyperparameters
from service.engine.predict import CenterIndex, Ranker
from service.engine.sources import BatchSource, as_batch_source, checked_batches
from service.engine.webscale import (
    WORK_PER_CHECK,
    ProgressCallback,
    StopCallback,
    _checked_source,
    _decay,
    _initial_state,
    _lloyd_trial,
    _Monitor,
    _reduce,
    _reduction_input,
    weighted_msd,
)

DEFAULT_SAMPLE_SIZE = 4000
REDUCTION_THREADS = 2
# Recommendation: the elbow region's best k stands unless its silhouette is below this share of the best.
SILHOUETTE_TOLERANCE = 0.9


@dataclass(frozen=True)
class KResult:
    """One k of a sweep: its centers and how well they fit the evaluated data."""

    k: int
    centers: np.ndarray  # (k, d) float32, the model a fit with this k would give
    reduction_msd: float  # SageMaker's train:msd: the local centers' weighted msd to the centers (nan: unknown)
    msd: float  # mean squared distance of the evaluated rows to their closest center
    ssd: float  # their sum of squared distances
    cluster_sizes: list[int]  # evaluated rows closest to each center
    silhouette: float | None  # on the sample; None when the sample has fewer than 2 clusters
    davies_bouldin: float | None  # on the sample (lower is better)
    calinski_harabasz: float | None  # on the sample (higher is better)


@dataclass(frozen=True)
class Recommendation:
    """The k the data supports, and why (see :func:`recommend_k`)."""

    k: int
    elbow_k: int | None  # the kneedle elbow of the msd curve
    best_silhouette_k: int | None
    reasons: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SweepResult:
    """Every k of the range, in increasing k, with the recommended one."""

    results: list[KResult]
    recommendation: Recommendation
    evaluated_on: str  # "test" or "training"
    evaluated_rows: int
    sample_rows: int  # rows the silhouette, Davies–Bouldin and Calinski–Harabasz scores use
    # (K, d) float64 and (K,): the mini-batch stage's centers and weights, shared by every k; None
    # when the centers were trained elsewhere (:func:`evaluate_centers`)
    local_centers: np.ndarray | None
    local_weights: np.ndarray | None
    hyperparameters: KMeansHyperparameters  # of the largest k (the streamed stage's)

    def result(self, k: int) -> KResult:
        for result in self.results:
            if result.k == k:
                return result
        raise KeyError(k)


def sweep(
    data: BatchSource | ArrayLike,
    ks: Sequence[int],
    hyperparameters: KMeansHyperparameters,
    *,
    test: BatchSource | ArrayLike | None = None,
    sample_size: int = DEFAULT_SAMPLE_SIZE,
    progress: ProgressCallback | None = None,
    should_stop: StopCallback | None = None,
) -> SweepResult:
    """Fit every k of ``ks`` with one streaming pass (see the module docstring).

    ``hyperparameters`` are those of every fit; its ``k`` is ignored (each k of ``ks`` takes its
    place). ``progress(rows_done, total)`` runs after every mini-batch and evaluation batch, with
    total = training rows x epochs + evaluated rows. ``should_stop()`` returning True raises
    TrainingStopped.
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 2:
        raise EngineInputError("a sweep needs at least one k, each >= 2 (SageMaker's smallest k)")
    if sample_size < 2:
        raise EngineInputError("sample_size must be at least 2")
    largest = dataclasses.replace(hyperparameters, k=ks[-1])
    train = _checked_source(as_batch_source(data), largest, "training")
    scored = train if test is None else _checked_source(as_batch_source(test), largest, "test")
    monitor = _Monitor(progress, should_stop, total=train.n_rows * largest.epochs + scored.n_rows)

    # 1. The mini-batch stage, once, as a fit with the largest k streams it.
    init_seed, reduce_seed = np.random.SeedSequence(largest.seed).spawn(2)
    state = _initial_state(train, largest, np.random.default_rng(init_seed))
    for _ in range(largest.epochs):
        for batch in checked_batches(train, largest.mini_batch_size):
            monitor.check()
            state.update(batch, _decay(len(batch), largest.half_life_time_size), monitor.check)
            monitor.advance(len(batch))

    # 2. Every reduction, each from the seed a fit with that k would use, two at a time; then,
    #    from the largest k down, one more trial merged down from the next k's centers.
    for k in ks:
        if k > len(state.centers):
            raise EngineInputError(f"k={k} is more than the {len(state.centers)} local centers the data gives")
    centers = _reductions(state.centers, state.counts, hyperparameters, ks, reduce_seed, monitor.check)
    reduction_msd = {k: weighted_msd(state.centers, state.counts, centers[k], monitor.check) for k in ks}
    for larger, k in zip(ks[::-1], ks[-2::-1], strict=False):
        merged = _merged_down(state.centers, state.counts, centers[larger], k, hyperparameters, monitor.check)
        if merged is not None:
            msd = weighted_msd(state.centers, state.counts, merged, monitor.check)
            if msd < reduction_msd[k]:
                centers[k], reduction_msd[k] = merged, msd

    # 3 and 4. One evaluation pass for all of them, the scores on the sample, the recommendation.
    return _evaluated(
        scored,
        ks,
        centers,
        reduction_msd,
        state.centers,
        largest,
        sample_size,
        monitor,
        evaluated_on="training" if test is None else "test",
        local_weights=state.counts,
    )


def evaluate_centers(
    data: BatchSource | ArrayLike,
    centers: Mapping[int, ArrayLike],
    *,
    train_msd: Mapping[int, float | None] | None = None,
    evaluated_on: str = "training",
    sample_size: int = DEFAULT_SAMPLE_SIZE,
    seed: int | None = None,
    batch_size: int = 5000,
    progress: ProgressCallback | None = None,
    should_stop: StopCallback | None = None,
) -> SweepResult:
    """Steps 3 and 4 of a sweep for centers trained elsewhere (one SageMaker training job per k):
    every k's msd, ssd and cluster sizes from one pass over ``data``, the scores on a seeded sample
    of ``sample_size`` rows, and the recommended k; the same figures :func:`sweep` gives.

    The largest k's centers serve as the evaluation's anchors (any anchors give the exact labels;
    closer ones prove more rows at once). ``train_msd`` is each k's training msd as its trainer
    reported it (``nan`` in the result when unknown)."""
    ks = sorted(int(k) for k in centers)
    if not ks or ks[0] < 1:
        raise EngineInputError("no centers to evaluate")
    as_float32 = {k: np.asarray(centers[k], dtype=np.float32) for k in ks}
    d = as_float32[ks[-1]].shape[1]
    for k in ks:
        if as_float32[k].shape != (k, d):
            raise EngineInputError(f"k={k}: expected {k} centers of {d} features, got {as_float32[k].shape}")
    hyperparameters = KMeansHyperparameters(k=ks[-1], feature_dim=d, mini_batch_size=batch_size, seed=seed)
    scored = _checked_source(as_batch_source(data), hyperparameters, evaluated_on)
    monitor = _Monitor(progress, should_stop, total=scored.n_rows)
    reported = train_msd or {}
    msd = {k: float("nan") if reported.get(k) is None else float(reported[k]) for k in ks}  # type: ignore[arg-type]
    anchors = as_float32[ks[-1]].astype(np.float64)
    return _evaluated(
        scored, ks, as_float32, msd, anchors, hyperparameters, sample_size, monitor, evaluated_on=evaluated_on
    )


def _evaluated(
    scored: BatchSource,
    ks: list[int],
    centers: dict[int, np.ndarray],
    reduction_msd: dict[int, float],
    anchors: np.ndarray,
    hyperparameters: KMeansHyperparameters,
    sample_size: int,
    monitor: _Monitor,
    *,
    evaluated_on: str,
    local_weights: np.ndarray | None = None,
) -> SweepResult:
    """One evaluation pass over ``scored`` for every k's centers, then the scores and the recommendation."""
    if sample_size < 2:
        raise EngineInputError("sample_size must be at least 2")
    chosen = _sample_rows(scored.n_rows, sample_size, hyperparameters.seed)
    evaluation = _Evaluation(ks, centers, anchors, chosen, scored.n_features)
    for batch in checked_batches(scored, hyperparameters.mini_batch_size, evaluated_on):
        monitor.check()
        evaluation.add(batch, monitor.check)
        monitor.advance(len(batch))

    from sklearn.metrics import calinski_harabasz_score, davies_bouldin_score  # here: a second of every start-up

    sample = evaluation.sample
    silhouettes = _silhouettes(sample, evaluation.sample_labels, monitor.check)
    totals = evaluation.totals
    results = []
    for k in ks:
        labels = evaluation.sample_labels[k]
        scorable = 2 <= len(np.unique(labels)) <= len(sample) - 1
        sizes, ssd = totals[k]
        results.append(
            KResult(
                k=k,
                centers=centers[k],
                reduction_msd=reduction_msd[k],
                msd=ssd / scored.n_rows,
                ssd=ssd,
                cluster_sizes=sizes,
                silhouette=silhouettes.get(k),
                davies_bouldin=float(davies_bouldin_score(sample, labels)) if scorable else None,
                calinski_harabasz=float(calinski_harabasz_score(sample, labels)) if scorable else None,
            )
        )
    return SweepResult(
        results=results,
        recommendation=recommend_k(results),
        evaluated_on=evaluated_on,
        evaluated_rows=scored.n_rows,
        sample_rows=len(sample),
        local_centers=anchors if local_weights is not None else None,
        local_weights=local_weights,
        hyperparameters=hyperparameters,
    )


def _reductions(
    local_centers: np.ndarray,
    weights: np.ndarray,
    hyperparameters: KMeansHyperparameters,
    ks: list[int],
    sequence: np.random.SeedSequence,
    check: Callable[[], None],
) -> dict[int, np.ndarray]:
    """Every k's reduction as a fit makes it (float32 centers), two at a time.

    The reductions are independent and scikit-learn's Lloyd releases the GIL, so two threads use
    both cores. Each is single-threaded inside (``threadpool_limits`` held at 1 around all of
    them, so no thread's exit can raise another's thread count): results are the same as one at
    a time."""

    def reduce(k: int) -> np.ndarray:
        hp = dataclasses.replace(hyperparameters, k=k)
        return _reduce(local_centers, weights, hp, sequence, check).astype(np.float32)

    with threadpool_limits(limits=1), ThreadPoolExecutor(max_workers=REDUCTION_THREADS) as pool:
        return dict(zip(ks, pool.map(reduce, ks), strict=True))


def _merged_down(
    local_centers: np.ndarray,
    weights: np.ndarray,
    larger: np.ndarray,
    k: int,
    hyperparameters: KMeansHyperparameters,
    check: Callable[[], None],
) -> np.ndarray | None:
    """A reduction to ``k`` started from ``larger`` (more centers) merged down to k by Ward's
    criterion — repeatedly the pair whose merge adds the least weighted squared distance — then
    refined by the same weighted Lloyd. Where the data has fewer clusters than ``larger``, this
    finds the merge a random start can miss; the sweep keeps it only when it is better."""
    points, point_weights = _reduction_input(np.asarray(local_centers, np.float64), np.asarray(weights), k)
    centers = np.asarray(larger, np.float64)
    labels = CenterIndex(centers).nearest(points)
    mass = np.bincount(labels, weights=point_weights, minlength=len(centers))
    while len(centers) > k:
        if (mass <= 0).any():  # an empty center goes first, at no cost
            drop = int(np.flatnonzero(mass <= 0)[0])
            centers, mass = np.delete(centers, drop, axis=0), np.delete(mass, drop)
            continue
        diff = centers[:, None, :] - centers[None, :, :]
        cost = (mass[:, None] * mass[None, :] / (mass[:, None] + mass[None, :])) * np.einsum("ijd,ijd->ij", diff, diff)
        np.fill_diagonal(cost, np.inf)
        i, j = divmod(int(np.argmin(cost)), len(centers))
        merged = (mass[i] * centers[i] + mass[j] * centers[j]) / (mass[i] + mass[j])
        centers[i], mass[i] = merged, mass[i] + mass[j]
        centers, mass = np.delete(centers, j, axis=0), np.delete(mass, j)
    hp = dataclasses.replace(hyperparameters, k=k)
    with threadpool_limits(limits=1):
        model = _lloyd_trial(points, point_weights, hp, centers, 0, check)
    result: np.ndarray = model.cluster_centers_.astype(np.float32)
    return result


def _sample_rows(n_rows: int, sample_size: int, seed: int | None) -> np.ndarray:
    """Sorted positions of the seeded sample (every row when there are at most ``sample_size``)."""
    if n_rows <= sample_size:
        return np.arange(n_rows)
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(3)[2])
    return np.sort(rng.choice(n_rows, size=sample_size, replace=False))


class _Evaluation:
    """The evaluation pass: every k's exact nearest center for every row, at about the cost of one
    nearest-center search against the K local centers.

    The local centers serve as *anchors*. Before the pass, each anchor a gets, for each k, its own
    nearest center c*(a, k) and a margin m(a, k) = (d2 - d1) / 2, half the gap between its nearest
    and second-nearest centers of that k (float64, exact). During the pass each row x is given an
    anchor a (the nearest by the float32 ranking; any anchor would do) and its exact float64
    distance δ = ‖x − a‖. By the triangle inequality, δ < m(a, k) proves that c*(a, k) is x's
    nearest center for that k — strictly, so ties cannot arise. A pair left unproven gets a second
    chance: its exact distance u = ‖x − c*(a, k)‖, and every other center of k is at least
    d2(a, k) − δ from x, so u < d2(a, k) − δ proves c*(a, k) too (about 40% of the rest on blobs).
    Only the (row, k) pairs that neither proves are searched, exactly, among that k's centers
    (:class:`CenterIndex`, first on ties). The labels are therefore the exact argmin for every row
    and every k, as a fit's evaluation pass computes them.

    Squared distances are summed per cluster from sufficient statistics in float64 (count, sum and
    sum of squares of the rows shifted by the anchors' mean): per anchor for every row, then each
    k's clusters gather their anchors' statistics, and the rows whose center differs from their
    anchor's are moved across (both as sparse products, one per slice of rows). No per-k pass over
    the rows is needed.
    """

    def __init__(
        self, ks: list[int], centers: dict[int, np.ndarray], anchors: np.ndarray, chosen: np.ndarray, d: int
    ) -> None:
        self.ks = ks
        self.centers = {k: centers[k].astype(np.float64) for k in ks}
        self.index = {k: CenterIndex(self.centers[k]) for k in ks}
        self.anchors = np.ascontiguousarray(anchors, dtype=np.float64)
        self.origin = self.anchors.mean(axis=0)
        shifted_anchors = self.anchors - self.origin
        self.scale = float(np.abs(shifted_anchors).max(initial=0.0))
        self.fast = Ranker(shifted_anchors, np.float32)
        self.precise = Ranker(shifted_anchors, np.float64)
        n_anchors = len(self.anchors)
        self.nearest = np.empty((n_anchors, len(ks)), dtype=np.int64)
        self.margin = np.empty((n_anchors, len(ks)), dtype=np.float64)
        self.second = np.empty((n_anchors, len(ks)), dtype=np.float64)  # distance to the second-nearest center
        for i, k in enumerate(ks):
            diff = self.anchors[:, None, :] - self.centers[k][None, :, :]
            distance = np.sqrt(np.einsum("akd,akd->ak", diff, diff))
            order = np.argsort(distance, axis=1, kind="stable")
            self.nearest[:, i] = order[:, 0]
            d1 = distance[np.arange(n_anchors), order[:, 0]]
            d2 = distance[np.arange(n_anchors), order[:, 1]] if k > 1 else np.full(n_anchors, np.inf)
            # Strictly inside half the gap, with room for float64 rounding of the distances.
            self.margin[:, i] = (d2 - d1) / 2.0 * (1.0 - 1e-9) - 1e-12 * np.where(np.isfinite(d2), d2, d1)
            self.second[:, i] = d2
        # Every k's centers stacked (k after k), for the second proof and the moved statistics.
        self.offsets = np.cumsum([0, *ks])[:-1]
        self.stacked = np.concatenate([self.centers[k] for k in ks])  # float64, the data's coordinates
        # Per anchor: count, sum and sum of squares of its rows (shifted by the origin).
        self.anchor_counts = np.zeros(n_anchors, dtype=np.float64)
        self.anchor_sums = np.zeros((n_anchors, d), dtype=np.float64)
        self.anchor_squares = np.zeros(n_anchors, dtype=np.float64)
        # Per stacked center: the statistics of rows whose center is not their anchor's, moved across.
        self.moved = np.zeros((len(self.stacked), d + 2), dtype=np.float64)  # count, square sum, sums
        self.searched = 0  # (row, k) pairs that needed the exact search
        self.chosen = chosen
        self.sample = np.empty((len(chosen), d), dtype=np.float64)
        self.sample_labels = {k: np.empty(len(chosen), dtype=np.int64) for k in ks}
        self.rows_seen = 0
        self.rows_per_slice = max(1, WORK_PER_CHECK // max(1, n_anchors * d))

    def add(self, batch: np.ndarray, check: Callable[[], None]) -> None:
        first, last = self.rows_seen, self.rows_seen + len(batch)
        lo, hi = np.searchsorted(self.chosen, [first, last])
        picked = self.chosen[lo:hi] - first
        self.sample[lo:hi] = batch[picked]
        for start in range(0, len(batch), self.rows_per_slice):
            if start:
                check()
            part = batch[start : start + self.rows_per_slice]
            labels = self._labels(part, check)
            in_part = (picked >= start) & (picked < start + len(part))
            rows = picked[in_part] - start
            for i, k in enumerate(self.ks):
                self.sample_labels[k][lo:hi][in_part] = labels[rows, i]
        self.rows_seen = last

    def _labels(self, part: np.ndarray, check: Callable[[], None]) -> np.ndarray:
        """(rows, len(ks)): each row's exact nearest center for every k; statistics updated."""
        shifted = part - self.origin
        scale = max(float(np.abs(shifted).max(initial=0.0)), self.scale)
        ranker = self.fast if scale < self.fast.max_scale else self.precise
        if scale >= ranker.max_scale:
            raise EngineInputError("values are too large to compute squared distances")
        scores, _ = ranker.scores(shifted)
        anchor = scores.argmin(axis=1)
        diff = shifted - (self.anchors[anchor] - self.origin)
        delta = np.sqrt(np.einsum("ij,ij->i", diff, diff))
        squares = np.einsum("ij,ij->i", shifted, shifted)
        n_anchors = len(self.anchors)
        self.anchor_counts += np.bincount(anchor, minlength=n_anchors)
        self.anchor_squares += np.bincount(anchor, weights=squares, minlength=n_anchors)
        membership = sparse.csr_matrix(
            (np.ones(len(part)), (anchor, np.arange(len(part)))), shape=(n_anchors, len(part))
        )
        self.anchor_sums += membership @ shifted
        labels = self.nearest[anchor]  # (rows, len(ks)), proven where delta < margin
        unproven = delta[:, None] >= self.margin[anchor]
        # A second proof for the rest: the row's exact distance u to its anchor's center c*, and
        # every other center c' is at least second(a) - delta away (triangle inequality), so
        # u < second(a) - delta proves c* nearest, strictly (with room for rounding).
        rows, which = np.nonzero(unproven)
        if len(rows):
            gap = part[rows] - self.stacked[self.offsets[which] + labels[rows, which]]
            u = np.sqrt(np.einsum("ij,ij->i", gap, gap))
            second = self.second[anchor[rows], which]
            proven = u < (second - delta[rows]) * (1.0 - 1e-9) - 1e-12 * second
            unproven[rows[proven], which[proven]] = False
        moved_rows, moved_from, moved_to = [], [], []
        for i in np.flatnonzero(unproven.any(axis=0)):
            check()
            k = self.ks[i]
            rows = np.flatnonzero(unproven[:, i])
            self.searched += len(rows)
            exact = self.index[k].nearest(part[rows])
            moved = exact != labels[rows, i]
            if moved.any():
                rows, exact = rows[moved], exact[moved]
                moved_rows.append(rows)
                moved_from.append(self.offsets[i] + labels[rows, i])
                moved_to.append(self.offsets[i] + exact)
                labels[rows, i] = exact
        if moved_rows:
            # +1 where a row moved to, -1 where it moved from, over the stacked centers: one product.
            rows = np.concatenate(moved_rows * 2)
            centers = np.concatenate(moved_to + moved_from)
            signs = np.concatenate([np.ones(len(rows) // 2), -np.ones(len(rows) // 2)])
            moves = sparse.csr_matrix((signs, (centers, rows)), shape=(len(self.stacked), len(part)))
            self.moved += moves @ np.column_stack([np.ones(len(part)), squares, shifted])
        return labels

    @property
    def totals(self) -> dict[int, tuple[list[int], float]]:
        """Per k: the cluster sizes and the sum of squared distances of the rows seen."""
        result = {}
        for i, k in enumerate(self.ks):
            cluster = self.nearest[:, i]
            moved = self.moved[self.offsets[i] : self.offsets[i] + k]
            counts = np.bincount(cluster, weights=self.anchor_counts, minlength=k) + moved[:, 0]
            squares = np.bincount(cluster, weights=self.anchor_squares, minlength=k) + moved[:, 1]
            sums = np.zeros((k, self.anchors.shape[1]), dtype=np.float64)
            np.add.at(sums, cluster, self.anchor_sums)
            sums += moved[:, 2:]
            centers = self.centers[k] - self.origin
            per_cluster = (
                squares - 2.0 * np.einsum("ij,ij->i", centers, sums) + counts * np.einsum("ij,ij->i", centers, centers)
            )
            result[k] = ([int(round(c)) for c in counts], float(np.maximum(per_cluster, 0.0).sum()))
        return result


def _silhouettes(sample: np.ndarray, labels: dict[int, np.ndarray], check: Callable[[], None]) -> dict[int, float]:
    """The mean silhouette coefficient of every k's labels on ``sample`` (scikit-learn's
    definition: s = (b - a) / max(a, b), 0 for a point alone in its cluster), for every k whose
    sample has 2 <= clusters <= rows - 1.

    The pairwise distances are computed one block of rows at a time and multiplied by every k's
    one-hot label matrix at once, so each point's summed distance to each cluster costs one BLAS
    product per block and the n x n matrix is never held."""
    n = len(sample)
    ks = [k for k, values in labels.items() if 2 <= len(np.unique(values)) <= n - 1]
    if not ks:
        return {}
    widths = [k for k in ks]
    offsets = np.cumsum([0] + widths)
    onehot = np.zeros((n, int(offsets[-1])), dtype=np.float64)
    for i, k in enumerate(ks):
        onehot[np.arange(n), offsets[i] + labels[k]] = 1.0
    counts = onehot.sum(axis=0)
    sums = np.empty((n, int(offsets[-1])), dtype=np.float64)
    squares = np.einsum("ij,ij->i", sample, sample)
    block = max(1, (1 << 22) // max(1, n))
    for start in range(0, n, block):
        check()
        rows = sample[start : start + block]
        distances = squares[start : start + block, None] - 2.0 * rows @ sample.T + squares[None, :]
        np.maximum(distances, 0.0, out=distances)
        np.sqrt(distances, out=distances)
        distances[np.arange(len(rows)), np.arange(start, start + len(rows))] = 0.0
        sums[start : start + block] = distances @ onehot
    result = {}
    everyone = np.arange(n)
    for i, k in enumerate(ks):
        cluster_sums = sums[:, offsets[i] : offsets[i + 1]]
        sizes = counts[offsets[i] : offsets[i + 1]]
        own = labels[k]
        own_size = sizes[own]
        with np.errstate(divide="ignore", invalid="ignore"):
            a = cluster_sums[everyone, own] / np.maximum(own_size - 1, 1)
            mean_to = cluster_sums / sizes[None, :]
        mean_to[everyone, own] = np.inf
        mean_to[:, sizes == 0] = np.inf
        b = mean_to.min(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            s = (b - a) / np.maximum(a, b)
        s = np.where(own_size > 1, np.nan_to_num(s), 0.0)
        result[k] = float(s.mean())
    return result


def recommend_k(results: Sequence[KResult]) -> Recommendation:
    """The k the data supports, by a documented rule (docs/engine.md, "Sweeps"):

    1. **Elbow**: the kneedle method on the msd curve (Satopää et al., 2011) — k and msd are
       scaled to [0, 1] over the range and the elbow is the k whose point lies farthest below the
       straight line from the first k's point to the last's. Needs at least 3 ks; a curve that
       never bends (no point below the line) has no elbow.
    2. **Cross-check with silhouette**: on a discrete curve the bend is only located to within one
       k, so of the elbow and its neighbours the k with the best silhouette is taken — unless the
       best silhouette of the whole range is clearly better (that one's silhouette x
       ``SILHOUETTE_TOLERANCE`` (0.9) above the elbow region's best): then the msd curve bends
       where the clusters do not separate, and the best silhouette's k is recommended.
    3. Without an elbow, the best silhouette; without silhouettes either, the smallest k.
    Ties in silhouette go to the smaller k. ``reasons`` says which step decided, with the figures.
    """
    ordered = sorted(results, key=lambda r: r.k)
    silhouettes = {r.k: r.silhouette for r in ordered if r.silhouette is not None}

    def best_of(ks: Sequence[int]) -> int | None:
        scored = [k for k in ks if k in silhouettes]
        return max(scored, key=lambda k: (silhouettes[k], -k)) if scored else None

    best_silhouette = best_of(list(silhouettes))
    elbow = _elbow([r.k for r in ordered], [r.msd for r in ordered])
    reasons = []
    if elbow is not None:
        reasons.append(f"the msd curve bends most at k={elbow} (kneedle: farthest below the line from its ends)")
    else:
        reasons.append("the msd curve has no elbow over this range (fewer than 3 ks, or it never bends)")
    if best_silhouette is not None:
        reasons.append(f"the best silhouette is {silhouettes[best_silhouette]:.3f} at k={best_silhouette}")
    if elbow is not None:
        position = [r.k for r in ordered].index(elbow)
        region = [r.k for r in ordered[max(0, position - 1) : position + 2]]
        region_best = best_of(region)
        if region_best is None:
            chosen = elbow
        elif (
            best_silhouette is not None
            and silhouettes[region_best] < SILHOUETTE_TOLERANCE * silhouettes[best_silhouette]
        ):
            chosen = best_silhouette
            reasons.append(
                f"around the elbow (k={', '.join(map(str, region))}) the best silhouette is only "
                f"{silhouettes[region_best]:.3f}, less than {SILHOUETTE_TOLERANCE:.0%} of the best: "
                f"k={best_silhouette} is recommended"
            )
        else:
            chosen = region_best
            reasons.append(
                f"around the elbow (k={', '.join(map(str, region))}) k={region_best} separates best "
                f"(silhouette {silhouettes[region_best]:.3f})"
            )
    elif best_silhouette is not None:
        chosen = best_silhouette
        reasons.append(f"k={best_silhouette} is recommended for its silhouette")
    else:
        chosen = ordered[0].k
        reasons.append("no silhouette could be computed: the smallest k is chosen")
    return Recommendation(k=chosen, elbow_k=elbow, best_silhouette_k=best_silhouette, reasons=reasons)


def _elbow(ks: list[int], msds: list[float]) -> int | None:
    """The kneedle elbow of a decreasing curve: the point farthest below its end-to-end chord."""
    if len(ks) < 3:
        return None
    x = np.asarray(ks, dtype=np.float64)
    y = np.asarray(msds, dtype=np.float64)
    if not np.isfinite(y).all() or y.max() == y.min():
        return None
    xn = (x - x[0]) / (x[-1] - x[0])
    yn = (y - y.min()) / (y.max() - y.min())
    chord = yn[0] + (yn[-1] - yn[0]) * xn
    below = chord - yn
    best = int(np.argmax(below))
    return ks[best] if below[best] > 0 else None
