"""SageMaker KMeans hyperparameters: parsing, validation and serialization.

Names, ranges and defaults follow SageMaker's built-in KMeans so one recipe can train locally or on
SageMaker. SageMaker sends every value as a string, so :meth:`KMeansHyperparameters.from_mapping`
accepts both strings and native values, and reports *all* problems at once.

Maps copied from SageMaker (``DescribeTrainingJob`` of a job the SageMaker Python SDK launched)
also carry keys that are not KMeans hyperparameters: ``force_dense`` (the SDK always sends it)
and the container's own settings (``_num_gpus``, ``_kvstore``, ...), see
:data:`SAGEMAKER_CONTAINER_PARAMETERS`. They are accepted in SageMaker's forms, kept as given in
``sagemaker_extras`` (sent to SageMaker unchanged by :meth:`KMeansHyperparameters.to_sagemaker`)
and have no effect on Centroid's engine. Any other unknown name is a problem.

SageMaker documents no upper bounds, but every value here costs work (``epochs`` passes,
``local_lloyd_num_trials`` x ``local_lloyd_max_iter`` Lloyd iterations, k x
``extra_center_factor`` local centers, ``mini_batch_size`` rows in memory at once). Integers
are capped at :data:`MAX_INT` (a signed 64-bit column) whatever the caller, and
``from_mapping(..., ceilings=...)`` refuses values above the caller's own limits (the service
passes its configured ceilings; the engine itself reads no settings).
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
MAX_INT = 2**63 - 1  # every integer hyperparameter fits a signed 64-bit column
MAX_SEED = MAX_INT
# Hyperparameters a caller may give a ceiling for (``from_mapping(..., ceilings=...)``).
CEILING_PARAMETERS = (
    "k",
    "mini_batch_size",
    "epochs",
    "extra_center_factor",
    "local_lloyd_max_iter",
    "local_lloyd_num_trials",
)

Auto = int | Literal["auto"]
Extras = tuple[tuple[str, str], ...]


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
    #: SageMaker-only keys (:data:`SAGEMAKER_CONTAINER_PARAMETERS`) as (name, value) pairs sorted
    #: by name, values as given (strings); a mapping is accepted and normalized. The engine
    #: ignores them; :meth:`to_sagemaker` sends them unchanged.
    sagemaker_extras: Extras = ()

    def __post_init__(self) -> None:
        """Validate and normalize (e.g. "10" -> 10, list -> tuple) with from_mapping's rules."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != EXTRAS_FIELD}
        parsed, problems = _parse_all(values)
        extras, extra_problems = _parse_extras(_extra_items(self.sagemaker_extras))
        if problems or extra_problems:
            raise HyperparameterError(problems + extra_problems)
        for name, value in parsed.items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, EXTRAS_FIELD, extras)

    @classmethod
    def from_mapping(
        cls, raw: Mapping[str, object], *, ceilings: Mapping[str, int] | None = None
    ) -> KMeansHyperparameters:
        """Parse SageMaker-style values (strings or native types); raise HyperparameterError.

        ``ceilings`` maps names from :data:`CEILING_PARAMETERS` to the largest value allowed
        (``auto`` counts as the value it resolves to); a value above its ceiling is a problem
        naming the parameter and the ceiling.
        """
        missing = [ParameterProblem(key, f"is required; {_rule(key)}") for key in _REQUIRED if key not in raw]
        unknown = [
            ParameterProblem(str(key)[:100], "unknown hyperparameter")
            for key in raw
            if key not in _PARSERS and key not in _EXTRA_PARSERS
        ]
        parsed, problems = _parse_all({key: raw[key] for key in raw if key in _PARSERS})
        problems = [_as_ceiling_problem(problem, raw[problem.parameter], ceilings or {}) for problem in problems]
        extras, extra_problems = _parse_extras([(key, raw[key]) for key in raw if key in _EXTRA_PARSERS])
        invalid = {problem.parameter for problem in problems}
        values = {key: value for key, value in {**_DEFAULTS, **parsed}.items() if key not in invalid}
        over = _over_ceilings(values, ceilings or {})
        if missing or unknown or problems or extra_problems or over:
            raise HyperparameterError(missing + unknown + problems + extra_problems + over)
        return cls(**parsed, sagemaker_extras=extras)  # type: ignore[arg-type]

    def to_sagemaker(self) -> dict[str, str]:
        """The ``HyperParameters`` map for SageMaker's CreateTrainingJob (strings; no seed).

        ``sagemaker_extras`` are included exactly as they were given."""
        values = self.to_dict()
        del values["seed"]
        values["eval_metrics"] = json.dumps(values["eval_metrics"])
        return {key: str(value) for key, value in values.items()}

    def to_dict(self) -> dict[str, object]:
        """A JSON-friendly dict that round-trips through :meth:`from_mapping`: the hyperparameters,
        then each of ``sagemaker_extras`` under its own name (as SageMaker's maps carry them)."""
        values = asdict(self)
        del values[EXTRAS_FIELD]
        values["eval_metrics"] = list(self.eval_metrics)
        return {**values, **dict(self.sagemaker_extras)}

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


