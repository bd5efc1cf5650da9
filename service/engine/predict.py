"""Nearest-center search and prediction.

Distances reported by the engine are **Euclidean** (not squared), like SageMaker KMeans's
``distance_to_cluster``. The search itself is built for speed *and* reproducibility:

1. A fast pass ranks the centers with one BLAS matrix product in float32 (``‖c‖² − 2x·c``), after
   shifting data and centers by a common origin so float32 keeps its precision on offset data.
2. BLAS results vary in their last bits with the thread count, so every row whose best and
   second-best candidates are closer than a rounding-error bound is re-decided exactly: float64
   ``‖x − c‖²`` for each candidate, ties going to the lowest center index.

The resulting labels are exactly the float64 argmin (first on ties) — independent of BLAS, thread
count and chunking — which is what makes training bit-reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from numpy.typing import ArrayLike

from service.engine.errors import EngineInputError
from service.engine.sources import check_finite

_CHUNK_ELEMENTS = 1 << 21  # rows x centers per chunk: bounds the temporary distance matrices
_DIRECT_ELEMENTS = 1 << 12  # rows x centers x features up to which distances are computed exactly at once
_SAFETY = 8.0  # scales the ambiguity tolerance, see Ranker


@dataclass(frozen=True)
class Prediction:
    """Per-row closest cluster and Euclidean (not squared) distances."""

    closest_cluster: np.ndarray  # (n,) int64
    distance_to_cluster: np.ndarray  # (n,) float64, Euclidean distance to the closest center
    distances: np.ndarray | None = None  # (n, k) float64 Euclidean distances to every center


class CenterIndex:
    """Centers prepared for repeated nearest-center queries (see the module docstring)."""

    def __init__(self, centers: np.ndarray, origin: np.ndarray | None = None) -> None:
        self.centers = np.ascontiguousarray(centers, dtype=np.float64)
        self._origin = self.centers.mean(axis=0) if origin is None else origin
        shifted = self.centers - self._origin
        self._center_scale = float(np.abs(shifted).max(initial=0.0))
        self._fast = Ranker(shifted, np.float32)

    @cached_property
    def _precise(self) -> Ranker:
        """A float64 fast pass, for values too large for float32."""
        return Ranker(self.centers - self._origin, np.float64)

    def predict(self, X: np.ndarray) -> Prediction:
        """Closest center and Euclidean distance for each row of the finite float64 matrix ``X``."""
        if X.size * len(self.centers) <= _DIRECT_ELEMENTS:
            direct = self._nearest_direct(X)
            if direct is not None:
                labels, squared = direct
                return Prediction(closest_cluster=labels, distance_to_cluster=np.sqrt(squared))
        labels = self.nearest(X)
        return Prediction(closest_cluster=labels, distance_to_cluster=np.sqrt(self.squared_distances_to(X, labels)))

    def nearest(self, X: np.ndarray) -> np.ndarray:
        """Index of the closest center for each row of the float64 matrix ``X`` (first on ties)."""
        if X.size * len(self.centers) <= _DIRECT_ELEMENTS:
            direct = self._nearest_direct(X)
            if direct is not None:
                return direct[0]
        labels = np.empty(len(X), dtype=np.int64)
        rows = max(1, _CHUNK_ELEMENTS // len(self.centers))
        for start in range(0, len(X), rows):
            labels[start : start + rows] = self._nearest_chunk(X[start : start + rows])
        return labels

    def _nearest_direct(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Small inputs (a request of a few rows): every exact float64 ``‖x − c‖²`` at once, computed
        exactly as the refinement computes its candidates (and as :meth:`squared_distances_to`
        does), so labels and distances are the same; cheaper than the two-pass search when
        rows x centers is tiny. Returns (labels, squared distances), or None if values overflow."""
        diff = (X[:, None, :] - self.centers[None, :, :]).reshape(-1, X.shape[1])
        with np.errstate(over="ignore", invalid="ignore"):
            distance = np.einsum("ij,ij->i", diff, diff).reshape(len(X), len(self.centers))
        labels = distance.argmin(axis=1)
        best = distance[np.arange(len(X)), labels]
        if not np.isfinite(best).all() or not np.isfinite(distance).all():
            return None
        return labels, best

    def squared_distances_to(self, X: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Exact float64 ``‖x − c_label‖²`` per row (direct difference, no cancellation)."""
        diff = X - self.centers[labels]
        return np.einsum("ij,ij->i", diff, diff)

    def _nearest_chunk(self, X: np.ndarray) -> np.ndarray:
        shifted = X - self._origin
        scale = max(float(np.abs(shifted).max(initial=0.0)), self._center_scale)
        ranker = self._fast if scale < self._fast.max_scale else self._precise
        if scale >= ranker.max_scale:
            raise EngineInputError("values are too large to compute squared distances")
        scores, x_sq = ranker.scores(shifted)
        return decide_nearest(X, self.centers, scores, x_sq, ranker.gamma)


def decide_nearest(
    X: np.ndarray, centers: np.ndarray, scores: np.ndarray, x_sq: np.ndarray, gamma: float
) -> np.ndarray:
    """The exact nearest of ``centers`` for each row of ``X``, from the fast pass's ``scores``.

    ``scores`` (rows x centers, may be a column slice of a wider matrix: it is overwritten) are a
    ranker's ``‖c‖² − 2x·c`` for these centers, ``x_sq`` its ``‖x‖²`` and ``gamma`` its rounding
    scale. Rows whose best two candidates are within the rounding bound are re-decided in
    float64 (see the module docstring), so the labels are the exact argmin, first on ties.
    """
    rows = np.arange(len(X))
    labels = scores.argmin(axis=1)
    best = scores[rows, labels].astype(np.float64)
    scores[rows, labels] = np.inf
    tolerance = gamma * (3.0 * x_sq + 2.0 * np.maximum(best + x_sq, 0.0))
    ambiguous = np.flatnonzero(scores.min(axis=1) - best <= tolerance)
    if ambiguous.size:
        refine(X, centers, scores, labels, best + tolerance, ambiguous)
    return labels


def refine(
    X: np.ndarray,
    centers: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    bound: np.ndarray,
    rows: np.ndarray,
) -> None:
    """Re-decide ``rows`` exactly among the candidates whose fast score is within ``bound``."""
    step = max(1, _CHUNK_ELEMENTS // (len(centers) * X.shape[1]))
    for start in range(0, len(rows), step):
        part = rows[start : start + step]
        mask = scores[part] <= bound[part, None]
        mask[np.arange(len(part)), labels[part]] = True
        pair_row, pair_center = np.nonzero(mask)  # ordered by row, then center index
        diff = X[part[pair_row]] - centers[pair_center]
        distance = np.einsum("ij,ij->i", diff, diff)
        order = np.lexsort((distance, pair_row))  # stable: equal distances keep center order
        first = order[np.r_[True, pair_row[order][1:] != pair_row[order][:-1]]]
        labels[part[pair_row[first]]] = pair_center[first]


class Ranker:
    """The fast pass in one float dtype: ``‖c‖² − 2x·c`` scores plus their rounding-error scale.

    The scores come from a single matrix product of ``[x, 1]`` with ``[−2c, ‖c‖²]``: no extra
    passes over the (rows x centers) result.
    """

    def __init__(self, shifted_centers: np.ndarray, dtype: type[np.floating]) -> None:
        self._dtype = dtype
        with np.errstate(over="ignore"):  # unused when values exceed max_scale
            centers = shifted_centers.astype(dtype)
            sq_norms = np.einsum("ij,ij->i", centers, centers)
        self._augmented = np.hstack([-2 * centers, sq_norms[:, None]])
        d = shifted_centers.shape[1]
        # Worst-case score rounding is about (4d + 8) eps (3‖x‖² + 2 dist²); this is twice that.
        self.gamma = _SAFETY * (d + 8) * float(np.finfo(dtype).eps)
        # |scores| <= 3 d scale²: below this coordinate scale nothing can overflow.
        self.max_scale = float(np.sqrt(np.finfo(dtype).max / (8 * d)))

    def scores(self, shifted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d = shifted.shape[1]
        augmented = np.empty((len(shifted), d + 1), dtype=self._dtype)
        augmented[:, :d] = shifted
        augmented[:, d] = 1.0
        x = augmented[:, :d]
        x_sq = np.einsum("ij,ij->i", x, x).astype(np.float64)
        return augmented @ self._augmented.T, x_sq  # ‖x‖², equal for all centers, is left out


def predict(X: ArrayLike, centers: ArrayLike, *, all_distances: bool = False) -> Prediction:
    """Assign each row of ``X`` to its closest center.

    ``distance_to_cluster`` is the Euclidean distance to that center, computed directly. With
    ``all_distances`` the (n, k) Euclidean distances to every center are added, computed as
    ``sqrt(max(‖x‖² − 2x·c + ‖c‖², 0))`` in float64 (may differ from the direct value in the last
    bits). Work is chunked so temporary memory stays bounded.
    """
    index = CenterIndex(_as_centers(centers))
    data = as_feature_matrix(X, index.centers.shape[1], "prediction input")
    result = index.predict(data)
    if not all_distances:
        return result
    return Prediction(result.closest_cluster, result.distance_to_cluster, euclidean_distances(data, index.centers))


def euclidean_distances(X: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """(n, k) Euclidean distances via the float64 expansion ``‖x‖² − 2x·c + ‖c‖²``, clipped at 0."""
    out = np.empty((len(X), len(centers)), dtype=np.float64)
    center_sq = np.einsum("ij,ij->i", centers, centers)
    rows = max(1, _CHUNK_ELEMENTS // len(centers))
    for start in range(0, len(X), rows):
        chunk = X[start : start + rows]
        block = out[start : start + rows]
        np.matmul(chunk, centers.T, out=block)
        block *= -2.0
        block += center_sq
        block += np.einsum("ij,ij->i", chunk, chunk)[:, None]
        np.maximum(block, 0.0, out=block)
        np.sqrt(block, out=block)
    return out


def as_feature_matrix(X: ArrayLike, n_features: int, what: str) -> np.ndarray:
    """``X`` as a finite C-contiguous float64 (n, n_features) matrix, or EngineInputError."""
    try:
        data = np.ascontiguousarray(X, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise EngineInputError(f"{what} must be numeric ({exc})") from exc
    if data.ndim != 2:
        raise EngineInputError(f"{what} must be a 2-D matrix (rows x features), got {data.ndim}-D")
    if data.shape[1] != n_features:
        raise EngineInputError(f"{what} has {data.shape[1]} features but the model has {n_features} (feature_dim)")
    check_finite(data, what, 0)
    return data


def _as_centers(centers: ArrayLike) -> np.ndarray:
    matrix = np.asarray(centers)
    if matrix.ndim != 2 or 0 in matrix.shape:
        raise EngineInputError(f"centers must be a non-empty (k, d) matrix, got shape {matrix.shape}")
    return as_feature_matrix(matrix, matrix.shape[1], "centers")
