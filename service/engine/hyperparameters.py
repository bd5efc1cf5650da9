"""SageMaker KMeans hyperparameters: parsing, validation and serialization.

Names, ranges and defaults follow SageMaker's built-in KMeans so one recipe can train locally or on
SageMaker. SageMaker sends every value as a string, so :meth:`KMeansHyperparameters.from_mapping`
accepts both strings and native values, and reports *all* problems at once.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Final, Literal

import numpy as np

AUTO: Final = "auto"
AUTO_VALUE = 10  # what "auto" resolves to for extra_center_factor and local_lloyd_num_trials
INIT_METHODS = ("random", "kmeans++")
EVAL_METRICS = ("msd", "ssd")
MAX_SEED = 2**63 - 1  # fits a signed 64-bit database column

Auto = int | Literal["auto"]


@dataclass(frozen=True)
class ParameterProblem:
    """One invalid hyperparameter and why."""

    parameter: str
    message: str

    def __str__(self) -> str:
        return f"{self.parameter}: {self.message}"


class HyperparameterError(ValueError):
    """Invalid hyperparameters; ``errors`` lists every problem found, not just the first."""

    def __init__(self, errors: list[ParameterProblem]) -> None:
        self.errors = list(errors)
        super().__init__("invalid hyperparameters: " + "; ".join(map(str, self.errors)))


class _Invalid(Exception):
    """Raised by a parser with the message that goes into a ParameterProblem."""


@dataclass(frozen=True)
class KMeansHyperparameters:
    """The hyperparameters of SageMaker's KMeans, plus ``seed`` (a Centroid extension)."""

    k: int
    feature_dim: int
    mini_batch_size: int = 5000
    epochs: int = 1
    init_method: str = "random"
    extra_center_factor: Auto = AUTO
    local_lloyd_max_iter: int = 300
    local_lloyd_tol: float = 0.0001
    local_lloyd_init_method: str = "kmeans++"
    local_lloyd_num_trials: Auto = AUTO
    half_life_time_size: int = 0
    eval_metrics: tuple[str, ...] = ("msd",)
    seed: int | None = None

    def __post_init__(self) -> None:
        """Validate and normalize (e.g. "10" -> 10, list -> tuple) with from_mapping's rules."""
        parsed, problems = _parse_all({f.name: getattr(self, f.name) for f in fields(self)})
        if problems:
            raise HyperparameterError(problems)
        for name, value in parsed.items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, object]) -> KMeansHyperparameters:
        """Parse SageMaker-style values (strings or native types); raise HyperparameterError."""
        missing = [ParameterProblem(key, f"is required; {_rule(key)}") for key in _REQUIRED if key not in raw]
        unknown = [ParameterProblem(str(key), "unknown hyperparameter") for key in raw if key not in _PARSERS]
        parsed, problems = _parse_all({key: raw[key] for key in raw if key in _PARSERS})
        if missing or unknown or problems:
            raise HyperparameterError(missing + unknown + problems)
        return cls(**parsed)  # type: ignore[arg-type]

    def to_sagemaker(self) -> dict[str, str]:
        """The ``HyperParameters`` map for SageMaker's CreateTrainingJob (strings; no seed)."""
        values = self.to_dict()
        del values["seed"]
        values["eval_metrics"] = json.dumps(values["eval_metrics"])
        return {key: str(value) for key, value in values.items()}

    def to_dict(self) -> dict[str, object]:
        """A JSON-friendly dict that round-trips through :meth:`from_mapping`."""
        values = asdict(self)
        values["eval_metrics"] = list(self.eval_metrics)
        return values

    @property
    def effective_extra_center_factor(self) -> int:
        """extra_center_factor with ``auto`` resolved."""
        return _resolve(self.extra_center_factor)

    @property
    def effective_num_trials(self) -> int:
        """local_lloyd_num_trials with ``auto`` resolved."""
        return _resolve(self.local_lloyd_num_trials)

    def validate_against(self, n_rows: int, n_features: int, *, what: str = "training") -> None:
        """Check the hyperparameters fit data with ``n_rows`` rows and ``n_features`` columns.

        Every data set must have ``feature_dim`` columns; only training data needs >= k rows.
        """
        problems = []
        if self.feature_dim != n_features:
            problems.append(
                ParameterProblem(
                    "feature_dim",
                    f"must equal the number of columns of the {what} data ({n_features}), got {self.feature_dim}",
                )
            )
        if what == "training" and self.k > n_rows:
            problems.append(ParameterProblem("k", f"must be <= the number of training rows ({n_rows}), got {self.k}"))
        if problems:
            raise HyperparameterError(problems)