def _over_ceilings(values: Mapping[str, object], ceilings: Mapping[str, int]) -> list[ParameterProblem]:
    """One problem per value above its ceiling (defaults count: a ceiling below one is refused too)."""
    problems = []
    for name, ceiling in ceilings.items():
        if name not in CEILING_PARAMETERS:
            raise ValueError(f"no ceiling can be set for {name!r}; only for {', '.join(CEILING_PARAMETERS)}")
        value = values.get(name)
        if not isinstance(value, int) and value != AUTO:
            continue  # missing or invalid: reported already
        number = _resolve(value)  # type: ignore[arg-type]
        if number > ceiling:
            shown = f"'{AUTO}' = {number}" if value == AUTO else str(number)
            problems.append(ParameterProblem(name, f"must be <= {ceiling}, this service's ceiling (got {shown})"))
    return problems


def _as_ceiling_problem(problem: ParameterProblem, value: object, ceilings: Mapping[str, int]) -> ParameterProblem:
    """An integer too large even for int64 is reported against the parameter's ceiling, if it has one."""
    ceiling = ceilings.get(problem.parameter)
    if ceiling is None or isinstance(value, bool) or not isinstance(value, int | str):
        return problem
    try:
        number = int(value)
    except ValueError:
        return problem
    if number <= ceiling:
        return problem
    return ParameterProblem(problem.parameter, f"must be <= {ceiling}, this service's ceiling (got {_shown(value)})")


