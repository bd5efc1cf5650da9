"""Training-quality metrics: SageMaker's ``msd`` / ``ssd`` and cluster sizes, streamed.

Metric names are SageMaker's ``FinalMetricDataList`` names, the same on every backend:

* ``train:msd`` — SageMaker's meaning: the weighted mean squared distance from the K local
  centers (weighted by their streaming counts) to the k final centers, i.e. the best
  local-Lloyd trial's weighted inertia / total weight. A figure of the mini-batch stage's
  reduction, not a pass over the data. Always reported.
* ``train:msd_full_pass``, ``train:ssd_full_pass`` — Centroid's own: mean and sum of squared
  distances from every training point to its closest final center (one more pass over the
  data), one per requested ``eval_metrics`` entry.
* ``test:msd``, ``test:ssd`` — with test data, one per requested ``eval_metrics`` entry (the same
  figure SageMaker reports under that name: a pass over the test data).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Final

import numpy as np

METRIC_KINDS: Final = ("msd", "ssd")  # the order metrics are listed in, whatever eval_metrics says
TRAIN_MSD: Final = "train:msd"  # SageMaker's figure from the reduction of the local centers
FULL_PASS_SUFFIX: Final = "_full_pass"
#: Metrics SageMaker's ``FinalMetricDataList`` reports about model quality (``train:progress`` and
#: ``train:throughput`` it also lists are about the run, not the model).
SAGEMAKER_QUALITY_METRICS: Final = ("train:msd", "test:msd", "test:ssd")


def full_pass_name(kind: str) -> str:
    """``msd`` -> ``train:msd_full_pass``: a pass over all training data with the final centers."""
    return f"train:{kind}{FULL_PASS_SUFFIX}"


def full_pass_metrics(msd: float, ssd: float, eval_metrics: Sequence[str]) -> dict[str, float]:
    """The requested full-pass training figures under their names."""
    values = {"msd": msd, "ssd": ssd}
    return {full_pass_name(kind): values[kind] for kind in METRIC_KINDS if kind in eval_metrics}


@dataclass(frozen=True)
class TrainingMetrics:
    """Quality of a fitted model on its training data (and optional test data).

    ``*_msd`` is the mean and ``*_ssd`` the sum of squared Euclidean distances from each point to
    its closest final center; ``*cluster_sizes`` counts the points closest to each center.
    ``reduction_msd`` is SageMaker's ``train:msd``: the local centers' weighted mean squared
    distance to the final centers (see the module docstring).
    """

    train_msd: float
    train_ssd: float
    cluster_sizes: list[int]
    test_msd: float | None = None
    test_ssd: float | None = None
    test_cluster_sizes: list[int] | None = None
    reduction_msd: float | None = None

    def to_dict(self) -> dict[str, object]:
        """A JSON-friendly copy."""
        return asdict(self)

    def named(self, eval_metrics: Sequence[str]) -> dict[str, float]:
        """The requested full-pass metrics keyed ``<data>:<kind>`` (``train:msd`` here is the full
        pass, not SageMaker's figure): use :meth:`reported` for the names models store."""
        values = {"train:msd": self.train_msd, "train:ssd": self.train_ssd}
        if self.test_msd is not None and self.test_ssd is not None:
            values |= {"test:msd": self.test_msd, "test:ssd": self.test_ssd}
        return {name: value for name, value in values.items() if name.split(":")[1] in eval_metrics}

    def reported(self, eval_metrics: Sequence[str]) -> dict[str, float]:
        """The metrics a model stores, under the names of the module docstring: ``train:msd``
        (SageMaker's), the requested full-pass training figures and, with test data, the
        requested ``test:*``."""
        values: dict[str, float] = {}
        if self.reduction_msd is not None:
            values[TRAIN_MSD] = self.reduction_msd
        values |= full_pass_metrics(self.train_msd, self.train_ssd, eval_metrics)
        tested = {"msd": self.test_msd, "ssd": self.test_ssd}
        for kind in METRIC_KINDS:
            value = tested[kind]
            if kind in eval_metrics and value is not None:
                values[f"test:{kind}"] = value
        return values


def current_metric_names(metrics: Mapping[str, float], *, local_engine: bool) -> dict[str, float]:
    """Metrics stored before the names above (``train_msd``, ``test_ssd``, ...) under today's names.

    Stored names without a ``:`` are the old ones. The local engine stored full-pass figures
    (``train_msd`` becomes ``train:msd_full_pass``); the SageMaker backend stored SageMaker's
    ``FinalMetricDataList`` with ``:`` turned into ``_`` (``train_msd`` was SageMaker's
    ``train:msd``). ``test_*`` meant the same on both. Current names are returned unchanged.
    """
    if any(":" in name for name in metrics):
        return dict(metrics)
    renamed: dict[str, float] = {}
    for name, value in metrics.items():
        data, _, kind = name.partition("_")
        if not kind:
            renamed[name] = value
        elif local_engine and data == "train" and kind in METRIC_KINDS:
            renamed[full_pass_name(kind)] = value
        else:
            renamed[f"{data}:{kind}"] = value
    return renamed


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
