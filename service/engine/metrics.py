"""Training-quality metrics: SageMaker's ``msd`` / ``ssd`` and cluster sizes, streamed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class TrainingMetrics:
    """Quality of a fitted model on its training data (and optional test data).

    ``*_msd`` is the mean and ``*_ssd`` the sum of squared Euclidean distances from each point to
    its closest final center; ``*cluster_sizes`` counts the points closest to each center.
    """

    train_msd: float
    train_ssd: float
    cluster_sizes: list[int]
    test_msd: float | None = None
    test_ssd: float | None = None
    test_cluster_sizes: list[int] | None = None

    def to_dict(self) -> dict[str, object]:
        """A JSON-friendly copy."""
        return asdict(self)

    def named(self, eval_metrics: Sequence[str]) -> dict[str, float]:
        """The requested metrics under SageMaker's names, e.g. ``{"test:msd": 1.5}``."""
        values = {"train:msd": self.train_msd, "train:ssd": self.train_ssd}
        if self.test_msd is not None and self.test_ssd is not None:
            values |= {"test:msd": self.test_msd, "test:ssd": self.test_ssd}
        return {name: value for name, value in values.items() if name.split(":")[1] in eval_metrics}


class ClusterAccumulator:
    """Running squared-distance total and per-cluster counts, fed one batch at a time."""

    def __init__(self, k: int) -> None:
        self._sizes = np.zeros(k, dtype=np.int64)
        self._ssd = 0.0
        self._rows = 0

    def add(self, labels: np.ndarray, squared_distances: np.ndarray) -> None:
        self._sizes += np.bincount(labels, minlength=len(self._sizes))
        self._ssd += float(squared_distances.sum())
        self._rows += len(labels)

    @property
    def ssd(self) -> float:
        return self._ssd

    @property
    def msd(self) -> float:
        return self._ssd / self._rows if self._rows else float("nan")

    @property
    def sizes(self) -> list[int]:
        return [int(size) for size in self._sizes]
