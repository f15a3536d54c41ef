"""Search space -> TrialParams with Optuna's FixedTrial (no study needed)."""

from __future__ import annotations

import optuna
import pytest

from pet_sweep.space import parse_space, suggest


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
                                     "freeze_epochs": 0, "epochs": 6})
    params = suggest(space, trial)
    assert params.arch == "resnet34" and params.base_lr == 3e-3
    assert (params.lr_lo, params.lr_hi) == (1e-6, 1e-4)
    assert params.freeze_epochs == 0 and params.epochs == 6 and params.total_epochs == 6


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
