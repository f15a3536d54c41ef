"""`budget.stop_when: converged`: Optuna's Terminator rule (regret bound against the error's noise)
ends the search early; the baseline and the confirmations still run; the verdict reaches the run's
last line, the supervisor and the report."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution

from pet_sweep.sweep.converge import VERDICT_ATTR, Verdict, evaluate, searched_trials


def trials_with(errors: list[float], lrs: list[float]) -> list[optuna.trial.FrozenTrial]:
    dist = {"base_lr": FloatDistribution(1e-4, 1e-1, log=True)}
    out = [optuna.trial.create_trial(params={"base_lr": lr}, distributions=dist, value=e) for e, lr in zip(errors, lrs)]
    for number, t in enumerate(out):
        t.number = number
    return out


LRS = [10 ** (-4 + 3 * i / 11) for i in range(12)]


def test_a_flat_landscape_measured_on_few_items_has_converged() -> None:
    # every config within a point of the others, judged on 40 items (item noise about 4.7 %)
    trials = trials_with([0.15 + 0.01 * (i % 2) for i in range(12)], LRS)
    verdict = evaluate(trials, trials, 40, "inv", 0, 0)
    assert verdict is not None and verdict.converged, verdict
    assert verdict.noise == pytest.approx(math.sqrt(0.15 * 0.85 / 40)) and verdict.noise_from == "items"
    assert verdict.regret_bound < verdict.noise and verdict.n_trials == 12 and verdict.best_trial == 0


def test_a_steep_landscape_measured_on_many_items_has_not() -> None:
    # the error falls steeply from both sides towards learning rates no trial has tried (1e-3 to 1e-2),
    # on 100,000 items (noise 0.1 %); a slope down to the range's edge would be no room: it is sampled
    logs = [-4 + 0.15 * i for i in range(6)] + [-1.75 + 0.15 * i for i in range(6)]
    trials = trials_with([0.05 + 0.25 * abs(x + 2.5) for x in logs], [10 ** x for x in logs])
    verdict = evaluate(trials, trials, 100_000, "inv", 0, 0)
    assert verdict is not None and not verdict.converged, verdict
    assert verdict.regret_bound >= verdict.noise
    assert "not converged after 12 searched trials" in verdict.text()
    assert Verdict.from_attr(verdict.as_attr()) == verdict and Verdict.from_attr({"other": 1}) is None


def test_only_completed_searched_trials_feed_the_bound() -> None:
    trials = trials_with([0.2, 0.3, 0.25], LRS[:3])
    trials[1].user_attrs.update({"config_id": 0, "train_seed": 1})  # a repeat of trial 0 on another seed
    trials[2].user_attrs["baseline"] = True
    assert [t.number for t in searched_trials(trials)] == [0]


def test_converged_is_for_one_objective() -> None:
    from pet_sweep import Experiment
    from pet_sweep.errors import ConfigError

    with pytest.raises(ConfigError, match="stop_when: converged is for one objective"):
        Experiment.from_dict({"data": {"source": "digits"}, "sweep": {"arch": "resnet18"},
                              "objectives": ["error_rate", "predict_ms"], "budget": {"stop_when": "converged"}}, "x")


@pytest.mark.parametrize("workers", [1, 2])
def test_a_converged_search_stops_early_and_still_confirms_its_leader(tmp_path: Path, workers: int,
                                                                     capfd: pytest.CaptureFixture[str]) -> None:
    """The stand-in training (no torch): its error is nearly flat near the best learning rates and 20
    validation items give it a noise of several points, so the rule fires at its first check."""
    from bench.common import experiment_in
    from bench.scale_run import space
    from bench.simulated import StandIn, Zygote
    from pet_sweep.launch.local import supervise
    from pet_sweep.sweep.loop import run_sweep

    exp = experiment_in(tmp_path / "sweep", {
        "budget": {"n_trials": 12, "stop_when": "converged", "min_trials": 4},
        "selection": {"seeds": 2, "confirm_top": 1, "baseline": True},
        "sampler": {"name": "random"}, "data": {"source": "digits", "limit": 100},
        "model": {"pretrained": False}}, space(2), "conv")
    lines: list[str] = []
    if workers == 1:
        result = run_sweep(exp, echo=lines.append, training=StandIn(pace=0.0, valid_items=20))
    else:
        zygote = Zygote(tmp_path, pace=0.05, valid_items=20)
        try:
            result = supervise(exp, workers, [], echo=lines.append, warn=lines.append, start=zygote.start)
        finally:
            zygote.close()
    study = optuna.load_study(study_name=exp.study_name, storage=exp.storage_url)
    verdict = Verdict.from_attr(study.user_attrs[VERDICT_ATTR])
    assert verdict is not None and verdict.converged and verdict.n_trials >= 4, (verdict, lines)
    assert result.stopped_by == "converged" and result.ran < 12 and result.left == 12 - result.ran, (result, lines)
    said = lines + capfd.readouterr().out.splitlines()  # the forked workers print where the test does
    assert sum(line.startswith("terminator   converged after") for line in said) == 1, said  # one worker evaluated
    done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    kinds = [("baseline" if t.user_attrs.get("baseline") else
              "repeat" if str(t.user_attrs.get("config_id", t.number)) != str(t.number) else "search") for t in done]
    assert kinds.count("baseline") == 2 and kinds.count("repeat") == 1, kinds  # the leader, on its second seed
    # no searched trial started after the verdict (a worker's trial running at that moment may finish)
    assert kinds.count("search") <= verdict.n_trials + workers - 1, (kinds, verdict)
    if workers == 1:  # the report says what the rule found, and the run's last line (below) says it too
        from pet_sweep.report.read import load_report

        notes = load_report(exp).report.notes
        assert f"budget.stop_when: converged: {verdict.text()}; the search stopped there" in notes, notes


def test_the_last_line_gives_the_verdict_and_the_slots_left(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pet_sweep.cli.run import _print_converged
    from pet_sweep.config import load_experiment
    from pet_sweep.sweep.records import SweepResult
    from pet_sweep.sweep.storage import open_study
    from tests.conftest import write_experiments_file

    exp = load_experiment(write_experiments_file(tmp_path, budget={"n_trials": 12, "stop_when": "converged"}))
    verdict = Verdict("inv", 5, 0.01, 0.04, "seeds", 3, True)
    open_study(exp).set_user_attr(VERDICT_ATTR, verdict.as_attr())
    _print_converged(exp, SweepResult(exp.study_name, "", ran=7, finished=7, best=(0.1, 3), stopped_by="converged",
                                      left=5), 12)
    assert capsys.readouterr().out == (
        "budget       the search converged after 5 searched trials: regret bound 1.00% < noise 4.00% (the seed "
        "spread of trial 3's error; Optuna's Terminator rule); 7 of 12 trials ran, 5 left unused\n")
