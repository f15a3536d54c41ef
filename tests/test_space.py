"""Search space -> TrialParams with Optuna's FixedTrial (no study needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import optuna
import pytest
from optuna.trial import FixedTrial

from pet_sweep.config import load_experiment
from pet_sweep.errors import ConfigError
from pet_sweep.params import TrialParams, lr_text, params_from_dict
from pet_sweep.space import Anchored, always_inert, anchor_params, check_anchors, parse_space, suggest


def test_fixed_trial_maps_every_parameter() -> None:
    space = parse_space({
        "arch": {"choices": ["resnet18", "resnet34"]},
        "base_lr": {"low": 1e-4, "high": 1e-2, "log": True},
        "lr_lo": {"low": 1e-7, "high": 1e-5, "log": True},
        "lr_hi": {"low": 1e-5, "high": 1e-3, "log": True},
        "freeze_epochs": {"low": 0, "high": 3},
        "epochs": {"low": 2, "high": 12, "step": 2},
    })
    trial = optuna.trial.FixedTrial({"arch": "resnet34", "base_lr": 3e-3, "lr_lo": 1e-6, "lr_hi": 1e-4,
                                     "freeze_epochs": 2, "epochs": 6})
    params = suggest(space, trial)
    assert params.arch == "resnet34" and params.base_lr == 3e-3
    assert (params.lr_lo, params.lr_hi) == (1e-6, 1e-4)
    assert params.freeze_epochs == 2 and params.epochs == 6 and params.total_epochs == 8


def test_lr_mult_gives_lr_lo_and_fixed_values_are_not_suggested() -> None:
    space = parse_space({"arch": "resnet18", "base_lr": 2e-3, "lr_hi": {"low": 1e-3, "high": 1e-2},
                         "lr_mult": 100, "freeze_epochs": 1, "epochs": 3})
    params = suggest(space, optuna.trial.FixedTrial({"lr_hi": 5e-3}))
    assert params.lr_lo == pytest.approx(5e-5) and params.lr_hi == 5e-3
    study = optuna.create_study()
    trial = study.ask()
    suggest(space, trial)
    assert set(trial.params) == {"lr_hi"}  # Optuna only sees what varies


def test_sampled_trials_always_keep_lr_lo_below_lr_hi() -> None:
    space = parse_space({"arch": "resnet18", "base_lr": 1e-3, "lr_hi": {"low": 1e-4, "high": 1e-2, "log": True},
                         "lr_mult": {"low": 1, "high": 100, "log": True}, "freeze_epochs": 0, "epochs": 1})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(50):
        params = suggest(space, study.ask())
        assert 0 < params.lr_lo <= params.lr_hi


CONDITIONAL = {"arch": "resnet18", "base_lr": {"low": 1e-3, "high": 1e-2, "log": True}, "lr_hi": 1e-2,
               "lr_mult": 10, "freeze_epochs": {"low": 0, "high": 1}, "epochs": 1}


def test_base_lr_is_sampled_only_with_a_frozen_phase() -> None:
    space = parse_space(CONDITIONAL)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(20):
        trial = study.ask()
        params = suggest(space, trial)
        frozen = params.freeze_epochs > 0
        seen.add(frozen)
        # define-by-run: without a frozen phase base_lr is neither an Optuna param nor a recipe one
        assert ("base_lr" in trial.params) == frozen == ("base_lr" in params.as_dict())
        assert (params.base_lr is not None) == frozen
        study.tell(trial, 0.5)
    assert seen == {True, False}
    # TPE takes the conditional parameter from the trials that have it
    tpe = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=2))
    for _ in range(6):
        trial = tpe.ask()
        suggest(space, trial)
        tpe.tell(trial, 0.5)
    assert all(("base_lr" in t.params) == (t.params["freeze_epochs"] > 0) for t in tpe.trials)


def test_an_anchored_base_lr_is_not_sampled_without_a_frozen_phase() -> None:
    space = parse_space({**CONDITIONAL, "base_lr": {"anchor": "frozen.valley", "factor": [0.3, 3]}})
    anchors = {"resnet18": {"frozen": {"valley": 2e-3}}}
    trial = optuna.trial.FixedTrial({"freeze_epochs": 0, "base_lr_factor": 1.0})
    params = suggest(space, trial, anchors)
    assert params.base_lr is None and trial.params == {"freeze_epochs": 0}  # no base_lr_factor asked for
    assert anchor_params(space, params, anchors) == {}


def test_params_from_dict_needs_base_lr_only_with_a_frozen_phase() -> None:
    row = {"arch": "resnet18", "lr_lo": 1e-4, "lr_hi": 1e-3, "freeze_epochs": 0, "epochs": 2}
    assert params_from_dict(row).base_lr is None and "base_lr" not in params_from_dict(row).as_dict()
    # an old export that still lists it: the inert value is dropped, not replayed or logged
    assert "base_lr" not in params_from_dict({**row, "base_lr": 1e-2}).as_dict()
    with pytest.raises(ConfigError, match="missing recipe parameter 'base_lr'.*freeze_epochs > 0") as err:
        params_from_dict({**row, "freeze_epochs": 1})
    assert err.value.key == "params.base_lr"
    with pytest.raises(ValueError, match="a frozen phase needs base_lr"):
        TrialParams("resnet18", None, 1e-4, 1e-3, freeze_epochs=1, epochs=1)


def test_a_space_without_a_frozen_phase_may_leave_base_lr_out() -> None:
    fixed = {k: v for k, v in CONDITIONAL.items() if k != "base_lr"}
    space = parse_space({**fixed, "freeze_epochs": 0})
    assert "base_lr" not in space.params and always_inert(space) == []
    with pytest.raises(ConfigError, match=r"missing parameter\(s\) base_lr .*freeze_epochs can be > 0"):
        parse_space(fixed)
    # given although freeze_epochs is 0 in every trial: always inert, and the report says so
    assert always_inert(parse_space({**CONDITIONAL, "freeze_epochs": 0})) == ["base_lr"]
    assert always_inert(parse_space(CONDITIONAL)) == []


def test_trial_lines_show_an_unused_base_lr_as_absent() -> None:
    values = {"arch": "resnet18", "base_lr": 3e-2, "lr_lo": 1e-4, "lr_hi": 1e-3, "epochs": 2}
    assert lr_text({**values, "freeze_epochs": 1}) == "base_lr=3.00e-02 lr=slice(1.00e-04, 1.00e-03)"
    assert lr_text({**values, "freeze_epochs": 0}) == "lr=slice(1.00e-04, 1.00e-03)"  # recorded, but inert


ANCHORED_SPACE: dict[str, Any] = {
    "arch": "resnet18",
    "base_lr": {"anchor": "frozen.valley", "factor": [0.3, 3], "log": True},
    "lr_hi": {"anchor": "unfrozen.valley", "factor": [0.1, 1]},
    "lr_mult": 10,
    "freeze_epochs": 1,
    "epochs": 1,
}
ANCHORS = {"resnet18": {"frozen": {"minimum": 1e-2, "steep": 5e-3, "valley": 2e-3, "slide": 3e-3},
                        "unfrozen": {"minimum": 1e-4, "steep": 1e-6, "valley": 5e-5, "slide": 6e-5}}}


def space_with(**params: Any) -> dict[str, Any]:
    return {**ANCHORED_SPACE, **params}


# -- learning rates anchored on the LR finder: pure ---------------------------------------------------------------------------


def test_anchored_entry_parses() -> None:
    space = parse_space(ANCHORED_SPACE)
    assert space.params["base_lr"] == Anchored(anchor="frozen.valley", factor=(0.3, 3.0), log=True)
    assert space.anchor_phases == ["frozen", "unfrozen"]
    # one number fixes the multiple
    fixed = parse_space(space_with(base_lr={"anchor": "frozen.minimum", "factor": 1}))
    assert fixed.params["base_lr"].factor == (1.0, 1.0)


@pytest.mark.parametrize("entry, key, words", [
    ({"anchor": "frozen.bottom", "factor": [0.3, 3]}, "base_lr.anchor", "unknown anchor 'frozen.bottom'"),
    ({"anchor": "thawed.valley", "factor": [0.3, 3]}, "base_lr.anchor", "valid anchors: frozen.minimum"),
    ({"anchor": "frozen.valley", "factor": [3, 0.3]}, "base_lr.factor", "`0 < low <= high` must hold"),
    ({"anchor": "frozen.valley", "factor": [0, 3]}, "base_lr.factor[0]", "must be > 0"),
    ({"anchor": "frozen.valley", "factor": [-1, 3]}, "base_lr.factor[0]", "must be > 0"),
    ({"anchor": "frozen.valley", "factor": [1, 2, 3]}, "base_lr.factor", "[low, high]"),
    ({"anchor": "frozen.valley"}, "base_lr.factor", "needs `factor"),
    ({"anchor": "frozen.valley", "factor": [1, 2], "low": 1}, "base_lr.low", "unknown key 'low'"),
])
def test_bad_anchor_entries_name_the_key(entry: dict[str, Any], key: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_space(space_with(base_lr=entry))
    assert err.value.key == key
    assert words in str(err.value)


def test_only_learning_rates_can_be_anchored() -> None:
    with pytest.raises(ConfigError, match="only the learning rates"):
        parse_space(space_with(lr_mult={"anchor": "unfrozen.valley", "factor": [1, 10]}))


def test_same_anchor_overlapping_factors_cannot_keep_lr_lo_below_lr_hi() -> None:
    entry = {"anchor": "unfrozen.valley", "factor": [0.05, 0.2]}
    raw = {k: v for k, v in space_with(lr_lo=entry).items() if k != "lr_mult"}
    with pytest.raises(ConfigError, match="lr_lo <= lr_hi") as err:
        parse_space(raw)
    assert err.value.key == "lr_lo"
    raw["lr_lo"] = {"anchor": "unfrozen.valley", "factor": [0.01, 0.1]}
    assert parse_space(raw).params["lr_lo"].factor == (0.01, 0.1)


def test_lr_lo_below_lr_hi_is_checked_once_the_anchors_are_known() -> None:
    raw = {k: v for k, v in space_with(lr_lo={"low": 1e-6, "high": 1e-4}).items() if k != "lr_mult"}
    space = parse_space(raw)  # cannot be decided before the finder has run
    check_anchors(space, {"resnet18": {**ANCHORS["resnet18"], "unfrozen": {"valley": 1e-3}}})
    with pytest.raises(ConfigError, match="with resnet18") as err:
        check_anchors(space, ANCHORS)  # lr_hi as low as 0.1 x 5e-5 = 5e-6 < 1e-4
    assert err.value.key == "lr_lo"


def test_anchored_ranges_resolve_to_anchor_times_factor() -> None:
    space = parse_space(ANCHORED_SPACE)
    assert space.bounds("base_lr", "resnet18", ANCHORS) == pytest.approx((0.3 * 2e-3, 3 * 2e-3))
    assert space.bounds("lr_hi", "resnet18", ANCHORS) == pytest.approx((0.1 * 5e-5, 1 * 5e-5))
    low = suggest(space, FixedTrial({"base_lr_factor": 0.3, "lr_hi_factor": 0.1}), ANCHORS)
    high = suggest(space, FixedTrial({"base_lr_factor": 3, "lr_hi_factor": 1}), ANCHORS)
    assert (low.base_lr, high.base_lr) == pytest.approx((6e-4, 6e-3))
    assert (low.lr_hi, low.lr_lo) == pytest.approx((5e-6, 5e-7))
    # what Optuna samples is the factor; every LR lands inside anchor x [low, high]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(30):
        trial = study.ask()
        params = suggest(space, trial, ANCHORS)
        assert set(trial.params) == {"base_lr_factor", "lr_hi_factor"}
        assert 6e-4 * (1 - 1e-9) <= params.base_lr <= 6e-3 * (1 + 1e-9)
        assert params.base_lr == pytest.approx(2e-3 * trial.params["base_lr_factor"])
        study.tell(trial, 0.5)
    shown = anchor_params(space, high, ANCHORS)
    assert shown["base_lr_anchor"] == "frozen.valley"
    assert shown["base_lr_anchor_lr"] == 2e-3
    assert shown["base_lr_factor"] == pytest.approx(3)


def test_suggest_without_anchors_names_the_missing_finder_result() -> None:
    with pytest.raises(ConfigError, match="no LR-finder result frozen.valley for architecture 'resnet18'"):
        suggest(parse_space(ANCHORED_SPACE), FixedTrial({"base_lr_factor": 1, "lr_hi_factor": 1}), {})


def test_experiment_file_error_names_file_and_key(write_experiments: Callable[..., Path]) -> None:
    path = write_experiments(space=space_with(lr_hi={"anchor": "unfrozen.nadir", "factor": [0.1, 1]}))
    with pytest.raises(ConfigError) as err:
        load_experiment(path)
    assert "tiny.yaml" in str(err.value) and "key 'lr_hi.anchor'" in str(err.value)
