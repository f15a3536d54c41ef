"""The sweep's selection (`sweep.confirm`): the baseline and the repeats are queued as trials of
their own, within the budget, by one worker or several; then a real tiny sweep with `seeds: 2`
whose report, `list` and `export` show the best config over its seeds against the baseline."""

from __future__ import annotations

import threading

import optuna
import pytest
import yaml
from click.testing import CliRunner

from pet_sweep import Experiment
from pet_sweep.cli import cli
from pet_sweep.report.seeds import selection_of
from pet_sweep.selection import BASELINE_ATTR, CONFIG_ATTR, SEED_ATTR
from pet_sweep.space import suggest
from pet_sweep.sweep.budget import Budget, WorkerRole
from pet_sweep.sweep.confirm import Confirmer, completed_runs
from pet_sweep.sweep.records import INVOCATION_ATTR
from tests.conftest import trains

SPACE = {"arch": "resnet18", "base_lr": {"low": 1e-3, "high": 3e-2, "log": True},
         "lr_hi": {"low": 3e-4, "high": 1e-2, "log": True}, "lr_mult": {"low": 1, "high": 100, "log": True},
         "freeze_epochs": {"low": 0, "high": 1}, "epochs": 1}


def _experiment(n_trials: int, **selection: object) -> Experiment:
    return Experiment.from_dict({"data": {"source": "digits"}, "sweep": SPACE, "budget": {"n_trials": n_trials},
                                 "sampler": {"name": "random", "seed": 0}, "seed": 7, "selection": selection})


def _worker(exp: Experiment, study: optuna.Study, role: WorkerRole, lines: list[str]) -> None:
    """The loop's claim protocol (`sweep.loop._run_trials`) with an objective that trains nothing:
    its error is a function of the learning rate and the seed, so configs and seeds differ."""
    budget = Budget(role, exp.config.budget.n_trials)
    confirmer = Confirmer(exp, {}, 200, lines.append)

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr(INVOCATION_ATTR, role.invocation)
        claim.release()
        seed = int(trial.user_attrs.get(SEED_ATTR, exp.config.seed))
        trial.set_user_attr(SEED_ATTR, seed)
        trial.set_user_attr(CONFIG_ATTR, str(trial.user_attrs.get(CONFIG_ATTR, trial.number)))
        params = suggest(exp.space, trial)
        threading.Event().wait(0.02)  # the workers' trials overlap
        return abs(params.lr_hi - 3e-3) * 10 + 0.01 * (seed % 3)

    while True:
        with budget.claim() as claim:
            hold = confirmer.top_up(study, budget)
            step = budget.next_step(study)
            if step == "stop":
                return
            if step == "run" and not (hold and not study.get_trials(states=(optuna.trial.TrialState.WAITING,))):
                study.optimize(objective, n_trials=1)
                continue
        threading.Event().wait(0.01)


