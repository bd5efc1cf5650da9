"""``join`` with ``on``, ``left_on``/``right_on`` and ``suffixes``: both implementations against
``pandas.merge`` (:func:`tests.datasets.oracle.oracle_join`), the stored fitted forms (the newer one,
and the ``on`` form every earlier version stored), and the replay on raw rows of a recipe whose
join renamed columns (DataFrame replay, the compiled online path and the column lineage agree).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter

from schemas.datasets import DeriveStep
from service.datasets.online import compile_recipe
from service.datasets.steps import FittedJoin, FittedStep, parse_step
from service.datasets.transforms import Table, apply_steps, column_lineage, derived_recipe, replay
from service.errors import InvalidInput
from tests.datasets.oracle import JoinRefused, oracle_join
from tests.datasets.test_columnar_derive import HASH_JOIN_MEMORY, compare

STEPS = TypeAdapter(list[DeriveStep])
FITTED: TypeAdapter[FittedStep] = TypeAdapter(FittedStep)

# --- both implementations against pandas.merge ---------------------------------------------------

KEYS = [f"s{i}" for i in range(8)]
LEFT_KEYS = ["k", "State"]
RIGHT_KEYS = ["k", "id", "state_name"]
# Non-key columns. "Murder" and "x" may be on both sides; "Murder_l", "Murder_r" and "x_r" are what
# suffixes may produce (a collision); "id" on the left is named like a right join column. No right
# column is named like a left join column (not covered by the oracle; see the explicit case below).
LEFT_COLUMNS = ["Murder", "x", "Murder_l", "Murder_r", "id"]
RIGHT_COLUMNS = ["Murder", "x", "y", "Murder_r", "x_r"]
SUFFIXES = [None, None, ("_l", "_r"), ("_l", "_r"), ("_l", "_r"), ("", "_r"), ("_l", ""), ("", ""), ("_r", "_r")]


@st.composite
def side(draw: st.DrawFn, key_names: list[str], names: list[str]) -> tuple[pd.DataFrame, str, str | None]:
    """A table whose join column (unique text) is named like a key; it is the key column, mostly."""
    key_name = draw(st.sampled_from(key_names))
    keys = draw(st.lists(st.sampled_from(KEYS), min_size=1, max_size=6, unique=True))
    data: dict[str, pd.Series] = {key_name: pd.Series(keys, dtype="string")}
    shared = [n for n in ("Murder", "x") if n in names]  # drawn more often: names both sides may have
    pool = st.sampled_from([*shared, *shared, *(n for n in names if n != key_name)])
    for name in draw(st.lists(pool, min_size=1, max_size=4, unique=True)):
        kind = draw(st.sampled_from(["int64", "float64", "string"]))
        if kind == "int64":
            values: pd.Series = pd.Series(draw(st.lists(st.integers(-9, 9), min_size=len(keys), max_size=len(keys))))
        elif kind == "float64":
            cells = st.one_of(st.floats(-1e3, 1e3).map(lambda v: v + 0.0), st.none())
            values = pd.Series(draw(st.lists(cells, min_size=len(keys), max_size=len(keys))), dtype="float64")
        else:
            cells = st.one_of(st.sampled_from(["a", "b", " 1 "]), st.none())
            values = pd.Series(draw(st.lists(cells, min_size=len(keys), max_size=len(keys))), dtype="string")
        data[name] = values.astype(kind)
    return pd.DataFrame(data), key_name, key_name if draw(st.integers(0, 9)) < 8 else None


@st.composite
def join_requests(draw: st.DrawFn, left_join: str, right_join: str) -> dict[str, Any]:
    """A join naming its columns in one of the ways a client may (or not at all)."""
    how = draw(st.sampled_from(["inner", "left"]))
    step: dict[str, Any] = {"op": "join", "dataset_id": "R", "how": how}
    form = draw(st.sampled_from(["keys", "keys", "both", "left", "right", "on"]))
    if form == "both":
        step |= {"left_on": left_join, "right_on": right_join}
    elif form == "left":
        step["left_on"] = left_join
    elif form == "right":
        step["right_on"] = right_join
    elif form == "on":
        step["on"] = left_join  # refused as missing on the right unless both are named alike
    suffixes = draw(st.sampled_from(SUFFIXES))
    if suffixes is not None:
        step["suffixes"] = list(suffixes)
    return step


def resolved(
    step: dict[str, Any], left_key: str | None, right_key: str | None, right: pd.DataFrame
) -> tuple[str, str] | None:
    """The join columns the documentation promises (None: refused before any data is read)."""
    on, left_on, right_on = step.get("on"), step.get("left_on"), step.get("right_on")
    left_name = on or left_on or left_key
    right_name = on or right_on or right_key or left_name
    if left_name is None or right_name is None:
        return None
    return left_name, right_name


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(side(LEFT_KEYS, LEFT_COLUMNS), side(RIGHT_KEYS, RIGHT_COLUMNS), st.data())
def test_joins_match_pandas_merge(
    left_side: tuple[pd.DataFrame, str, str | None],
    right_side: tuple[pd.DataFrame, str, str | None],
    data: st.DataObject,
) -> None:
    """The in-memory and the columnar join (``compare`` asserts they agree, errors included) give
    what ``pandas.merge(left_on=, right_on=, suffixes=)`` gives, or both refuse what it refuses."""
    left, left_join, left_key = left_side
    right, right_join, right_key = right_side
    step = data.draw(join_requests(left_join, right_join))
    memory_limit = data.draw(st.sampled_from(["256MB", HASH_JOIN_MEMORY]))
    outcome = compare({"L": (left, left_key), "R": (right, right_key)}, [step], memory_limit=memory_limit)
    names = resolved(step, left_key, right_key, right)
    expected: pd.DataFrame | None = None
    if names is not None and not ("on" in step and ("left_on" in step or "right_on" in step)):
        try:
            expected = oracle_join(left, right, *names, step["how"], step.get("suffixes"))
        except JoinRefused:
            expected = None
    if expected is None:
        event(f"refused: {outcome.error[1].removeprefix('step 0 (join): ')[:40] if outcome.error else None}")
        assert outcome.error is not None, "pandas refuses the join; Centroid must too"
        assert outcome.error[0] is InvalidInput
        return
    assert outcome.error is None, outcome.error
    assert outcome.frame is not None and outcome.fitted is not None
    pd.testing.assert_frame_equal(outcome.frame, expected, check_exact=True)
    (fitted,) = outcome.fitted
    assert isinstance(fitted, FittedJoin)
    event(f"joined, {'columns suffixed' if fitted.suffixed else 'no name shared'}")
    assert (fitted.left_on, fitted.right_on) == names
    suffixes = step.get("suffixes")
    assert fitted.suffixes == (None if suffixes is None else tuple(suffixes))
    # The result's key: this side's key column (a suffix may rename it), else the join column.
    if left_key is None:
        assert outcome.key_column == names[0]
    else:
        assert outcome.key_column == fitted.left_name(left_key) and outcome.key_column in outcome.frame.columns
    # The fitted step stores what it resolved and reads back unchanged.
    stored = fitted.model_dump(mode="json")
    assert parse_step(json.loads(json.dumps(stored))) == fitted
    if names[0] == names[1] and suffixes is None:
        assert stored == {"op": "join", "dataset_id": "R", "how": step["how"], "on": names[0]}


# --- semantics worth a case of their own ----------------------------------------------------------


def text(values: list[Any]) -> pd.Series:
    return pd.Series(values, dtype="string")


CRIMES = pd.DataFrame(
    {"State": text(["Alabama", "Alaska", "Arizona"]), "Murder": [13.2, 10.0, 8.1], "Assault": [236, 263, 294]}
)
FACTS = pd.DataFrame(
    {"state_name": text(["Arizona", "Alabama", "Ohio"]), "Murder": [7.5, 12.9, 5.3], "Income": [56, 48, 58]}
)
CRIMES_COLUMNS = ["State", "Murder", "Assault"]
FACTS_COLUMNS = ["state_name", "Murder", "Income"]


def test_key_to_key_with_suffixes_the_issue_example() -> None:
    outcome = compare(
        {"L": (CRIMES, "State"), "R": (FACTS, "state_name")},
        [{"op": "join", "dataset_id": "R", "suffixes": ["_crimes", "_facts"]}],
    )
    assert outcome.frame is not None
    assert list(outcome.frame.columns) == ["State", "Murder_crimes", "Assault", "Murder_facts", "Income"]
    assert outcome.frame.to_dict("list") == {
        "State": ["Alabama", "Arizona"],
        "Murder_crimes": [13.2, 8.1],
        "Assault": [236, 294],
        "Murder_facts": [12.9, 7.5],
        "Income": [48, 56],
    }
    assert outcome.key_column == "State"
    assert outcome.fitted is not None
    assert outcome.fitted[0].model_dump(mode="json") == {
        "op": "join",
        "dataset_id": "R",
        "how": "inner",
        "left_on": "State",
        "right_on": "state_name",
        "suffixes": ["_crimes", "_facts"],
        "suffixed": ["Murder"],
    }


def test_without_suffixes_a_shared_name_is_refused_and_the_message_says_what_to_do() -> None:
    outcome = compare({"L": (CRIMES, "State"), "R": (FACTS, "state_name")}, [{"op": "join", "dataset_id": "R"}])
    assert outcome.error is not None
    _, message, details = outcome.error
    assert message == (
        "step 0 (join): both datasets have column(s) 'Murder'; pass `suffixes` (e.g. "
        '["_x", "_y"]) to keep both, or rename or drop them first'
    )
    assert details == {"columns": ["Murder"]}


def test_one_side_named_the_other_side_joins_on_its_key() -> None:
    frames = {"L": (CRIMES, "State"), "R": (FACTS.drop(columns="Murder"), "state_name")}
    for names in ({"left_on": "State"}, {"right_on": "state_name"}, {"left_on": "State", "right_on": "state_name"}):
        outcome = compare(frames, [{"op": "join", "dataset_id": "R", "how": "left", **names}])
        assert outcome.frame is not None and list(outcome.frame.columns) == ["State", "Murder", "Assault", "Income"]
        assert outcome.frame["Income"].tolist()[0] == 48.0 and pd.isna(outcome.frame["Income"].tolist()[1])


def test_a_keyless_other_side_joins_on_the_column_named_like_this_sides_key() -> None:
    """What a join without `on` always did when the other side had no key column."""
    other = pd.DataFrame({"State": text(["Alaska", "Alabama"]), "Income": [1, 2]})
    outcome = compare({"L": (CRIMES, "State"), "R": (other, None)}, [{"op": "join", "dataset_id": "R"}])
    assert outcome.frame is not None and outcome.frame["Income"].tolist() == [2, 1]
    assert outcome.fitted is not None and outcome.fitted[0].model_dump(mode="json")["on"] == "State"


def test_a_column_named_like_the_other_join_column_is_no_clash() -> None:
    """The other side's join column is not carried over, so this side may have one of its name."""
    crimes = CRIMES.assign(state_name=text(["x", "y", "z"]))
    outcome = compare(
        {"L": (crimes, "State"), "R": (FACTS.drop(columns="Murder"), "state_name")}, [{"op": "join", "dataset_id": "R"}]
    )
    assert outcome.frame is not None
    assert list(outcome.frame.columns) == ["State", "Murder", "Assault", "state_name", "Income"]
    assert outcome.frame["state_name"].tolist() == ["x", "z"]


