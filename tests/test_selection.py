"""The `selection:` settings, fastai's fine_tune defaults as a baseline config, the resolution of a
validation set, and configs summarised over their seeds (pure: nothing trains)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from pet_sweep.cli import cli
from pet_sweep.config import load_experiment
from pet_sweep.errors import ConfigError
from pet_sweep.report.seeds import Run, best_config, compare_configs, selection_of, summarise
from pet_sweep.selection import SelectionConfig, baseline_params, items_needed, resolution
from pet_sweep.space import parse_space


@pytest.mark.parametrize("selection, key", [({"seeds": 0}, "selection.seeds"),
                                            ({"confirm_top": 5}, "selection.confirm_top"),
                                            ({"sedes": 2}, "selection.sedes")])
def test_bad_selection_exits_2_naming_the_key(write_experiments, selection, key):
    path = write_experiments(selection=selection)  # the tiny experiment's budget: 2 trials
    with pytest.raises(ConfigError) as err:
        load_experiment(path)
    assert err.value.key == key
    result = CliRunner().invoke(cli, ["run", "--config", str(path)])
    assert result.exit_code == 2 and key in result.output


def test_budget_text_counts_the_repeats():
    sel = SelectionConfig(seeds=2, confirm_top=3, baseline=True)
    assert sel.reserved() == 2 + 3
    assert "up to 5 of the 16 trials" in sel.budget_text(16) and "11 left" in sel.budget_text(16)


def test_baseline_is_fine_tune_in_the_spaces_terms():
    space = parse_space({"arch": {"choices": ["xresnet34", "xresnet18"]}, "base_lr": {"low": 1e-3, "high": 3e-2},
                         "lr_hi": {"low": 3e-4, "high": 1e-2}, "lr_mult": {"low": 1, "high": 30},
                         "freeze_epochs": {"low": 0, "high": 3}, "epochs": {"low": 2, "high": 10}})
    params, notes = baseline_params(space)
    assert (params.arch, params.freeze_epochs, params.base_lr) == ("xresnet34", 1, 2e-3)
    assert params.lr_hi == pytest.approx(1e-3) and params.lr_lo == pytest.approx(1e-5)  # halved, lr_mult 100
    assert 2 <= params.epochs <= 10
    assert any("lr_mult" in n for n in notes)  # 100 lies outside this space's lr_mult


def test_resolution_shrinks_with_items_and_grows_with_seed_spread():
    small, large = resolution(90, 0.17), resolution(360, 0.17)
    assert large.difference < small.difference
    assert resolution(90, 0.17, seeds=2, spread=0.06).difference > resolution(90, 0.17, seeds=2).difference
    need = items_needed(0.17, small.difference)
    assert abs(need - 90) <= 2  # the inverse of the item part


def _runs():
    t = (0, 1, 0, 1)
    return [Run(0, "baseline", 0, 0.5, True, (1, 1, 1, 1), t), Run(1, "baseline", 1, 0.5, True, (0, 0, 0, 0), t),
            Run(2, "2", 0, 0.0, False, t, t), Run(3, "3", 0, 0.25, False, (0, 1, 0, 0), t),
            Run(4, "3", 1, 0.25, False, (0, 1, 1, 1), t)]


def test_best_config_is_the_lowest_mean_of_the_most_seeds():
    configs = {c.config_id: c for c in summarise(_runs())}
    assert configs["3"].n_seeds == 2 and configs["3"].mean == pytest.approx(0.25)
    # config 2 erred on nothing, but on one seed: the config confirmed on two stays the incumbent
    assert best_config(list(configs.values())).config_id == "3"
    assert configs["baseline"].spread == pytest.approx(0.0)


def test_selection_compares_the_winner_with_the_baseline_over_seeds_and_items():
    sel = selection_of(_runs())
    assert sel is not None and sel.best.config_id == "3" and sel.baseline.baseline
    assert sel.versus.n_items == 8 and sel.versus.paired  # 2 shared seeds x 4 items
    labels = [label for label, _ in sel.lines()]
    assert labels[0] == "worth it?" and "baseline" in labels
    assert compare_configs("x", sel.best, summarise(_runs())[1]).n_items == 4  # config 2: seed 0 only


def test_a_selection_that_leaves_nothing_to_search_exits_2(write_experiments):
    path = write_experiments(selection={"seeds": 2, "baseline": True})  # 2 baseline runs of a 2-trial budget
    result = CliRunner().invoke(cli, ["run", "--config", str(path)])
    assert result.exit_code == 2 and "selection.seeds" in result.output and "none of" in result.output


def test_a_smaller_n_trials_cuts_the_selection_down_to_fit(write_experiments):
    """`--n-trials` below the file's (a resume's last trials, `--n-trials 0`) runs what fits, not an error."""
    from pet_sweep.config import load_experiment

    path = write_experiments(selection={"seeds": 2, "baseline": True, "confirm_top": 2}, budget={"n_trials": 8})
    exp = load_experiment(path)
    assert exp.with_overrides(n_trials=8).config.selection == exp.config.selection  # fits: 4 of 8 kept
    cut = {n: exp.with_overrides(n_trials=n).config.selection for n in (4, 3, 2, 0)}
    assert [(c.seeds, c.confirm_top, c.baseline) for c in cut.values()] == [
        (2, 1, True), (2, 0, True), (1, 0, False), (1, 0, False)]
    assert cut[3].budget_text(3) == ("the baseline (fastai's fine_tune defaults) takes 2 trials: up to 2 of the "
                                     "3 trials, at least 1 left to search")


def test_from_dict_checks_selection_as_the_file_does():
    from pet_sweep import Experiment

    with pytest.raises(ConfigError) as err:
        Experiment.from_dict({"data": {"source": "digits"}, "sweep": {"arch": "resnet18"},
                              "budget": {"n_trials": 2}, "selection": {"confirm_top": 5}})
    assert err.value.key == "selection.confirm_top"


def test_the_resolution_warning_asks_only_for_what_a_split_can_give() -> None:
    from pet_sweep.selection import resolution_warning

    res = resolution(90, 0.17, 2, 0.07)
    assert resolution_warning(res, 0.0, 0.1, 2) is None   # no difference measured: nothing to advise
    assert resolution_warning(res, res.difference, 0.1, 2) is None
    far = resolution_warning(res, 0.033, 0.1, 2)          # the default sweep's: 928 items wanted of 896
    assert "more than the data can spare for validation" in far and "raise selection.seeds (now 2)" in far
    near = resolution_warning(res, res.difference * 0.8, 0.1, 2)
    assert "more than the data" not in near and "(valid_pct 0." in near
    with pytest.raises(ValueError, match="above 0"):
        items_needed(0.17, 0.0)


def test_the_sweeps_closing_line_tests_the_winner_against_the_baseline_on_their_shared_seeds() -> None:
    """`run`'s `best config` line reads the trials' validation predictions (as the report does)."""
    import optuna

    from pet_sweep.selection import BASELINE_ATTR, BASELINE_ID, CONFIG_ATTR, SEED_ATTR
    from pet_sweep.sweep.confirm import best_config_text, completed_runs
    from pet_sweep.sweep.records import PREDS_ATTR, TARGETS_ATTR

    targets = [i % 5 for i in range(90)]

    def trial(number: int, wrong: int, **attrs):
        preds = [(t + 1) % 5 if i < wrong else t for i, t in enumerate(targets)]
        return optuna.trial.create_trial(value=wrong / 90, user_attrs={PREDS_ATTR: preds, TARGETS_ATTR: targets,
                                                                      **attrs}) , number

    made = [trial(0, 40, **{BASELINE_ATTR: True, CONFIG_ATTR: BASELINE_ID, SEED_ATTR: 0}),
            trial(1, 38, **{BASELINE_ATTR: True, CONFIG_ATTR: BASELINE_ID, SEED_ATTR: 1}),
            trial(2, 5, **{SEED_ATTR: 0}), trial(3, 6, **{CONFIG_ATTR: "2", SEED_ATTR: 1})]
    trials = []
    for t, number in made:
        t.number = number
        trials.append(t)
    text = best_config_text(completed_runs(trials, 0))
    assert text.startswith("config 2: ") and "worth it? yes: the sweep's winner beats" in text, text
