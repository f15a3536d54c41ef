"""SchedulePruner compares trials at the same phase and fraction of their one-cycle schedules."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import IntDistribution
from optuna.trial import TrialState

from pet_sweep.sweep.pruners import SchedulePruner, curve_at, position


def _finished(study: optuna.Study, freeze: int, epochs: int, errors: list[float]) -> None:
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.COMPLETE, value=errors[-1],
        params={"freeze_epochs": freeze, "epochs": epochs},
        distributions={"freeze_epochs": IntDistribution(0, 3), "epochs": IntDistribution(1, 12)},
        intermediate_values=dict(enumerate(errors))))


def test_positions_map_between_schedules() -> None:
    assert position(0, (1, 4)) == ("frozen", 1.0)
    assert position(2, (1, 4)) == ("unfrozen", 0.5)
    curve = [0.9, 0.8, 0.6, 0.4, 0.3, 0.2, 0.1, 0.05]
    assert curve_at("unfrozen", 0.5, (0, 8), curve) == 0.4            # 4th of 8 unfrozen epochs
    assert curve_at("unfrozen", 1.0, (2, 3), curve[:5]) == 0.3        # the last epoch
    assert curve_at("unfrozen", 0.375, (0, 4), curve[:4]) == pytest.approx(0.85)  # between epochs 1 and 2
    assert curve_at("frozen", 1.0, (0, 3), curve) is None             # no frozen phase to compare with
    assert curve_at("unfrozen", 0.25, (0, 2), curve) is None          # no epoch at or before 1/4 of 2
    assert curve_at("unfrozen", 1.0, (0, 4), curve[:2]) is None       # its curve stops before


def _running(study: optuna.Study, freeze: int, epochs: int, errors: list[float]) -> bool:
    trial = study.ask()
    trial.set_user_attr("params", {"freeze_epochs": freeze, "epochs": epochs})
    for step, err in enumerate(errors):
        trial.report(err, step)
    return study.pruner.prune(study, study.trials[trial.number])


def test_long_schedule_is_compared_with_the_same_point_of_short_ones() -> None:
    study = optuna.create_study(pruner=SchedulePruner(n_startup_trials=2, n_warmup_steps=1))
    for final in (0.05, 0.06, 0.07):
        _finished(study, 0, 2, [0.30, final])  # short schedules: annealed by epoch 2
    # epoch 4 of an 8-epoch schedule is mid-cycle; 0.20 is worse than the short ones' ends
    # (which MedianPruner would compare it with) but better than their middles (0.30)
    assert _running(study, 0, 8, [0.40, 0.40, 0.40, 0.20]) is False
    assert _running(study, 0, 8, [0.40, 0.40, 0.40, 0.35]) is True


def test_no_pruning_before_startup_or_warmup_or_at_the_end() -> None:
    study = optuna.create_study(pruner=SchedulePruner(n_startup_trials=3, n_warmup_steps=1))
    _finished(study, 0, 2, [0.3, 0.1])
    assert _running(study, 0, 4, [0.9, 0.9]) is False  # one finished trial < n_startup_trials
    for _ in range(3):
        _finished(study, 0, 4, [0.3, 0.2, 0.1, 0.05])
    assert _running(study, 0, 4, [0.9]) is False           # step 0 < n_warmup_steps
    assert _running(study, 0, 4, [0.9, 0.9, 0.9, 0.9]) is False  # last epoch: nothing to save
    assert _running(study, 0, 4, [0.9, 0.9, 0.9]) is True


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="n_min_trials=0"):
        SchedulePruner(n_min_trials=0)
    with pytest.raises(ValueError, match="min_fraction=1"):
        SchedulePruner(min_fraction=1)


def test_percentile_keeps_only_the_best_quarter() -> None:
    median = optuna.create_study(pruner=SchedulePruner(n_startup_trials=4, n_warmup_steps=1))
    quarter = optuna.create_study(pruner=SchedulePruner(n_startup_trials=4, n_warmup_steps=1, percentile=25))
    for study in (median, quarter):
        for middle in (0.10, 0.20, 0.30, 0.40):
            _finished(study, 0, 4, [0.5, middle, 0.05, 0.04])
    # 0.18 at epoch 2: better than the median of the others (0.25), worse than their best quarter (0.175)
    assert _running(median, 0, 4, [0.5, 0.18]) is False
    assert _running(quarter, 0, 4, [0.5, 0.18]) is True
    assert _running(quarter, 0, 4, [0.5, 0.17]) is False
    with pytest.raises(ValueError, match="between 0 and 100 exclusive, but got percentile=100"):
        SchedulePruner(percentile=100)


def test_experiment_pruner_settings_reach_the_pruners(write_experiments) -> None:
    from pet_sweep.config import load_experiment
    from pet_sweep.errors import ConfigError
    from pet_sweep.sweep.search import make_pruner

    def pruner(**cfg: object) -> optuna.pruners.BasePruner:
        return make_pruner(load_experiment(write_experiments(pruner=cfg)))

    schedule = pruner(name="schedule", percentile=25, n_startup_trials=2, n_warmup_steps=1, min_fraction=0.5)
    assert isinstance(schedule, SchedulePruner) and schedule.percentile == 25 and schedule.n_startup_trials == 2
    assert schedule.min_fraction == 0.5
    with pytest.raises(ConfigError, match="min_fraction is a setting of the schedule pruner"):
        pruner(name="percentile", min_fraction=0.5)
    percentile = pruner(name="percentile", percentile=25)
    assert isinstance(percentile, optuna.pruners.PercentilePruner)
    assert not isinstance(percentile, optuna.pruners.MedianPruner)
    assert isinstance(pruner(name="median"), optuna.pruners.MedianPruner)
    with pytest.raises(ConfigError, match="use `name: percentile`") as info:
        pruner(name="median", percentile=25)
    assert info.value.key == "pruner"


def test_min_fraction_waits_for_the_annealing_half_of_the_schedule() -> None:
    study = optuna.create_study(pruner=SchedulePruner(n_startup_trials=2, n_warmup_steps=0, min_fraction=0.5))
    for _ in range(3):
        _finished(study, 0, 4, [0.8, 0.7, 0.1, 0.05])
    assert _running(study, 0, 4, [0.9]) is False             # 1/4 of the schedule: too early to tell
    assert _running(study, 0, 4, [0.9, 0.9]) is True         # half way: far behind the others
    assert _running(study, 0, 8, [0.9, 0.9, 0.9]) is False   # 3/8 of a longer schedule: still too early


def _peers(errors: list[float], copies: int = 2, direction: str = "minimize") -> optuna.Study:
    """A study whose schedule pruner judges from epoch 1 on, with `copies` completed 4-epoch peers."""
    study = optuna.create_study(direction=direction, pruner=SchedulePruner(n_startup_trials=2, n_warmup_steps=1))
    for _ in range(copies):
        _finished(study, 0, 4, errors)
    return study


def test_the_trials_best_so_far_is_compared_not_its_last_epoch() -> None:
    study = _peers([0.5, 0.3, 0.2, 0.1])
    # a noisy epoch (0.35 after 0.15) does not undo the trial's best so far, as in Optuna's MedianPruner
    assert _running(study, 0, 4, [0.5, 0.15, 0.35]) is False
    assert _running(study, 0, 4, [0.5, 0.25, 0.35]) is True


def _pruned(study: optuna.Study, freeze: int, epochs: int, errors: list[float]) -> None:
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.PRUNED, params={"freeze_epochs": freeze, "epochs": epochs},
        distributions={"freeze_epochs": IntDistribution(0, 3), "epochs": IntDistribution(1, 12)},
        intermediate_values=dict(enumerate(errors))))


def test_pruned_trials_are_not_peers() -> None:
    study = _peers([0.5, 0.2, 0.1, 0.05])
    for _ in range(3):  # pruned at epoch 2: their curves stop, so they would be peers only early on
        _pruned(study, 0, 4, [0.9, 0.9])
    assert _running(study, 0, 4, [0.5, 0.3]) is True  # worse than the completed trials' 0.2


def test_a_nan_peer_does_not_disable_pruning_and_a_nan_trial_is_pruned() -> None:
    study = _peers([0.5, 0.2, 0.1, 0.05])
    _finished(study, 0, 4, [float("nan"), float("nan"), 0.1, 0.05])
    assert _running(study, 0, 4, [0.5, 0.3]) is True
    assert _running(study, 0, 4, [0.5, 0.1]) is False
    assert _running(study, 0, 4, [0.5, float("nan")]) is True


def test_a_maximised_value_is_pruned_when_it_is_low() -> None:
    study = _peers([0.5, 0.8, 0.9, 0.95], copies=3, direction="maximize")  # accuracy: higher is better
    assert _running(study, 0, 4, [0.5, 0.6]) is True
    assert _running(study, 0, 4, [0.5, 0.85]) is False


def test_peers_are_not_compared_further_into_their_annealing() -> None:
    study = _peers([0.8, 0.2, 0.1, 0.05])
    # 3/8 of an 8-epoch schedule lies half way between a 4-epoch peer's epochs 1 and 2 (0.8 and
    # 0.2: 0.5); rounding to the peer's epoch 2 (half of its schedule) would compare 0.4 with 0.2
    assert _running(study, 0, 8, [0.9, 0.6, 0.4]) is False
    assert _running(study, 0, 8, [0.9, 0.6, 0.55]) is True


def test_wilcoxon_is_optunas_pruner_with_its_threshold(write_experiments) -> None:
    from pet_sweep.config import load_experiment
    from pet_sweep.errors import ConfigError
    from pet_sweep.sweep.search import make_pruner

    exp = load_experiment(write_experiments(pruner={"name": "wilcoxon", "p_threshold": 0.05, "n_warmup_steps": 3}))
    pruner = make_pruner(exp)
    assert isinstance(pruner, optuna.pruners.WilcoxonPruner)
    assert (pruner._p_threshold, pruner._n_startup_steps) == (0.05, 3)
    with pytest.raises(ConfigError, match="p_threshold is a setting of the wilcoxon pruner, not of 'median'"):
        load_experiment(write_experiments(pruner={"name": "median", "p_threshold": 0.05}))
    # epochs as its steps: a curve above the best trial's, epoch after epoch, is pruned
    study = optuna.create_study(pruner=pruner)
    _finished(study, 0, 6, [0.5, 0.3, 0.2, 0.15, 0.1, 0.05])
    assert _running(study, 0, 6, [0.6, 0.4, 0.3]) is False   # 3 epochs above the best: p = 1/8
    assert _running(study, 0, 6, [0.6, 0.4, 0.3, 0.25, 0.2]) is True   # 5 above: p = 1/32
    assert _running(study, 0, 6, [0.45, 0.25, 0.3, 0.1, 0.08]) is False