def test_the_other_side_naming_a_column_like_this_join_column_takes_only_its_suffix() -> None:
    """This side's join column keeps its name; the other side's column of that name is suffixed."""
    facts = FACTS.assign(State=text(["AZ", "AL", "OH"]))
    frames = {"L": (CRIMES, "State"), "R": (facts, "state_name")}
    refused = compare(frames, [{"op": "join", "dataset_id": "R"}])
    assert refused.error is not None and "column(s) 'Murder', 'State'; pass `suffixes`" in refused.error[1]
    outcome = compare(frames, [{"op": "join", "dataset_id": "R", "suffixes": ["_l", "_r"]}])
    assert outcome.frame is not None and outcome.key_column == "State"
    assert list(outcome.frame.columns) == ["State", "Murder_l", "Assault", "Murder_r", "Income", "State_r"]
    assert outcome.frame["State_r"].tolist() == ["AL", "AZ"]
    assert outcome.fitted is not None and outcome.fitted[0].model_dump(mode="json")["suffixed"] == ["Murder", "State"]
    empty_right = compare(frames, [{"op": "join", "dataset_id": "R", "suffixes": ["_l", ""]}])
    assert empty_right.error is not None and "leave column(s) 'State' twice" in empty_right.error[1]


def test_a_suffix_may_rename_this_sides_key_column() -> None:
    """Joined on another column, this side's key column may be a shared name: it is renamed, and
    stays the key."""
    crimes = CRIMES.assign(code=text(["AL", "AK", "AZ"]))
    facts = pd.DataFrame({"code": text(["AZ", "AL"]), "State": text(["arizona", "alabama"])})
    outcome = compare(
        {"L": (crimes, "State"), "R": (facts, "code")},
        [
            {"op": "join", "dataset_id": "R", "on": "code", "suffixes": ["_left", "_right"]},
            {"op": "select", "columns": ["State_right", "Murder"]},
        ],
    )
    assert outcome.frame is not None and outcome.key_column == "State_left"
    assert outcome.frame.to_dict("list") == {
        "State_left": ["Alabama", "Arizona"],
        "State_right": ["alabama", "arizona"],
        "Murder": [13.2, 8.1],
    }