def _resolve(value: Auto) -> int:
    return AUTO_VALUE if value == AUTO else int(value)


def _parse_all(raw: Mapping[str, object]) -> tuple[dict[str, object], list[ParameterProblem]]:
    parsed: dict[str, object] = {}
    problems: list[ParameterProblem] = []
    for key, value in raw.items():
        try:
            parsed[key] = _PARSERS[key](value)
        except _Invalid as exc:
            problems.append(ParameterProblem(key, f"{exc} (got {value!r})"))
    return parsed, problems


def _rule(key: str) -> str:
    """The valid-values sentence of ``key`` (every parser rejects None with it)."""
    try:
        _PARSERS[key](None)
    except _Invalid as exc:
        return str(exc)
    raise AssertionError(f"{key} accepts None")


def _integer(value: object, minimum: int, maximum: int | None = None) -> int:
    """An int from an int, an integral float or a numeric string; bools are rejected."""
    rule = f"must be an integer >= {minimum}" + ("" if maximum is None else f" and <= {maximum}")
    number = _number(value, rule)
    if not math.isfinite(number) or number != int(number):
        raise _Invalid(rule)
    result = int(number)
    if result < minimum or (maximum is not None and result > maximum):
        raise _Invalid(rule)
    return result


def _number(value: object, rule: str) -> float | int:
    if isinstance(value, bool | np.bool_):
        raise _Invalid(rule)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            pass
        try:
            return float(text)
        except ValueError:
            raise _Invalid(rule) from None
    raise _Invalid(rule)


def _int_at_least(minimum: int) -> Callable[[object], int]:
    return lambda value: _integer(value, minimum)


def _int_or_auto(value: object) -> Auto:
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    try:
        return _integer(value, 1)
    except _Invalid:
        raise _Invalid(f"must be an integer >= 1 or '{AUTO}'") from None


def _tol(value: object) -> float:
    rule = "must be a number in [0, 1]"
    number = float(_number(value, rule))
    if not 0.0 <= number <= 1.0:  # also rejects NaN
        raise _Invalid(rule)
    return number


def _choice(options: tuple[str, ...]) -> Callable[[object], str]:
    def parse(value: object) -> str:
        if not isinstance(value, str) or value.strip() not in options:
            raise _Invalid("must be one of " + ", ".join(repr(option) for option in options))
        return value.strip()

    return parse


def _eval_metrics(value: object) -> tuple[str, ...]:
    """A JSON list string (SageMaker's form), a comma-separated string, or a list/tuple."""
    items = _json_or_csv(value) if isinstance(value, str) else value
    if (
        not isinstance(items, list | tuple)
        or not items
        or any(item not in EVAL_METRICS for item in items)
        or len(set(items)) != len(items)
    ):
        raise _Invalid(f"must be a non-empty list of distinct values from {list(EVAL_METRICS)}")
    return tuple(items)


def _json_or_csv(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return [item.strip() for item in text.split(",")]


def _seed(value: object) -> int | None:
    return None if value is None else _integer(value, 0, MAX_SEED)


_PARSERS: dict[str, Callable[[object], object]] = {
    "k": _int_at_least(2),
    "feature_dim": _int_at_least(1),
    "mini_batch_size": _int_at_least(1),
    "epochs": _int_at_least(1),
    "init_method": _choice(INIT_METHODS),
    "extra_center_factor": _int_or_auto,
    "local_lloyd_max_iter": _int_at_least(1),
    "local_lloyd_tol": _tol,
    "local_lloyd_init_method": _choice(INIT_METHODS),
    "local_lloyd_num_trials": _int_or_auto,
    "half_life_time_size": _int_at_least(0),
    "eval_metrics": _eval_metrics,
    "seed": _seed,
}
_REQUIRED = ("k", "feature_dim")
assert set(_PARSERS) == {f.name for f in fields(KMeansHyperparameters)}
