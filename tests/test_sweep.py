"""`pet-sweep run` end to end on a tiny digits study: Optuna storage, MLflow structure, resume, errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from pet_sweep.cli import cli
from pet_sweep.config import load_experiment
from tests._sweeps import closed_port
from tests.conftest import trains


def _invoke(*args: str):
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result


@pytest.fixture(scope="module")
@trains
def swept(tmp_path_factory: pytest.TempPathFactory):
    """One 2-trial sweep, shared by the read-only checks below."""
    import yaml

    from tests.conftest import TINY_SPACE, tiny_experiment

    folder = tmp_path_factory.mktemp("sweep")
    (folder / "sweeps").mkdir()
    space = {**TINY_SPACE, "lr_hi": {"low": 3e-3, "high": 3e-2, "log": True}}
    (folder / "sweeps" / "tiny.yaml").write_text(yaml.safe_dump(space))
    (folder / "experiments.yaml").write_text(
        yaml.safe_dump({"default": "tiny", "experiments": {"tiny": tiny_experiment()}}))
    result = CliRunner().invoke(cli, ["run", "--config", str(folder / "experiments.yaml")],
                                catch_exceptions=False)
    return folder, load_experiment(folder / "experiments.yaml"), result


@pytest.mark.train
def test_run_prints_where_things_go_and_one_line_per_trial(swept) -> None:
    folder, exp, result = swept
    assert result.exit_code == 0, result.output
    out = result.output
    assert "experiment   tiny" in out and "study        tiny" in out
    assert exp.storage_url in out and exp.tracking_uri in out
    # a first run creates both store files and their folder, and says so (a mistyped path shows)
    assert f"storage      {exp.storage_url}  (new file and folder)" in out
    assert f"MLflow       {exp.tracking_uri}  experiment 'pet-sweep/tiny'  (new file and folder)" in out
    finished = [line for line in out.splitlines() if line.startswith("trial ") and "started" not in line]
    assert len(finished) == 2 and all("COMPLETE" in line and "error_rate=" in line for line in finished)
    started = [line for line in out.splitlines() if line.startswith("trial ") and "started" in line]
    assert len(started) == 2  # not a terminal: one plain line per event, no status line
    assert "best         trial" in out
    assert "%|" not in out and "epoch     train_loss" not in out  # no fastai bars or tables


@pytest.mark.train
def test_the_time_budget_starts_after_pretraining(write_experiments, monkeypatch) -> None:
    """A first run that pretrains its bodies (or runs the LR finder) for longer than
    budget.timeout still runs a trial: the clock counts trials only."""
    import time

    from pet_sweep.train import pretrain

    def slow_checkpoints(exp, echo):
        time.sleep(3)  # a pretraining longer than the whole time budget
        return {}

    monkeypatch.setattr(pretrain, "checkpoints_for", slow_checkpoints)  # read on each call by sweep.training
    path = write_experiments(budget={"n_trials": 50, "timeout": 2})
    result = _invoke("run", "--config", str(path))
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="tiny", storage=load_experiment(path).storage_url)
    ran = len(study.get_trials())
    assert 1 <= ran < 50  # counted from the start, the budget was spent before the first trial
    assert f"time budget reached (budget.timeout 2s): {ran} of 50 trials ran" in result.output


@pytest.mark.train
def test_optuna_storage_holds_trials_with_history(swept) -> None:
    _, exp, _ = swept
    study = optuna.load_study(study_name="tiny", storage=exp.storage_url)
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    for t in trials:
        history = t.user_attrs["history"]
        assert [h["epoch"] for h in history] == [0, 1]
        assert [h["phase"] for h in history] == ["frozen", "unfrozen"]
        assert t.value == pytest.approx(history[-1]["error_rate"])
        assert sorted(t.intermediate_values) == [0, 1]  # reported at the global epoch
        assert t.user_attrs["params"]["arch"] == "resnet18" and t.user_attrs["precision"] == "fp32"
        assert len(t.user_attrs["valid_preds"]) == 60


@pytest.mark.train
def test_mlflow_parent_and_nested_trial_runs(swept) -> None:
    _, exp, _ = swept
    client = MlflowClient(tracking_uri=exp.tracking_uri)
    experiment = client.get_experiment_by_name("pet-sweep/tiny")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("pet_sweep.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("pet_sweep.role") == "trial"]
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.info.run_name == "sweep-tiny"
    assert "best_error_rate" in parent.data.metrics and parent.data.params["n_trials"] == "2"
    study = optuna.load_study(study_name="tiny", storage=exp.storage_url)
    assert study.user_attrs["mlflow_parent_run_id"] == parent.info.run_id
    by_name = {r.info.run_name: r for r in children}
    assert set(by_name) == {"trial-0", "trial-1"}
    for trial in study.get_trials():
        run = by_name[f"trial-{trial.number}"]
        assert run.info.run_id == trial.user_attrs["mlflow_run_id"]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == "FINISHED" and run.data.tags["optuna.state"] == "COMPLETE"
        assert run.data.tags["arch"] == "resnet18"
        for key in ("arch", "base_lr", "lr_lo", "lr_hi", "freeze_epochs", "epochs", "precision",
                    "img_size", "batch_size", "pretrained", "seed"):
            assert key in run.data.params, key
        assert float(run.data.params["lr_lo"]) <= float(run.data.params["lr_hi"])
        for metric in ("train_loss", "valid_loss", "error_rate"):
            history = client.get_metric_history(run.info.run_id, metric)
            assert sorted(m.step for m in history) == [0, 1]  # freeze_epochs + epochs, global steps
        assert run.data.metrics["final_error_rate"] == pytest.approx(trial.value)
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"trial_config.yaml", "loss_curve.png"} <= artifacts
    png = client.download_artifacts(children[0].info.run_id, "loss_curve.png")
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.train
def test_optuna_cli_lists_the_trials(swept) -> None:
    _, exp, _ = swept
    optuna_cli = Path(sys.executable).parent / "optuna"
    out = subprocess.run([str(optuna_cli), "trials", "--study-name", "tiny", "--storage", exp.storage_url,
                          "-f", "yaml"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("state: COMPLETE") == 2 and "lr_hi:" in out.stdout


@pytest.mark.train
def test_resume_adds_trials_to_the_same_study(write_experiments) -> None:
    path = write_experiments(budget={"n_trials": 1})
    assert _invoke("run", "--config", str(path)).exit_code == 0
    # a timeout the run does not reach, whatever the machine's speed: no time-budget line
    second = _invoke("run", "--config", str(path), "--n-trials", "1", "--timeout", "600")
    assert second.exit_code == 0, second.output
    assert "(new file" not in second.output  # the same stores: nothing new
    assert "time budget" not in second.output
    exp = load_experiment(path)
    study = optuna.load_study(study_name="tiny", storage=exp.storage_url)
    assert [t.number for t in study.get_trials()] == [0, 1]
    client = MlflowClient(tracking_uri=exp.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("pet-sweep/tiny").experiment_id])
    assert sum(r.data.tags.get("pet_sweep.role") == "sweep" for r in runs) == 1  # same parent run

    # a time budget ends a run before its trial budget: exit 0, and say how to add the rest
    third = _invoke("run", "--config", str(path), "--n-trials", "50", "--timeout", "2")
    assert third.exit_code == 0, third.output
    ran = len(study.get_trials()) - 2
    assert ran < 50  # each trial trains two epochs: far more than 2 s for 50 of them
    assert (f"budget       time budget reached (budget.timeout 2s): {ran} of 50 trials ran; add more with: "
            f"pet-sweep run tiny --config {path} --timeout 2 --n-trials {50 - ran} (--timeout SECONDS for a longer run)"
            ) in third.output

    # the study's cap ends a run before its trial budget: exit 0, and say it was the cap
    total = len(study.get_trials())
    write_experiments(budget={"n_trials": 1, "max_trials": total + 1})
    fourth = _invoke("run", "--config", str(path), "--n-trials", "5")
    assert fourth.exit_code == 0, fourth.output
    assert len(study.get_trials()) == total + 1
    assert (f"budget       the study's cap is reached (budget.max_trials {total + 1}, counting trials finished or "
            "running anywhere): 1 of 5 trials ran here; raise budget.max_trials to go on") in fourth.output
    # the next commands name the same study: a --study-name given here is repeated there
    renamed = _invoke("run", "--config", str(path), "--n-trials", "1", "--study-name", "other")
    assert (f"next         pet-sweep report tiny --config {path} --study-name other   |   "
            f"pet-sweep ui tiny --config {path}") in renamed.output, renamed.output


@pytest.mark.train
def test_diverging_trials_are_pruned_with_reason_and_the_sweep_goes_on(write_experiments) -> None:
    space = {"arch": "resnet18", "base_lr": 1.0e6, "lr_hi": 1.0e6, "lr_mult": 10, "freeze_epochs": 1,
             "epochs": 1}
    path = write_experiments(space=space)
    result = _invoke("run", "--config", str(path))
    assert result.exit_code == 0, result.output
    assert result.output.count("PRUNED") == 2 and "training loss became" in result.output
    exp = load_experiment(path)
    study = optuna.load_study(study_name="tiny", storage=exp.storage_url)
    assert all(t.state == optuna.trial.TrialState.PRUNED for t in study.get_trials())
    assert "training loss became" in study.trials[0].user_attrs["reason"]
    client = MlflowClient(tracking_uri=exp.tracking_uri)
    run = client.get_run(study.trials[0].user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["optuna.state"] == "PRUNED"
    assert "training loss became" in run.data.tags["reason"]


@pytest.mark.parametrize("args, overrides, message", [
    (["nope"], {}, "unknown experiment 'nope'; valid choices: tiny"),
    ([], {"data": {"source": "folder", "path": "missing", "label": "parent"}}, "folder not found"),
    ([], {"model": {"img_size": 2}}, "key 'model.img_size'"),
    (["--storage", "postgresql://postgres@127.0.0.1:1/test"], {}, "cannot open the Optuna storage postgresql://"),
    (["--timeout", "-5"], {}, "--timeout must be > 0 seconds, but got -5"),
])
def test_bad_input_exits_2_and_creates_nothing(write_experiments, args, overrides, message) -> None:
    path = write_experiments(**overrides)
    result = CliRunner().invoke(cli, ["run", "--config", str(path), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (path.parent / "stores").exists()  # no study, no MLflow store
    assert not (path.parent / "runs").exists()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_an_mlflow_server_that_is_down_is_said_in_seconds(write_experiments, workers: str, monkeypatch) -> None:
    """MLflow's own client would retry for minutes and then print a traceback.

    Said before that client sends anything (not timed: a wall-clock bound fails on a busy machine).
    """
    import mlflow.utils.rest_utils

    asked = []

    def retrying_client(*args, **kwargs) -> None:  # noqa: ANN002, ANN003 - stands in for MLflow's
        asked.append(kwargs.get("endpoint", args[1:2]))
        raise AssertionError("MLflow's retrying client was asked")

    monkeypatch.setattr(mlflow.utils.rest_utils, "http_request", retrying_client)
    path = write_experiments()
    uri = f"http://user:s3cret@127.0.0.1:{closed_port()}"
    result = CliRunner().invoke(cli, ["run", "--config", str(path), "--tracking-uri", uri, "--workers", workers])
    assert result.exit_code == 2, result.output
    assert asked == []
    assert "cannot reach the MLflow tracking server http://user:***@127.0.0.1:" in result.output
    assert "s3cret" not in result.output and "Traceback" not in result.output
    assert not (path.parent / "stores").exists()  # no study, no MLflow store


def test_any_http_answer_counts_as_a_server(tmp_path) -> None:
    import http.server
    import threading

    from pet_sweep.errors import StudyError
    from pet_sweep.tracking import check_server

    class Answer(http.server.BaseHTTPRequestHandler):
        status = 200

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(self.status)
            self.end_headers()

        def log_message(self, *args) -> None:  # noqa: ANN002 - quiet
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        check_server(url)  # an MLflow server's /health answers 200
        Answer.status = 401
        check_server(url + "/")  # a login to pass: a server is there, MLflow's client says the rest
    finally:
        server.shutdown()
    with pytest.raises(StudyError, match="cannot reach the MLflow tracking server"):
        check_server(f"http://127.0.0.1:{closed_port()}", timeout=5)
    check_server(f"sqlite:///{tmp_path}/mlflow.db")  # not a server: nothing to check


def test_every_command_has_help() -> None:
    for name, command in cli.commands.items():
        assert command.help and len(command.help.strip()) > 10, name
        result = CliRunner().invoke(cli, [name, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output


def test_python_dash_m_and_fast_help() -> None:
    out = subprocess.run([sys.executable, "-c", "import sys, pet_sweep.cli; "
                          "print(sorted(m for m in ('torch', 'fastai', 'mlflow', 'optuna') if m in sys.modules))"],
                         capture_output=True, text=True, timeout=600)
    assert out.stdout.strip() == "[]"  # heavy libraries stay out of the CLI's import
    help_out = subprocess.run([sys.executable, "-m", "pet_sweep", "--help"], capture_output=True, text=True,
                              timeout=600)
    assert help_out.returncode == 0 and "run" in help_out.stdout


def test_a_resumed_study_draws_new_parameters(write_experiments) -> None:
    from pet_sweep.sweep.search import trial_seed
    from pet_sweep.sweep.storage import open_study

    exp = load_experiment(write_experiments())  # random sampler, seed 0
    first = open_study(exp)
    assert first.metric_names == ["error_rate"]
    trial = first.ask()
    drawn = trial.suggest_float("base_lr", 1e-4, 1e-1, log=True)
    first.tell(trial, 0.5)
    # the same seed again would repeat the first run's draw; a resume gets its own stream
    resumed = open_study(exp)
    assert resumed.ask().suggest_float("base_lr", 1e-4, 1e-1, log=True) != drawn
    assert trial_seed(0, 1) == trial_seed(0, 1) != trial_seed(0, 2)


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_machines_opening_a_study_together_draw_different_parameters(write_experiments, tmp_path: Path,
                                                                      sampler: str) -> None:
    """Two processes that open a new study at once each start from the same seed; their trials
    still differ, and the same study run again draws the same parameters trial by trial."""
    from pet_sweep.sweep.storage import open_study

    def draws(storage: str) -> list[float]:
        exp = load_experiment(write_experiments(sampler={"name": sampler, "seed": 0})).with_overrides(storage=storage)
        machine_a, machine_b = open_study(exp), open_study(exp)  # both see an empty study
        values = []
        for study in (machine_a, machine_b, machine_a, machine_b):
            trial = study.ask()
            values.append(trial.suggest_float("base_lr", 1e-4, 1e-1, log=True))
            study.tell(trial, 0.5)
        return values

    first = draws(f"sqlite:///{tmp_path}/one.db")
    assert len(set(first)) == 4  # one seeded sampler per process would give a, b, a, b with a == b
    assert draws(f"sqlite:///{tmp_path}/two.db") == first  # reproducible from the seed


def test_opening_a_missing_study_creates_no_store(write_experiments, tmp_path: Path) -> None:
    from pet_sweep.errors import StudyError
    from pet_sweep.sweep.storage import open_study

    exp = load_experiment(write_experiments())
    for url in (exp.storage_url, f"journal:///{tmp_path}/journal/optuna.log"):
        with pytest.raises(StudyError, match="no Optuna storage at .*run `pet-sweep run tiny` first"):
            open_study(exp.with_overrides(storage=url), create=False)
    assert not (tmp_path / "stores").exists() and not (tmp_path / "journal").exists()


def test_opening_a_storage_prints_no_experimental_warning(tmp_path: Path) -> None:
    """Heartbeats and their retry callback are experimental in Optuna; every command that
    opens a study (report, export, list...) would print two warnings without the filter."""
    import warnings

    from pet_sweep.config import FaultsConfig
    from pet_sweep.sweep.storage import StaleTrialHandler, make_storage

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_storage(f"sqlite:///{tmp_path / 'optuna.db'}", FaultsConfig(), StaleTrialHandler(1))
    assert not [w for w in caught if issubclass(w.category, optuna.exceptions.ExperimentalWarning)]