def test_suffixed_names_are_what_later_steps_use() -> None:
    outcome = compare(
        {"L": (CRIMES, "State"), "R": (FACTS, "state_name")},
        [
            {"op": "join", "dataset_id": "R", "how": "left", "suffixes": ["", "_facts"]},
            {"op": "scale", "columns": ["Murder", "Murder_facts"], "method": "standard"},
            {"op": "fillna", "columns": ["Murder_facts"]},
            {"op": "rename", "mapping": {"Murder_facts": "MurderElsewhere"}},
            {"op": "select", "columns": ["MurderElsewhere", "Murder"]},
        ],
    )
    assert outcome.frame is not None
    assert list(outcome.frame.columns) == ["State", "MurderElsewhere", "Murder"]


def test_request_errors() -> None:
    frames = {"L": (CRIMES, "State"), "R": (FACTS, "state_name")}
    cases: list[tuple[dict[str, Any], str, Any]] = [
        ({"on": "State", "left_on": "State"}, "join takes `on`", {"fields": ["on", "left_on"]}),
        ({"on": "State", "right_on": "state_name"}, "not both", {"fields": ["on", "right_on"]}),
        ({"on": "State"}, "join column 'State' is missing from dataset R", {"on": "State"}),
        ({"right_on": "Income", "suffixes": ["", "_f"]}, "'Income' has duplicate", None),
        ({"left_on": "Nope"}, "join column 'Nope' is missing from this dataset", {"on": "Nope"}),
        ({"suffixes": ["_a", "_a"]}, "the suffixes '_a' and '_a' leave column(s) 'Murder_a' twice", None),
    ]
    facts = FACTS.assign(Income=[1, 1, 2])
    for names, fragment, details in cases:
        outcome = compare({**frames, "R": (facts, "state_name")}, [{"op": "join", "dataset_id": "R", **names}])
        assert outcome.error is not None and fragment in outcome.error[1], (names, outcome.error)
        if details is not None:
            assert outcome.error[2] == details