@pytest.mark.parametrize("workers", [1, 3])
def test_repeats_and_baseline_spend_the_budget_exactly(workers):
    exp = _experiment(10, seeds=3, confirm_top=2, baseline=True)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    invocation, lines = WorkerRole().invocation, []
    threads = [threading.Thread(target=_worker, args=(exp, study, WorkerRole(invocation, i, workers), lines))
               for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    trials = study.get_trials()
    assert len(trials) == 10 and all(t.state.name == "COMPLETE" for t in trials)  # none past the budget
    assert [t.user_attrs.get(BASELINE_ATTR) for t in trials[:3]] == [True] * 3  # the baseline comes first
    assert sorted(t.user_attrs[SEED_ATTR] for t in trials[:3]) == [7, 8, 9]
    repeats = [t for t in trials if not t.user_attrs.get(BASELINE_ATTR) and t.user_attrs[CONFIG_ATTR] != str(t.number)]
    assert len(repeats) == 2 * 2  # two configs confirmed, each on the 2 seeds after its first
    for r in repeats:  # a repeat runs its config's parameters, on its own seed
        first = trials[int(r.user_attrs[CONFIG_ATTR])]
        assert r.params == first.params and r.user_attrs[SEED_ATTR] != first.user_attrs[SEED_ATTR]
    sel = selection_of(completed_runs(trials, 7))
    assert sel is not None and sel.best.n_seeds == 3 and sel.baseline.n_seeds == 3
    assert any(line.startswith("resolution") for line in lines)


def test_a_leader_is_confirmed_only_when_it_beats_the_incumbent():
    exp = _experiment(12, seeds=2, confirm_top=3)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    _worker(exp, study, WorkerRole(), [])
    trials = study.get_trials()
    runs = completed_runs(trials, 7)
    repeated = [r for r in runs if r.config_id != str(r.number)]
    assert len(trials) == 12 and len(repeated) == 3
    firsts = {r.config_id: r.error for r in runs if r.config_id == str(r.number)}
    confirmed = [r.config_id for r in sorted(repeated, key=lambda r: r.number)]
    # the first confirmation: the best of the first half of the search; a later one beat the incumbent then,
    # or took a slot the budget kept at its end
    assert firsts[confirmed[0]] == min(e for c, e in firsts.items() if int(c) < int(confirmed[0]) + 1)


@pytest.fixture(scope="module")
@trains
def seeded_study(tmp_path_factory):
    """A real tiny sweep: the baseline on 2 seeds, one searched config and its repeat (4 trials)."""
    from tests.conftest import tiny_experiment

    folder = tmp_path_factory.mktemp("seeded")
    (folder / "sweeps").mkdir()
    (folder / "sweeps" / "tiny.yaml").write_text(yaml.safe_dump(SPACE))
    exp = tiny_experiment(budget={"n_trials": 4}, selection={"seeds": 2, "confirm_top": 1, "baseline": True})
    path = folder / "experiments.yaml"
    path.write_text(yaml.safe_dump({"default": "tiny", "experiments": {"tiny": exp}}, sort_keys=False))
    result = CliRunner().invoke(cli, ["run", "--config", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return path, result.output


@pytest.mark.train
def test_a_seeded_sweep_runs_repeats_and_the_baseline_as_trials(seeded_study):
    path, output = seeded_study
    assert "selection    the baseline (fastai's fine_tune defaults) takes 2 trials" in output
    assert "[baseline (fastai's fine_tune defaults), seed 0]" in output and "[repeat of trial 2, seed 1]" in output
    assert "resolution   differences below" in output and "best config  config 2:" in output
    study = Experiment.from_yaml(path)
    from pet_sweep.report.read import open_existing_study

    trials = open_existing_study(study).get_trials()
    assert len(trials) == 4 and trials[3].params == trials[2].params
    assert [t.user_attrs[SEED_ATTR] for t in trials] == [0, 1, 0, 1]


@pytest.mark.train
def test_the_report_list_and_export_show_the_best_config_over_its_seeds(seeded_study, tmp_path):
    path, _ = seeded_study
    result = CliRunner().invoke(cli, ["report", "--config", str(path), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("worth it?")  # the report's first line answers it
    assert "config 2:" in lines[1] and "over 2 seeds (trials 2, 3)" in lines[1] and "(sd)" in lines[1]
    assert lines[2].startswith("baseline") and "trials 0, 1" in lines[2]
    assert lines[3].startswith("vs baseline") and "paired over 2 seeds" in lines[3]
    listed = CliRunner().invoke(cli, ["list", "--config", str(path)])
    assert "config 2:" in listed.output and "baseline" in listed.output
    out = tmp_path / "best.yaml"
    exported = CliRunner().invoke(cli, ["export", "--config", str(path), "-o", str(out)])
    assert exported.exit_code == 0, exported.output
    doc = yaml.safe_load(out.read_text())
    assert doc["source"]["trial"] in (2, 3)  # the best config's median run, with the seed that replays it
    assert doc["seed"] == {2: 0, 3: 1}[doc["source"]["trial"]]
