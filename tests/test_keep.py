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
    from pet_sweep.exported import _pick_trial
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



class _Learner:
    """What `KeepWinner` does with a learner besides saving it: its callbacks removed, then released.
    `order`: where its trial came in the order the two workers told theirs."""

    cbs: list = []

    def __init__(self, order: int) -> None:
        self.order = order

    def remove_cbs(self, cbs: list) -> None:
        pass


@pytest.mark.slow
def test_two_workers_finishing_together_keep_only_the_bound_on_an_mlflow_server(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two workers tell their trials at once, five times, against a real `mlflow server` (its artifacts
    proxied over HTTP, so each superseded model is deleted through the server) and a real Optuna store.

    Each round is the race `sweep.keep` guards against: the first worker tells its trial and reads
    the study (its trial the best so far), the second tells a better one a moment later, and the first
    one's upload is the slower, so the second lists the kept models before the first has tagged its own.
    Only the first worker's read after its tag sees that its model is superseded."""
    import itertools
    import threading
    import time

    import optuna
    from mlflow import MlflowClient

    from pet_sweep.config import load_experiment
    from pet_sweep.sweep.keep import BOUND, KeepWinner, wanted
    from pet_sweep.sweep.storage import open_study
    from pet_sweep.tracking import RUN_ID_ATTR, kept_models
    from pet_sweep.tracking_kept import DELETED, KEPT_TAG, MODEL_DIR
    from tests.test_tracking_outage import MlflowServer

    server = MlflowServer(tmp_path / "server")
    server.start()
    try:
        exp = load_experiment(write_experiments_file(tmp_path, SPACE, tracking={"uri": server.uri}))
        client = MlflowClient(server.uri)
        eid = client.create_experiment(exp.tracking_experiment)

        def save(learner: _Learner, tmp: Path, example: bytes) -> Path:  # a model folder; the first of a round slow
            time.sleep(1.0 if learner.order % 2 == 0 else 0.0)
            (tmp / "model").mkdir()
            (tmp / "model" / "MLmodel").write_text("flavors: {}\n")
            (tmp / "model" / "weights.bin").write_bytes(bytes(2048))
            return tmp / "model"

        monkeypatch.setattr("pet_sweep.serve.save_pyfunc", save)
        told, tell_lock, barrier = itertools.count(), threading.Lock(), threading.Barrier(2)
        lines: list[str] = []
        failures: list[BaseException] = []

        class Objective:
            def __init__(self) -> None:
                self.number = self.order = -1
                self.tracker = type("Tracker", (), {"experiment_id": eid, "down_for": lambda self: 0.0})()

            def take_learner(self) -> tuple[int, _Learner]:
                return self.number, _Learner(self.order)

        def worker() -> None:
            try:
                study, objective = open_study(exp, create=False), Objective()
                keeper = KeepWinner(exp, objective, lines.append)
                keeper._example = b"an image"
                for _ in range(5):
                    trial = study.ask()
                    run = client.create_run(eid, tags={"pet_sweep.study": exp.study_name, "pet_sweep.role": "trial",
                                                       "optuna.trial": str(trial.number)})
                    trial.set_user_attr(RUN_ID_ATTR, run.info.run_id)
                    barrier.wait(timeout=120)  # both finish together
                    with tell_lock:
                        order = next(told)
                        if order % 2:
                            time.sleep(0.3)  # the second tells once the first has read the study
                        frozen = study.tell(trial, 1.0 - 0.05 * order)  # each the best when told
                    objective.number, objective.order = trial.number, order
                    keeper(study, frozen)
            except BaseException as err:  # noqa: BLE001 - reported by the assertion below
                failures.append(err)
                barrier.abort()

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        open_study(exp)
        threads = [threading.Thread(target=worker) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=600)
        assert failures == [] and lines == [], (failures, lines)

        study = open_study(exp, create=False)
        want, done = wanted(exp, study)
        assert len(done) == 10 and 1 <= len(want) <= BOUND
        kept = kept_models(server.uri, eid).kept(exp.study_name)
        assert {k.number for k in kept} == want
        runs = {int(r.data.tags["optuna.trial"]): r for r in client.search_runs([eid])}
        assert len([r for r in runs.values() if r.data.tags.get(KEPT_TAG) == DELETED]) >= 5
        for number, run in runs.items():  # what the server lists, and what is on its disk
            listed = [f.path for f in client.list_artifacts(run.info.run_id, MODEL_DIR)]
            on_disk = list((tmp_path / "server" / "artifacts").glob(f"*/{run.info.run_id}/artifacts/{MODEL_DIR}/*"))
            if number in want:
                assert sorted(Path(p).name for p in listed) == ["MLmodel", "weights.bin"] and len(on_disk) == 2
            else:
                assert listed == [] and on_disk == [], (number, listed, on_disk)
    finally:
        server.kill()
