"""Hyperparameter parsing and validation follow SageMaker KMeans's names, ranges and defaults."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.engine import HyperparameterError, KMeansHyperparameters, ParameterProblem

BASE = {"k": "10", "feature_dim": "5"}


def parse(**overrides: object) -> KMeansHyperparameters:
    return KMeansHyperparameters.from_mapping({**BASE, **overrides})


def problems(raw: dict[str, object]) -> dict[str, str]:
    with pytest.raises(HyperparameterError) as caught:
        KMeansHyperparameters.from_mapping(raw)
    return {p.parameter: p.message for p in caught.value.errors}


def test_defaults_match_sagemaker() -> None:
    hp = KMeansHyperparameters.from_mapping(BASE)
    assert hp == KMeansHyperparameters(k=10, feature_dim=5)
    assert (hp.mini_batch_size, hp.epochs, hp.init_method) == (5000, 1, "random")
    assert (hp.extra_center_factor, hp.local_lloyd_num_trials) == ("auto", "auto")
    assert (hp.local_lloyd_max_iter, hp.local_lloyd_tol, hp.local_lloyd_init_method) == (
        300,
        0.0001,
        "kmeans++",
    )
    assert (hp.half_life_time_size, hp.eval_metrics, hp.seed) == (0, ("msd",), None)
    assert (hp.effective_extra_center_factor, hp.effective_num_trials) == (10, 10)


def test_sagemaker_strings_are_parsed() -> None:
    hp = KMeansHyperparameters.from_mapping(
        {
            "k": "10",
            "feature_dim": "5",
            "mini_batch_size": "500",
            "epochs": "3",
            "init_method": "kmeans++",
            "extra_center_factor": "4",
            "local_lloyd_max_iter": "100",
            "local_lloyd_tol": "1e-3",
            "local_lloyd_init_method": "random",
            "local_lloyd_num_trials": "7",
            "half_life_time_size": "1000",
            "eval_metrics": '["msd", "ssd"]',
            "seed": "42",
        }
    )
    assert hp == KMeansHyperparameters(
        k=10,
        feature_dim=5,
        mini_batch_size=500,
        epochs=3,
        init_method="kmeans++",
        extra_center_factor=4,
        local_lloyd_max_iter=100,
        local_lloyd_tol=0.001,
        local_lloyd_init_method="random",
        local_lloyd_num_trials=7,
        half_life_time_size=1000,
        eval_metrics=("msd", "ssd"),
        seed=42,
    )
    assert (hp.effective_extra_center_factor, hp.effective_num_trials) == (4, 7)


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("k", 2, 2),
        ("k", "3", 3),
        ("k", 3.0, 3),
        ("k", " 12 ", 12),
        ("k", np.int64(4), 4),
        ("epochs", "3.0", 3),
        ("extra_center_factor", "auto", "auto"),
        ("extra_center_factor", "AUTO", "auto"),
        ("extra_center_factor", 1, 1),
        ("local_lloyd_num_trials", "auto", "auto"),
        ("local_lloyd_num_trials", "2", 2),
        ("local_lloyd_tol", "0", 0.0),
        ("local_lloyd_tol", 1, 1.0),
        ("half_life_time_size", "0", 0),
        ("eval_metrics", ["ssd"], ("ssd",)),
        ("eval_metrics", ("ssd", "msd"), ("ssd", "msd")),
        ("eval_metrics", "msd,ssd", ("msd", "ssd")),
        ("eval_metrics", "ssd", ("ssd",)),
        ("seed", None, None),
        ("seed", "0", 0),
    ],
)
def test_valid_values(name: str, value: object, expected: object) -> None:
    assert getattr(parse(**{name: value}), name) == expected


@pytest.mark.parametrize(
    ("name", "value", "rule"),
    [
        ("k", "1", "must be an integer >= 2"),
        ("k", "3.5", "must be an integer >= 2"),
        ("k", True, "must be an integer >= 2"),
        ("k", "ten", "must be an integer >= 2"),
        ("k", None, "must be an integer >= 2"),
        ("feature_dim", 0, "must be an integer >= 1"),
        ("mini_batch_size", "0", "must be an integer >= 1"),
        ("mini_batch_size", False, "must be an integer >= 1"),
        ("epochs", "-1", "must be an integer >= 1"),
        ("epochs", "inf", "must be an integer >= 1"),
        ("init_method", "k-means++", "must be one of 'random', 'kmeans++'"),
        ("init_method", 1, "must be one of 'random', 'kmeans++'"),
        ("extra_center_factor", "0", "must be an integer >= 1 or 'auto'"),
        ("extra_center_factor", "automatic", "must be an integer >= 1 or 'auto'"),
        ("local_lloyd_max_iter", "0", "must be an integer >= 1"),
        ("local_lloyd_tol", "1.5", "must be a number in [0, 1]"),
        ("local_lloyd_tol", "-0.1", "must be a number in [0, 1]"),
        ("local_lloyd_tol", "nan", "must be a number in [0, 1]"),
        ("local_lloyd_tol", True, "must be a number in [0, 1]"),
        ("local_lloyd_init_method", "kmeans", "must be one of 'random', 'kmeans++'"),
        ("local_lloyd_num_trials", 0, "must be an integer >= 1 or 'auto'"),
        ("half_life_time_size", "-1", "must be an integer >= 0"),
        ("eval_metrics", "[]", "must be a non-empty list of distinct values from ['msd', 'ssd']"),
        ("eval_metrics", '["mse"]', "must be a non-empty list of distinct values"),
        ("eval_metrics", ["msd", "msd"], "must be a non-empty list of distinct values"),
        ("eval_metrics", '"msd"', "must be a non-empty list of distinct values"),
        ("eval_metrics", 3, "must be a non-empty list of distinct values"),
        ("seed", -1, "must be an integer >= 0"),
        ("seed", 2**63, "must be an integer >= 0 and <= 9223372036854775807"),
        ("seed", 1.5, "must be an integer >= 0"),
    ],
)
def test_invalid_values_name_the_parameter_and_range(name: str, value: object, rule: str) -> None:
    found = problems({**BASE, name: value})
    assert list(found) == [name]
    assert found[name].startswith(rule)
    assert found[name].endswith(f"(got {value!r})")


def test_error_message_format() -> None:
    with pytest.raises(HyperparameterError) as caught:
        parse(k="1")
    assert "k: must be an integer >= 2 (got '1')" in str(caught.value)
    assert caught.value.errors == [ParameterProblem("k", "must be an integer >= 2 (got '1')")]
    assert isinstance(caught.value, ValueError)


def test_all_problems_are_reported_at_once() -> None:
    found = problems({"k": "1", "epochs": "0", "init_method": "x", "colour": "red"})
    assert set(found) == {"k", "feature_dim", "epochs", "init_method", "colour"}
    assert found["feature_dim"] == "is required; must be an integer >= 1"
    assert found["colour"] == "unknown hyperparameter"


def test_missing_required() -> None:
    found = problems({})
    assert found == {
        "k": "is required; must be an integer >= 2",
        "feature_dim": "is required; must be an integer >= 1",
    }


def test_direct_construction_is_validated_and_normalized() -> None:
    with pytest.raises(HyperparameterError, match="k: must be an integer >= 2"):
        KMeansHyperparameters(k=1, feature_dim=2)
    hp = KMeansHyperparameters(k=3, feature_dim=2, eval_metrics=["ssd"])  # type: ignore[arg-type]
    assert hp.eval_metrics == ("ssd",)
    assert hash(hp) == hash(KMeansHyperparameters(k=3, feature_dim=2, eval_metrics=("ssd",)))


def test_to_sagemaker_is_all_strings_without_seed() -> None:
    hp = parse(eval_metrics=["msd", "ssd"], seed=3, extra_center_factor=2)
    assert hp.to_sagemaker() == {
        "k": "10",
        "feature_dim": "5",
        "mini_batch_size": "5000",
        "epochs": "1",
        "init_method": "random",
        "extra_center_factor": "2",
        "local_lloyd_max_iter": "300",
        "local_lloyd_tol": "0.0001",
        "local_lloyd_init_method": "kmeans++",
        "local_lloyd_num_trials": "auto",
        "half_life_time_size": "0",
        "eval_metrics": '["msd", "ssd"]',
    }
    assert KMeansHyperparameters.from_mapping(hp.to_sagemaker()) == parse(
        eval_metrics=["msd", "ssd"], extra_center_factor=2
    )


def test_to_dict_is_json_and_round_trips() -> None:
    hp = parse(seed=9, eval_metrics="ssd")
    as_json = json.loads(json.dumps(hp.to_dict()))
    assert as_json["eval_metrics"] == ["ssd"]
    assert KMeansHyperparameters.from_mapping(as_json) == hp


def test_validate_against_data_shape() -> None:
    hp = KMeansHyperparameters(k=60, feature_dim=4)
    with pytest.raises(HyperparameterError) as caught:
        hp.validate_against(n_rows=50, n_features=5)
    assert {p.parameter for p in caught.value.errors} == {"k", "feature_dim"}
    assert "k: must be <= the number of training rows (50), got 60" in str(caught.value)
    assert "feature_dim: must equal the number of columns of the training data (5), got 4" in str(caught.value)
    KMeansHyperparameters(k=50, feature_dim=5).validate_against(n_rows=50, n_features=5)


_settings = st.fixed_dictionaries(
    {"k": st.integers(2, 10**6), "feature_dim": st.integers(1, 10**4)},
    optional={
        "mini_batch_size": st.integers(1, 10**7),
        "epochs": st.integers(1, 1000),
        "init_method": st.sampled_from(["random", "kmeans++"]),
        "extra_center_factor": st.one_of(st.just("auto"), st.integers(1, 100)),
        "local_lloyd_max_iter": st.integers(1, 10**4),
        "local_lloyd_tol": st.floats(0, 1),
        "local_lloyd_init_method": st.sampled_from(["random", "kmeans++"]),
        "local_lloyd_num_trials": st.one_of(st.just("auto"), st.integers(1, 100)),
        "half_life_time_size": st.integers(0, 10**9),
        "eval_metrics": st.sampled_from([["msd"], ["ssd"], ["msd", "ssd"], ["ssd", "msd"]]),
        "seed": st.one_of(st.none(), st.integers(0, 2**63 - 1)),
    },
)


@given(_settings)
def test_round_trips_through_strings_and_dicts(raw: dict[str, object]) -> None:
    hp = KMeansHyperparameters.from_mapping(raw)
    assert KMeansHyperparameters.from_mapping(hp.to_dict()) == hp
    from_strings = KMeansHyperparameters.from_mapping(hp.to_sagemaker())
    assert from_strings == KMeansHyperparameters(**{**hp.to_dict(), "seed": None})  # type: ignore[arg-type]


@given(
    st.dictionaries(
        st.sampled_from(["k", "feature_dim", "epochs", "seed", "eval_metrics", "x"]),
        st.text(max_size=8),
    )
)
def test_arbitrary_strings_parse_or_raise_hyperparameter_error(raw: dict[str, str]) -> None:
    try:
        KMeansHyperparameters.from_mapping(raw)
    except HyperparameterError as exc:
        assert exc.errors


# --- integers beyond float range, and ceilings (issue 16: #2, #6) ---------------------------------


@pytest.mark.parametrize("name", ["k", "mini_batch_size", "epochs", "local_lloyd_max_iter", "half_life_time_size"])
@pytest.mark.parametrize("value", [10**400, str(10**400), 2**63, -(10**400)])
def test_integers_beyond_float_or_int64_range_are_problems_not_overflows(name: str, value: object) -> None:
    found = problems({**BASE, name: value})
    assert list(found) == [name]
    assert found[name].startswith("must be an integer >=")
    assert len(found[name]) < 200  # the value is shown cut short, not echoed whole


@pytest.mark.parametrize("name", ["extra_center_factor", "local_lloyd_num_trials"])
def test_auto_parameters_refuse_huge_integers(name: str) -> None:
    assert problems({**BASE, name: 10**400})[name].startswith("must be an integer >= 1 or 'auto'")


def test_tolerance_and_seed_refuse_huge_integers() -> None:
    found = problems({**BASE, "local_lloyd_tol": 10**400, "seed": 10**400})
    assert found["local_lloyd_tol"].startswith("must be a number in [0, 1]")
    assert found["seed"].startswith(f"must be an integer >= 0 and <= {2**63 - 1}")


def test_digit_strings_longer_than_python_converts_are_problems() -> None:
    assert problems({**BASE, "epochs": "9" * 5000})["epochs"].startswith("must be an integer >= 1")


def test_the_largest_int64_is_still_accepted_without_ceilings() -> None:
    assert parse(epochs=2**63 - 1).epochs == 2**63 - 1


CEILINGS = {
    "k": 100,
    "epochs": 50,
    "mini_batch_size": 10_000,
    "extra_center_factor": 20,
    "local_lloyd_max_iter": 1000,
    "local_lloyd_num_trials": 30,
}


@pytest.mark.parametrize(("name", "ceiling"), sorted(CEILINGS.items()))
def test_a_value_above_its_ceiling_names_the_parameter_and_the_ceiling(name: str, ceiling: int) -> None:
    with pytest.raises(HyperparameterError) as caught:
        KMeansHyperparameters.from_mapping({**BASE, name: ceiling + 1}, ceilings=CEILINGS)
    assert caught.value.errors == [
        ParameterProblem(name, f"must be <= {ceiling}, this service's ceiling (got {ceiling + 1})")
    ]
    assert getattr(KMeansHyperparameters.from_mapping({**BASE, name: ceiling}, ceilings=CEILINGS), name) == ceiling


def test_auto_counts_as_the_value_it_resolves_to() -> None:
    with pytest.raises(HyperparameterError, match=r"local_lloyd_num_trials: must be <= 5, .*\(got 'auto' = 10\)"):
        KMeansHyperparameters.from_mapping(BASE, ceilings={"local_lloyd_num_trials": 5})


def test_ceiling_problems_come_with_the_other_problems_and_skip_invalid_values() -> None:
    with pytest.raises(HyperparameterError) as caught:
        KMeansHyperparameters.from_mapping(
            {**BASE, "epochs": 10**18, "mini_batch_size": "x", "colour": 1}, ceilings=CEILINGS
        )
    assert [p.parameter for p in caught.value.errors] == ["colour", "mini_batch_size", "epochs"]


def test_unknown_ceilings_are_a_programming_error() -> None:
    with pytest.raises(ValueError, match="no ceiling can be set for 'seed'"):
        KMeansHyperparameters.from_mapping(BASE, ceilings={"seed": 1})


# --- maps as SageMaker and its SDK write them (issue 13, part 3) -----------------------------------

#: ``HyperParameters`` of DescribeTrainingJob for a job the SageMaker Python SDK launched, as the
#: KMeans container's "Final configuration" log shows it: every value a string.
SDK_MAP = {
    "k": "8",
    "feature_dim": "7",
    "init_method": "random",
    "mini_batch_size": "5000",
    "epochs": "1",
    "extra_center_factor": "auto",
    "local_lloyd_max_iter": "300",
    "local_lloyd_tol": "0.0001",
    "local_lloyd_init_method": "kmeans++",
    "local_lloyd_num_trials": "auto",
    "half_life_time_size": "0",
    "eval_metrics": '["msd"]',
    "force_dense": "True",
    "_disable_wait_to_read": "false",
    "_enable_profiler": "false",
    "_kvstore": "auto",
    "_log_level": "info",
    "_num_gpus": "auto",
    "_num_kv_servers": "1",
    "_num_slices": "1",
    "_tuning_objective_metric": "",
}
EXTRAS = {key: value for key, value in SDK_MAP.items() if key == "force_dense" or key.startswith("_")}


def test_an_sdk_map_is_accepted_and_its_sagemaker_only_keys_kept_as_given() -> None:
    from service.engine.hyperparameters import SAGEMAKER_CONTAINER_PARAMETERS

    assert set(SAGEMAKER_CONTAINER_PARAMETERS) == set(EXTRAS)
    hp = KMeansHyperparameters.from_mapping(SDK_MAP)
    assert hp.sagemaker_extras == tuple(sorted(EXTRAS.items()))
    assert hp.to_sagemaker() == SDK_MAP  # SageMaker gets every key and value back unchanged
    assert KMeansHyperparameters.from_mapping(hp.to_dict()) == hp
    assert KMeansHyperparameters.from_mapping(json.loads(json.dumps(hp.to_dict()))) == hp
    plain = KMeansHyperparameters.from_mapping({k: v for k, v in SDK_MAP.items() if k not in EXTRAS})
    assert plain == KMeansHyperparameters(k=8, feature_dim=7) and plain.sagemaker_extras == ()
    # the engine's hyperparameters are the same with or without them
    assert {**hp.to_dict(), **dict.fromkeys(EXTRAS)} == {**plain.to_dict(), **dict.fromkeys(EXTRAS)}


@pytest.mark.parametrize(
    ("name", "value", "kept"),
    [
        ("force_dense", "True", "True"),
        ("force_dense", "false", "false"),
        ("force_dense", "FALSE", "FALSE"),
        ("force_dense", True, "True"),
        ("_enable_profiler", False, "False"),
        ("_num_gpus", "auto", "auto"),
        ("_num_gpus", "0", "0"),
        ("_num_gpus", 2, "2"),
        ("_num_kv_servers", "AUTO", "AUTO"),
        ("_num_slices", np.int64(3), "3"),
        ("_kvstore", "dist_sync", "dist_sync"),
        ("_log_level", "debug", "debug"),
        ("_tuning_objective_metric", "test:msd", "test:msd"),
        ("_tuning_objective_metric", "", ""),
    ],
)
def test_sagemaker_only_values_in_sagemakers_forms(name: str, value: object, kept: str) -> None:
    assert dict(parse(**{name: value}).sagemaker_extras) == {name: kept}


@pytest.mark.parametrize(
    ("name", "value", "rule"),
    [
        ("force_dense", "yes", "must be 'true' or 'false' (any case)"),
        ("force_dense", 1, "must be 'true' or 'false' (any case)"),
        ("_disable_wait_to_read", None, "must be 'true' or 'false' (any case)"),
        ("_num_gpus", "-1", "must be an integer >= 0 or 'auto'"),
        ("_num_gpus", "1.0", "must be an integer >= 0 or 'auto'"),
        ("_num_kv_servers", "0", "must be an integer >= 1 or 'auto'"),
        ("_num_slices", "auto", "must be an integer >= 1"),
        ("_num_slices", True, "must be an integer >= 1"),
        ("_kvstore", ["auto"], "must be a string, a number or a boolean"),
        ("_log_level", "x" * 300, "must be at most 256 characters"),
    ],
)
def test_sagemaker_only_values_outside_sagemakers_forms_are_problems(name: str, value: object, rule: str) -> None:
    found = problems({**BASE, name: value})
    assert list(found) == [name]
    assert found[name].startswith(rule)


def test_unknown_names_stay_problems_beside_sagemaker_only_keys() -> None:
    found = problems({**SDK_MAP, "_num_cpus": "2", "forcedense": "True", "sagemaker_extras": "x"})
    assert found == {
        "_num_cpus": "unknown hyperparameter",
        "forcedense": "unknown hyperparameter",
        "sagemaker_extras": "unknown hyperparameter",
    }


def test_direct_construction_takes_sagemaker_only_keys_as_a_mapping() -> None:
    hp = KMeansHyperparameters(k=3, feature_dim=2, sagemaker_extras={"force_dense": True, "_kvstore": "auto"})  # type: ignore[arg-type]
    assert hp.sagemaker_extras == (("_kvstore", "auto"), ("force_dense", "True"))
    assert hash(hp) == hash(KMeansHyperparameters.from_mapping({"k": 3, "feature_dim": 2, **dict(hp.sagemaker_extras)}))
    with pytest.raises(HyperparameterError, match="colour: unknown hyperparameter"):
        KMeansHyperparameters(k=3, feature_dim=2, sagemaker_extras={"colour": "red"})  # type: ignore[arg-type]


# --- eval_metrics: what a fit reports, and under which names ---------------------------------------


@pytest.mark.parametrize(
    ("eval_metrics", "names"),
    [
        ('["msd"]', ["train:msd", "train:msd_full_pass", "test:msd"]),
        ('["ssd"]', ["train:msd", "train:ssd_full_pass", "test:ssd"]),
        ('["ssd","msd"]', ["train:msd", "train:msd_full_pass", "train:ssd_full_pass", "test:msd", "test:ssd"]),
    ],
)
def test_eval_metrics_choose_the_reported_metrics(eval_metrics: str, names: list[str]) -> None:
    from sklearn.datasets import make_blobs
    from sklearn.metrics import pairwise_distances_argmin_min

    from service.engine import WebScaleKMeans

    X, _ = make_blobs(n_samples=600, centers=4, n_features=3, random_state=3)
    hp = KMeansHyperparameters.from_mapping({"k": 4, "feature_dim": 3, "seed": 1, "eval_metrics": eval_metrics})
    model = WebScaleKMeans.from_hyperparameters(hp).fit(X, test=X[:100])
    reported = model.metrics_.reported(hp.eval_metrics)
    assert list(reported) == names
    without_test = WebScaleKMeans.from_hyperparameters(hp).fit(X).metrics_.reported(hp.eval_metrics)
    assert list(without_test) == [name for name in names if not name.startswith("test:")]
    # SageMaker's train:msd: the local centers' weighted mean squared distance to the final centers
    _, distances = pairwise_distances_argmin_min(model.local_centers_, model.cluster_centers_.astype(np.float64))
    oracle = np.average(distances**2, weights=model.local_weights_)
    assert reported["train:msd"] == pytest.approx(oracle, rel=1e-9)
    # the full pass: every training point against the final centers
    _, to_final = pairwise_distances_argmin_min(X, model.cluster_centers_.astype(np.float64))
    full = {"train:msd_full_pass": np.mean(to_final**2), "train:ssd_full_pass": np.sum(to_final**2)}
    for name, value in full.items():
        if name in reported:
            assert reported[name] == pytest.approx(value, rel=1e-9)
    assert reported["train:msd"] < np.mean(to_final**2)  # not a pass over the data: a different figure


def test_old_metric_names_map_to_the_current_ones() -> None:
    from service.engine.metrics import current_metric_names

    old_local = {"train_msd": 1.0, "train_ssd": 60.0, "test_msd": 2.0, "test_ssd": 6.0}
    assert current_metric_names(old_local, local_engine=True) == {
        "train:msd_full_pass": 1.0,
        "train:ssd_full_pass": 60.0,
        "test:msd": 2.0,
        "test:ssd": 6.0,
    }
    old_sagemaker = {"train_msd": 0.5, "test_msd": 2.0, "train_progress": 100.0}
    assert current_metric_names(old_sagemaker, local_engine=False) == {
        "train:msd": 0.5,
        "test:msd": 2.0,
        "train:progress": 100.0,
    }
    current = {"train:msd": 0.5, "train:msd_full_pass": 1.0}
    assert current_metric_names(current, local_engine=True) == current
    assert current_metric_names({}, local_engine=True) == {}


@pytest.mark.parametrize(("name", "value"), [("force_dense", " true"), ("_num_slices", "1 "), ("_num_gpus", " auto")])
def test_sagemaker_only_values_are_sent_as_is_so_padding_is_refused(name: str, value: str) -> None:
    assert list(problems({**BASE, name: value})) == [name]