def _shown(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: an error message never echoes a huge value."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond Python's digit limit for str()
        return f"<{type(value).__name__} too large to show>"
    return text if len(text) <= limit else f"{text[: limit - 5]}...({len(text)} chars)"


def _parse_all(raw: Mapping[str, object]) -> tuple[dict[str, object], list[ParameterProblem]]:
    parsed: dict[str, object] = {}
    problems: list[ParameterProblem] = []
    for key, value in raw.items():
        try:
            parsed[key] = _PARSERS[key](value)
        except _Invalid as exc:
            problems.append(ParameterProblem(key, f"{exc} (got {_shown(value)})"))
    return parsed, problems


def _rule(key: str) -> str:
    """The valid-values sentence of ``key`` (every parser rejects None with it)."""
    try:
        _PARSERS[key](None)
    except _Invalid as exc:
        return str(exc)
    raise AssertionError(f"{key} accepts None")


def _integer(value: object, minimum: int, maximum: int | None = None) -> int:
    """An int from an int, an integral float or a numeric string; bools are rejected.

    Integers are compared as integers (``10**400`` is out of range, not an OverflowError), and
    none exceeds :data:`MAX_INT` whatever ``maximum`` says.
    """
    rule = f"must be an integer >= {minimum}" + ("" if maximum is None else f" and <= {maximum}")
    number = _number(value, rule)
    if isinstance(number, float):
        if not math.isfinite(number) or number != int(number):
            raise _Invalid(rule)
        number = int(number)
    if number < minimum:
        raise _Invalid(rule)
    if number > (MAX_INT if maximum is None else min(maximum, MAX_INT)):
        raise _Invalid(rule if maximum is not None else f"{rule} and <= {MAX_INT}")
    return number


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
        except ValueError:  # not an integer, or more digits than Python converts
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
    number = _number(value, rule)
    if isinstance(number, int) and not 0 <= number <= 1:  # before float(): 10**400 has no float
        raise _Invalid(rule)
    number = float(number)
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


# --- SageMaker-only keys: accepted in SageMaker's forms, kept as given ------------------------------

MAX_EXTRA_TEXT = 256  # longest free-text value of a container setting (_kvstore, _log_level, ...)


def _extra_text(value: object) -> str:
    """A value as SageMaker's string map holds it: strings as given, numbers and bools as the
    SageMaker Python SDK writes them (``str(value)``: ``True``, ``5``)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float) and not (isinstance(value, float) and not math.isfinite(value)):
        return str(value)
    raise _Invalid("must be a string, a number or a boolean")


def _extra_bool(value: object) -> str:
    """``true`` / ``false`` in any case (the SDK writes ``True``, the container's defaults ``true``)."""
    rule = "must be 'true' or 'false' (any case)"
    if isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or value.lower() not in ("true", "false"):  # sent as is: no spaces
        raise _Invalid(rule)
    return value


def _extra_count(minimum: int, auto: bool) -> Callable[[object], str]:
    """A whole number >= ``minimum`` written in digits (or ``auto`` where the container allows it)."""
    rule = f"must be an integer >= {minimum}" + (f" or '{AUTO}'" if auto else "")

    def parse(value: object) -> str:
        if isinstance(value, bool):
            raise _Invalid(rule)
        if isinstance(value, int | np.integer):
            if not minimum <= int(value) <= MAX_INT:
                raise _Invalid(rule)
            return str(int(value))
        if not isinstance(value, str):
            raise _Invalid(rule)
        if auto and value.lower() == AUTO:  # sent as is: no spaces
            return value
        if not value.isascii() or not value.isdigit() or len(value) > 19 or not minimum <= int(value) <= MAX_INT:
            raise _Invalid(rule)
        return value

    return parse


def _extra_free_text(value: object) -> str:
    text = _extra_text(value)
    if len(text) > MAX_EXTRA_TEXT:
        raise _Invalid(f"must be at most {MAX_EXTRA_TEXT} characters")
    return text


#: Keys a SageMaker ``HyperParameters`` map carries besides KMeans's hyperparameters: the SDK's
#: ``force_dense`` and the KMeans container's own settings (its ``default-input.json``). Accepted
#: with the values SageMaker takes, sent to SageMaker unchanged, ignored by the local engine.
_EXTRA_PARSERS: dict[str, Callable[[object], str]] = {
    "force_dense": _extra_bool,
    "_disable_wait_to_read": _extra_bool,
    "_enable_profiler": _extra_bool,
    "_kvstore": _extra_free_text,
    "_log_level": _extra_free_text,
    "_num_gpus": _extra_count(0, auto=True),
    "_num_kv_servers": _extra_count(1, auto=True),
    "_num_slices": _extra_count(1, auto=False),
    "_tuning_objective_metric": _extra_free_text,
}
SAGEMAKER_CONTAINER_PARAMETERS: Final = tuple(_EXTRA_PARSERS)
EXTRAS_FIELD: Final = "sagemaker_extras"


def _extra_items(value: object) -> list[tuple[object, object]]:
    """``sagemaker_extras`` as given to the constructor: a mapping or (name, value) pairs."""
    if isinstance(value, Mapping):
        return list(value.items())
    if isinstance(value, list | tuple) and all(isinstance(pair, list | tuple) and len(pair) == 2 for pair in value):
        return [(pair[0], pair[1]) for pair in value]
    return [(EXTRAS_FIELD, value)]  # reported below as not a SageMaker-only key


def _parse_extras(items: list[tuple[object, object]]) -> tuple[Extras, list[ParameterProblem]]:
    parsed: dict[str, str] = {}
    problems: list[ParameterProblem] = []
    for key, value in items:
        name = str(key)
        parser = _EXTRA_PARSERS.get(name) if isinstance(key, str) else None
        if parser is None:
            problems.append(ParameterProblem(name[:100], "unknown hyperparameter"))
            continue
        try:
            parsed[name] = parser(value)
        except _Invalid as exc:
            problems.append(ParameterProblem(name, f"{exc} (got {_shown(value)})"))
    return tuple(sorted(parsed.items())), problems


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
_DEFAULTS = {f.name: f.default for f in fields(KMeansHyperparameters) if f.name not in (*_REQUIRED, EXTRAS_FIELD)}
assert set(_PARSERS) == {f.name for f in fields(KMeansHyperparameters)} - {EXTRAS_FIELD}
assert set(CEILING_PARAMETERS) <= set(_PARSERS)
assert not set(_EXTRA_PARSERS) & set(_PARSERS)
