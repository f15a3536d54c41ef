"""Multi-objective sweeps (`objectives: [error_rate, predict_ms]`): one Optuna study with a
direction per objective, no pruning, and a study resumed with other objectives refused."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml
from click.testing import CliRunner
from optuna.trial import TrialState

from pet_sweep.cli import cli
from pet_sweep.config import load_experiment
from tests.conftest import tiny_experiment, trains

# two architectures and a range of learning rates: trials whose error rate and predict_ms differ
SPACE = {"arch": {"choices": ["resnet18", "xresnet18"]}, "base_lr": 1.0e-2,
         "lr_hi": {"low": 1.0e-3, "high": 1.0e-2, "log": True}, "lr_mult": 10, "freeze_epochs": 1, "epochs": 1}
TWO_OBJECTIVES = {
    "data": {"limit": 150, "valid_pct": 0.25, "test_pct": 0.0},
    "budget": {"n_trials": 4},
    "objectives": ["error_rate", "predict_ms"],
    "sampler": {"name": "nsga2", "seed": 0},
    # a pruner that would judge every epoch of a single-objective study from the first trial on
    "pruner": {"name": "median", "n_startup_trials": 0, "n_warmup_steps": 0},
}


def write(folder: Path, **overrides: object) -> Path:
    (folder / "sweeps").mkdir(parents=True, exist_ok=True)
    (folder / "sweeps" / "tiny.yaml").write_text(yaml.safe_dump(SPACE))
    path = folder / "experiments.yaml"
    doc = {"default": "tiny", "experiments": {"tiny": tiny_experiment(**{**TWO_OBJECTIVES, **overrides})}}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture(scope="module")
@trains
def two_objective_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    path = write(tmp_path_factory.mktemp("multi-objective"))
    result = CliRunner().invoke(cli, ["run", "--config", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return path, result.output


@pytest.mark.train
def test_a_two_objective_sweep_completes_every_trial_unpruned(two_objective_sweep) -> None:
    path, output = two_objective_sweep
    assert ("objectives   multi-objective (error_rate, predict_ms): Optuna does not prune multi-objective "
            "trials; pruner median is not used") in output
    exp = load_experiment(path)
    study = optuna.load_study(study_name=exp.study_name, storage=exp.storage_url)
    assert study.metric_names == ["error_rate", "predict_ms"]
    assert [d.name for d in study.directions] == ["MINIMIZE", "MINIMIZE"]
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4, output
    for trial in trials:
        assert len(trial.values) == 2
        assert trial.values[1] == trial.user_attrs["predict_ms"]
        assert trial.intermediate_values == {}  # nothing reported to Optuna: it could not prune
        assert len(trial.user_attrs["history"]) == 2  # every epoch still recorded
        line = next(line for line in output.splitlines() if line.startswith(f"trial {trial.number:>3} COMPLETE"))
        assert f"error_rate={trial.values[0]:.4f} predict_ms={trial.values[1]:.3g}" in line
    # The front has at least one point. Issue 18 asks for >= 2: with four tiny trials that holds
    # only when the lowest error does not also predict fastest, which the timings of a shared
    # CPU do not guarantee, so it is not asserted here.
    front = study.best_trials
    assert front and all(t.state == TrialState.COMPLETE for t in front)
    lowest = min(t.values[0] for t in trials)
    assert lowest in {t.values[0] for t in front}


@pytest.mark.train
def test_resuming_with_other_objectives_is_refused(two_objective_sweep, tmp_path: Path) -> None:
    path, _ = two_objective_sweep
    for objectives in (["error_rate"], ["error_rate", "params_m"]):
        doc = yaml.safe_load(path.read_text())
        doc["experiments"]["tiny"]["objectives"] = objectives
        doc["experiments"]["tiny"]["sampler"] = {"name": "random", "seed": 0}
        changed = path.parent / f"changed-{len(objectives)}.yaml"
        changed.write_text(yaml.safe_dump(doc, sort_keys=False))
        result = CliRunner().invoke(cli, ["run", "--config", str(changed), "--n-trials", "1"])
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
        assert "created with objectives [error_rate, predict_ms]" in result.output
        assert f"`objectives` asks for [{', '.join(objectives)}]" in result.output
        assert str(changed) in result.output
    exp = load_experiment(path)
    assert len(optuna.load_study(study_name=exp.study_name, storage=exp.storage_url).trials) == 4  # none added


@pytest.mark.parametrize("overrides, message", [
    ({"objectives": ["error_rate", "latency"]}, "objectives"),
    ({"objectives": ["error_rate"], "sampler": {"name": "nsga2", "seed": 0}}, "sampler nsga2"),
    ({"objectives": ["predict_ms", "error_rate"]}, "must start with error_rate"),
])
def test_bad_objectives_exit_2_and_create_nothing(tmp_path: Path, overrides: dict, message: str) -> None:
    path = write(tmp_path, **overrides)
    result = CliRunner().invoke(cli, ["run", "--config", str(path)])
    assert result.exit_code == 2, result.output
    assert message in result.output and str(path) in result.output and "Traceback" not in result.output
    assert "objectives" in result.output
    assert not (tmp_path / "stores").exists()