def test_suffixes_are_checked_by_the_schema() -> None:
    for suffixes in (["_a"], ["_a", "_b", "_c"], ["_a\n", "_b"], ["_\ud800", ""], ["x" * 65, ""], "_a"):
        with pytest.raises(ValueError, match="suffixes"):
            STEPS.validate_python([{"op": "join", "dataset_id": "R", "suffixes": suffixes}])


# --- the stored forms -----------------------------------------------------------------------------

OLD_FORM = {"op": "join", "dataset_id": "R", "how": "left", "on": "k"}
NEW_FORM = {
    "op": "join",
    "dataset_id": "R",
    "how": "inner",
    "left_on": "State",
    "right_on": "state_name",
    "suffixes": ["", "_facts"],
    "suffixed": ["Murder"],
}


def test_the_on_form_reads_as_one_name_on_both_sides_and_dumps_back_unchanged() -> None:
    parsed = parse_step(OLD_FORM)
    assert isinstance(parsed, FittedJoin)
    assert (parsed.left_on, parsed.right_on, parsed.suffixes, parsed.suffixed) == ("k", "k", None, ())
    assert json.dumps(parsed.model_dump(mode="json")) == json.dumps(OLD_FORM)
    assert FITTED.validate_json(json.dumps(OLD_FORM)) == parsed


