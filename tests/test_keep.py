"""Keep the winner: a sweep keeps the best and the recommended trial's learners as MLflow models,
deletes the superseded ones, and `pet-sweep register` registers a kept one without training."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from pet_sweep.cli import cli
from tests.conftest import trains, write_experiments_file

SPACE = {"arch": "resnet18", "base_lr": 1.0e-3, "lr_hi": {"low": 1.0e-4, "high": 3.0e-2, "log": True},
         "lr_mult": 10, "freeze_epochs": 0, "epochs": 1}
N_TRIALS = 4


@pytest.fixture(scope="module")
@trains
def swept(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """experiments.yaml of a finished study of N_TRIALS tiny trials; the first one's LR too small to learn."""
    from pet_sweep.config import load_experiment
    from pet_sweep.sweep.storage import open_study

    path = write_experiments_file(tmp_path_factory.mktemp("keep"), SPACE, budget={"n_trials": N_TRIALS},
                                  data={"limit": 200})
    open_study(load_experiment(path)).enqueue_trial({"lr_hi": 1.0e-4})  # kept first, then superseded
    result = CliRunner().invoke(cli, ["run", "--config", str(path), "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return path


def _trial_runs(path: Path) -> dict[int, object]:
    from mlflow import MlflowClient

    from pet_sweep.config import load_experiment

    exp = load_experiment(path)
    client = MlflowClient(exp.tracking_uri)
    eid = client.get_experiment_by_name(exp.tracking_experiment).experiment_id
    runs = client.search_runs([eid], filter_string="tags.`pet_sweep.role` = 'trial'")
    return {int(r.data.tags["optuna.trial"]): r for r in runs}


def _has_model(run: object) -> bool:
    from mlflow.utils.file_utils import local_file_uri_to_path

    return (Path(local_file_uri_to_path(run.info.artifact_uri)) / "model" / "MLmodel").is_file()


@pytest.mark.train
def test_only_the_best_and_the_recommended_models_stay(swept: Path) -> None:
    from pet_sweep.config import load_experiment
    from pet_sweep.sweep.keep import BOUND, wanted
    from pet_sweep.sweep.storage import open_study

    exp = load_experiment(swept)
    want, done = wanted(exp, open_study(exp, create=False))
    assert len(done) == N_TRIALS and 1 <= len(want) <= BOUND
    runs = _trial_runs(swept)
    kept = {n for n, r in runs.items() if r.data.tags.get("pet_sweep.kept_model") == "true"}
    assert kept == want
    assert {n for n, r in runs.items() if _has_model(r)} == want  # the superseded ones' files are gone
    if 0 not in want:  # trial 0 (it could not learn) was the best when it ended: kept, then deleted
        assert runs[0].data.tags.get("pet_sweep.kept_model") == "deleted"


@pytest.mark.train
def test_register_makes_a_version_of_the_kept_model_without_training(swept: Path) -> None:
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    from pet_sweep.config import load_experiment
    from pet_sweep.replay import _pick_trial
    from pet_sweep.sweep.records import PREDS_ATTR
    from pet_sweep.sweep.storage import open_study
    from pet_sweep.train.data import build_data

    exp = load_experiment(swept)
    client = MlflowClient(exp.tracking_uri)
    eid = client.get_experiment_by_name(exp.tracking_experiment).experiment_id
    before = len(client.search_runs([eid]))
    done = CliRunner().invoke(cli, ["register", "--config", str(swept), "tiny", "tiny-kept"], catch_exceptions=False)
    assert done.exit_code == 0, done.output
    assert "registered   tiny-kept version 1" in done.output and "nothing trained" in done.output
    assert len(client.search_runs([eid])) == before  # no training run, no replay run
    best = _pick_trial(open_study(exp, create=False), None)
    version = client.get_model_version("tiny-kept", "1")
    assert version.run_id == best.user_attrs["mlflow_run_id"]
    assert version.tags["pet_sweep.kept_from"] == f"trial {best.number} of study tiny" and "arch=" in version.tags["params"]
    mlflow.set_tracking_uri(exp.tracking_uri)
    model = mlflow.pyfunc.load_model("models:/tiny-kept/1")
    valid = list(build_data(exp).splits.valid[:20])
    labels = model.predict(pd.DataFrame({"path": [str(p) for p in valid]}))["label"].tolist()
    vocab = model.unwrap_python_model().learn.dls.vocab
    assert labels == [str(vocab[i]) for i in best.user_attrs[PREDS_ATTR][:20]]  # as the trial's learner said


@pytest.mark.train
def test_register_without_a_kept_model_says_to_train(swept: Path) -> None:
    from pet_sweep.config import load_experiment
    from pet_sweep.sweep.keep import wanted
    from pet_sweep.sweep.storage import open_study

    exp = load_experiment(swept)
    want, done = wanted(exp, open_study(exp, create=False))
    other = min(done - want)
    result = CliRunner().invoke(cli, ["register", "--config", str(swept), "tiny", "--pick", "trial", str(other), "x"])
    assert result.exit_code == 2
    assert f"trial {other} of study 'tiny'" in result.output and "no kept model" in result.output
    assert "pet-sweep train best.yaml --register x" in result.output


@pytest.mark.train
def test_a_sweep_with_keep_winner_off_keeps_none(write_experiments) -> None:
    path = write_experiments(SPACE, budget={"n_trials": 1}, keep_winner=False)
    assert CliRunner().invoke(cli, ["run", "--config", str(path), "--quiet"], catch_exceptions=False).exit_code == 0
    runs = _trial_runs(path)
    assert len(runs) == 1 and not any(_has_model(r) for r in runs.values())
    result = CliRunner().invoke(cli, ["register", "--config", str(path), "tiny", "x"])
    assert result.exit_code == 2 and "no kept model" in result.output