def test_the_newer_form_round_trips() -> None:
    parsed = parse_step(NEW_FORM)
    assert json.dumps(parsed.model_dump(mode="json")) == json.dumps(NEW_FORM)
    same_names = {**NEW_FORM, "right_on": "State"}  # one name, but suffixes: the newer form still
    assert parse_step(same_names).model_dump(mode="json") == same_names


@pytest.mark.parametrize(
    ("record", "where"),
    [
        ({**OLD_FORM, "left_on": "k"}, "not both"),
        ({**NEW_FORM, "suffixes": None}, "suffixed columns need suffixes"),
        ({**NEW_FORM, "suffixes": ["_a"]}, "suffixes"),
        ({k: v for k, v in NEW_FORM.items() if k != "right_on"}, "right_on"),
        ({**NEW_FORM, "extra": 1}, "extra"),
    ],
)
def test_a_malformed_join_is_refused(record: dict[str, Any], where: str) -> None:
    with pytest.raises(InvalidInput, match="malformed") as caught:
        parse_step(record)
    assert where in caught.value.message


# --- replays on raw rows --------------------------------------------------------------------------

UPLOADS = {
    "crimes": {"source": "upload", "filename": "crimes.csv", "columns": CRIMES_COLUMNS},
    "facts": {"source": "json", "columns": FACTS_COLUMNS},
}


def suffixed_recipe() -> tuple[dict[str, Any], pd.DataFrame]:
    tables = {"crimes": Table(CRIMES, "State"), "facts": Table(FACTS, "state_name")}
    steps = STEPS.validate_python(
        [
            {"op": "join", "dataset_id": "facts", "suffixes": ["_crimes", "_facts"]},
            {"op": "scale", "columns": ["Murder_crimes"], "feature_range": [0, 1]},
            {"op": "scale", "columns": ["Murder_facts", "Income"], "method": "standard"},
            {"op": "select", "columns": ["Murder_facts", "Murder_crimes", "Income", "Assault"]},
        ]
    )
    table, fitted = apply_steps(tables["crimes"], steps, tables.__getitem__)
    return derived_recipe("crimes", fitted, UPLOADS), table.frame


def test_a_suffixed_join_replays_on_raw_rows_like_the_dataset() -> None:
    """Raw rows name the uploads' columns: both sides' ``Murder`` read the rows' one ``Murder``,
    each with its own side's steps, under its suffixed name."""
    recipe, frame = suffixed_recipe()
    raw = pd.DataFrame({"Murder": [13.2, 7.5], "Assault": [236, 10], "Income": [48, 56]})
    replayed = replay(recipe, raw)
    assert list(replayed.columns) == ["Murder_facts", "Murder_crimes", "Income", "Assault"]
    # The first raw row holds Alabama's crimes Murder, the second Arizona's facts Murder and Income.
    assert replayed["Murder_crimes"].iloc[0] == frame["Murder_crimes"].iloc[0]
    assert replayed["Murder_facts"].iloc[1] == frame["Murder_facts"].iloc[1]
    assert replayed["Income"].iloc[1] == frame["Income"].iloc[1]
    features = ["Murder_crimes", "Murder_facts", "Income", "Assault"]
    compiled = compile_recipe(recipe, features, "State")
    assert compiled.programs is not None
    rows: list[dict[str, Any]] = [
        {"Murder": 13.2, "Assault": 236, "Income": 48},
        {"Murder": 7.5, "Assault": 10, "Income": 56},
    ]
    expected = replayed[features].to_numpy(dtype=np.float64)
    assert compiled.matrix(rows).tobytes() == expected.tobytes()
    assert compiled.accepted == frozenset({"State", "Murder", "Assault", "state_name", "Income"})
    lineage = column_lineage(recipe)
    assert {name: lineage[name].raw_name for name in features} == {
        "Murder_crimes": "Murder",
        "Murder_facts": "Murder",
        "Income": "Income",
        "Assault": "Assault",
    }
    assert [s.method for s in lineage["Murder_crimes"].scalings] == ["minmax"]
    assert [s.method for s in lineage["Murder_facts"].scalings] == ["standard"]


def test_the_replay_renames_what_the_join_renamed_whatever_the_rows_carry() -> None:
    """The columns to suffix are stored (``suffixed``), not guessed from the rows, and the other
    side's join column stands for this side's when the rows lack it (as with ``on`` always)."""
    recipe, _ = suffixed_recipe()
    recipe["steps"] = recipe["steps"][:1]  # the join alone
    replayed = replay(recipe, pd.DataFrame({"Murder": [1.0], "state_name": ["Ohio"]}))
    assert replayed.to_dict("list") == {"Murder_crimes": [1.0], "State": ["Ohio"], "Murder_facts": [1.0]}


def test_a_recipe_stored_by_an_earlier_version_replays_as_before() -> None:
    """A join stored with ``on`` (every recipe before ``left_on``/``right_on``): replay, compile and
    lineage give what they always gave (values computed by hand from the fitted parameters)."""
    stored = {
        "source": "derived",
        "parent_id": "L",
        "steps": [
            {"op": "join", "dataset_id": "R", "how": "left", "on": "k"},
            {"op": "fillna", "values": {"s": 2.0}},
            {
                "op": "scale",
                "columns": ["s"],
                "method": "minmax",
                "feature_range": [0.0, 1.0],
                "params": {"s": {"min": 1.0, "max": 3.0}},
            },
            {"op": "select", "columns": ["s", "a"]},
        ],
        "inputs": {
            "L": {"source": "upload", "filename": "l.csv", "columns": ["k", "a"]},
            "R": {"source": "json", "columns": ["k", "s"]},
        },
    }
    recipe = json.loads(json.dumps(stored))
    replayed = replay(recipe, pd.DataFrame({"k": ["x", "y"], "a": [1.0, 2.0], "s": [np.nan, 3.0]}))
    assert replayed.to_dict("list") == {"s": [0.5, 1.0], "a": [1.0, 2.0]}
    without_key = replay(recipe, pd.DataFrame({"a": [1.0], "s": [1.0]}))
    assert without_key.to_dict("list") == {"s": [0.0], "a": [1.0]}
    compiled = compile_recipe(recipe, ["s", "a"], "k")
    assert compiled.programs is not None
    assert compiled.matrix([{"k": "x", "a": 1.0, "s": None}, {"a": 2.0, "s": 3.0}]).tolist() == [[0.5, 1.0], [1.0, 2.0]]
    assert column_lineage(recipe)["s"].raw_name == "s"
    # Deriving from it again stores its node as it was.
    again = derived_recipe("D", [], {"D": recipe})
    assert again["inputs"]["D"]["steps"][0] == {"op": "join", "dataset_id": "R", "how": "left", "on": "k"}
