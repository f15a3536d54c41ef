"""Faults a sweep survives: a killed worker, an interrupt, out of memory, NaN loss,
corrupt images, and passwords that must not leak."""

from __future__ import annotations

import os
import re
import signal
import uuid
from pathlib import Path
from typing import Callable

import pytest
from click.testing import CliRunner
from optuna.trial import TrialState

from pet_sweep.cli import cli
from pet_sweep.config import load_experiment
from pet_sweep.sweep.loop import run_sweep
from pet_sweep.sweep.records import STALE_REASON
from pet_sweep.sweep.storage import quiet_optuna
from tests._sweeps import (
    FAST_DATA,
    FAST_FAULTS,
    RANDOM_SPACE,
    assert_nothing_running,
    load,
    mlflow_runs,
    pet_sweep,
    printed_command,
    running_trial_with_epoch,
    trial_runs,
    wait_for,
)

LONG_TRIALS = {**RANDOM_SPACE, "epochs": 3}  # long enough to be stopped after its first epoch


def sweep_parent(exp, name: str):  # noqa: ANN001, ANN201 - test helper
    return next(r for r in mlflow_runs(exp.tracking_uri, exp.tracking_experiment)
                if r.data.tags.get("pet_sweep.role") == "sweep" and r.data.tags.get("pet_sweep.study") == name)


@pytest.mark.slow
def test_sigkill_of_a_worker_mid_trial_fails_and_retries_its_trial(write_experiments: Callable[..., Path]) -> None:
    name = f"k{uuid.uuid4().hex[:8]}"
    config = write_experiments(space=LONG_TRIALS, data=FAST_DATA, faults=FAST_FAULTS, study_name=name)
    exp = load_experiment(config)
    proc = pet_sweep("run", "--config", str(config), "--workers", "2", "--n-trials", "2")
    victim = wait_for(lambda: running_trial_with_epoch(exp.storage_url, name), 1800, "a trial past epoch 0", proc)
    os.kill(int(victim.user_attrs["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
    out, err = proc.communicate(timeout=1800)
    assert proc.returncode == 0, out + err  # the other worker finished the budget
    assert "worker" in err and "SIGKILL" in err
    trials = {t.number: t for t in load(exp.storage_url, name).get_trials()}
    assert trials[victim.number].state == TrialState.FAIL
    retries = [t for t in trials.values() if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE, out + err
    assert retries[0].params == victim.params  # the same configuration, run again
    # no completed trial lost or duplicated: exactly the budget completed
    assert sum(t.state == TrialState.COMPLETE for t in trials.values()) == 2
    assert f"[retry of trial {victim.number}]" in out
    assert f"trial {victim.number:>3} FAIL     {STALE_REASON}; queued to run again" in out
    run = trial_runs(exp.tracking_uri, exp.tracking_experiment, name)[victim.number]
    assert run.info.status == "FAILED" and run.data.tags.get("reason") == STALE_REASON
    assert_nothing_running(exp.storage_url, name, exp.tracking_uri, exp.tracking_experiment)


@pytest.mark.slow
def test_sigint_stops_cleanly_and_the_hint_resumes(write_experiments: Callable[..., Path]) -> None:
    name = f"i{uuid.uuid4().hex[:8]}"
    config = write_experiments(space=LONG_TRIALS, data=FAST_DATA, faults=FAST_FAULTS, study_name=name)
    exp = load_experiment(config)
    proc = pet_sweep("run", "--config", str(config), "--workers", "2", "--n-trials", "2")
    wait_for(lambda: running_trial_with_epoch(exp.storage_url, name), 1800, "a trial past epoch 0", proc)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    out, err = proc.communicate(timeout=1800)
    assert proc.returncode == 130, out + err
    hints = [line for line in err.splitlines() if "resume with:" in line]
    assert len(hints) == 1, err
    assert "KeyboardInterrupt" not in out + err  # Optuna's warning with 90 frames of fastai and torch: gone
    assert not [line for line in out.splitlines() if "failed with value None" in line]
    # Optuna and MLflow agree on every interrupted trial; nothing stays RUNNING
    assert_nothing_running(exp.storage_url, name, exp.tracking_uri, exp.tracking_experiment)
    trials = load(exp.storage_url, name).get_trials()
    runs = trial_runs(exp.tracking_uri, exp.tracking_experiment, name)
    interrupted = [t for t in trials if t.state == TrialState.FAIL]
    assert interrupted and all(t.user_attrs.get("reason") == "interrupted" for t in interrupted)
    assert all(runs[t.number].info.status == "FAILED" for t in interrupted)
    assert sweep_parent(exp, name).info.status == "KILLED"
    finished = sum(t.state == TrialState.COMPLETE for t in trials)

    command = printed_command(hints[0].split("resume with: ", 1)[1])
    assert command[0] == "run" and command[-2:] == ["--n-trials", str(2 - finished)]
    resumed = pet_sweep(*command, cwd=str(config.parent))
    out, err = resumed.communicate(timeout=1800)
    assert resumed.returncode == 0, out + err
    trials = load(exp.storage_url, name).get_trials()
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 2
    assert sweep_parent(exp, name).info.status == "FINISHED"
    assert_nothing_running(exp.storage_url, name, exp.tracking_uri, exp.tracking_experiment)


@pytest.mark.train
def test_nan_loss_prunes_the_trial_with_its_reason(write_experiments: Callable[..., Path]) -> None:
    quiet_optuna()
    space = {**RANDOM_SPACE, "base_lr": 1.0e-3, "lr_hi": 1.0e36, "lr_mult": 1}  # a learning rate that diverges
    exp = load_experiment(write_experiments(space=space, data=FAST_DATA, budget={"n_trials": 1}))
    lines: list[str] = []
    run_sweep(exp, echo=lines.append)
    (trial,) = load(exp.storage_url, exp.study_name).get_trials()
    assert trial.state == TrialState.PRUNED
    assert re.search(r"training loss became (nan|inf)", trial.user_attrs["reason"]), trial.user_attrs
    run = trial_runs(exp.tracking_uri, exp.tracking_experiment, exp.study_name)[0]
    assert run.info.status == "KILLED" and "training loss became" in run.data.tags["reason"]
    assert "reason: training loss became" in "\n".join(lines)


@pytest.mark.train
def test_a_loss_that_blows_up_prunes_the_trial_in_its_first_epoch(write_experiments: Callable[..., Path]) -> None:
    quiet_optuna()
    # 1,000x the digits space's learning rates: the loss reaches ~1e4 and stays finite
    space = {**RANDOM_SPACE, "lr_hi": 10.0, "freeze_epochs": 0, "epochs": 2}
    # batches of 8: enough steps in one epoch for the learning rate to warm up and do its damage
    exp = load_experiment(write_experiments(space=space, data=FAST_DATA, model={"batch_size": 8},
                                            budget={"n_trials": 1}))
    lines: list[str] = []
    run_sweep(exp, echo=lines.append)
    (trial,) = load(exp.storage_url, exp.study_name).get_trials()
    assert trial.state == TrialState.PRUNED
    reason = trial.user_attrs["reason"]
    assert re.match(r"diverged: loss rose from [\d.]+ to [\d.e+]+ by batch \d+ \(epoch 0, unfrozen phase", reason), reason
    assert trial.intermediate_values == {}  # stopped before its first epoch was reported
    run = trial_runs(exp.tracking_uri, exp.tracking_experiment, exp.study_name)[0]
    assert run.info.status == "KILLED" and run.data.tags["reason"] == reason
    assert f"reason: {reason}" in "\n".join(lines)


@pytest.mark.train
def test_out_of_memory_fails_the_trial_and_the_sweep_goes_on(write_experiments: Callable[..., Path]) -> None:
    import torch

    quiet_optuna()
    exp = load_experiment(write_experiments(space=RANDOM_SPACE, data=FAST_DATA, budget={"n_trials": 2},
                                            faults={"oom_retries": 0}))

    def first_trial_runs_out_of_memory(number: int, record: object) -> None:
        if number == 0:  # what a too-deep model or too-large batch raises on a GPU
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    lines: list[str] = []
    run_sweep(exp, echo=lines.append, epoch_listeners=(first_trial_runs_out_of_memory,))
    first, second = load(exp.storage_url, exp.study_name).get_trials()
    assert first.state == TrialState.FAIL and first.user_attrs["reason"].startswith("out of memory")
    assert second.state == TrialState.COMPLETE
    runs = trial_runs(exp.tracking_uri, exp.tracking_experiment, exp.study_name)
    assert runs[0].info.status == "FAILED" and runs[0].data.tags["reason"].startswith("out of memory")
    assert runs[1].info.status == "FINISHED"
    assert "reason: out of memory" in "\n".join(lines)


@pytest.mark.train
def test_out_of_memory_is_retried_once_at_half_the_batch_size(write_experiments: Callable[..., Path],
                                                               monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import torch
    import yaml

    from pet_sweep.exported import export_config
    from pet_sweep.report.read import load_report
    from pet_sweep.report.render import ranked, summary_text
    from pet_sweep.train import recipe

    quiet_optuna()
    real_fine_tune, seen = recipe.fine_tune, []
    fits = {"limit": 16}

    def fine_tune_on_a_small_gpu(dls, params, model, **kwargs):  # noqa: ANN001, ANN202 - test double
        seen.append(dls.train.bs)
        if dls.train.bs > fits["limit"]:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_fine_tune(dls, params, model, **kwargs)

    monkeypatch.setattr(recipe, "fine_tune", fine_tune_on_a_small_gpu)
    exp = load_experiment(write_experiments(space=RANDOM_SPACE, data=FAST_DATA, budget={"n_trials": 1}))
    assert exp.config.model.batch_size == 32 and exp.config.faults.oom_retries == 1
    lines: list[str] = []
    run_sweep(exp, echo=lines.append)
    failed, retry = load(exp.storage_url, exp.study_name).get_trials()  # the retry used no second slot
    assert seen == [32, 16]
    assert failed.state == TrialState.FAIL and failed.user_attrs["reason"].endswith("; re-queued at batch_size 16")
    assert retry.state == TrialState.COMPLETE and retry.params == failed.params
    assert retry.user_attrs["batch_size"] == 16 and retry.user_attrs["oom_retry_of"] == 0
    assert "[batch_size 16: trial 0 ran out of memory]" in "\n".join(lines)
    run = trial_runs(exp.tracking_uri, exp.tracking_experiment, exp.study_name)[1]
    assert run.data.params["batch_size"] == "16" and run.data.params["oom_retry_of"] == "0"
    artifact = run.info.artifact_uri.removeprefix("file://") + "/trial_config.yaml"
    assert yaml.safe_load(Path(artifact).read_text())["model"]["batch_size"] == 16
    doc, number = export_config(exp)
    assert number == 1 and doc["model"]["batch_size"] == 16  # the winner replays at the size it ran
    report = load_report(exp).report  # the report shows which trial ran at which batch size
    assert ranked(report).set_index("number")["batch_size"].to_dict() == {0: 32, 1: 16}
    assert "batch_size=16" in summary_text(report).splitlines()[1]

    # once halved, a second out-of-memory fails for good (faults.oom_retries: 1)
    fits["limit"], seen[:] = 8, []
    again = exp.with_overrides(study_name="still-too-big")
    run_sweep(again, echo=lines.append)
    first, second = load(again.storage_url, again.study_name).get_trials()
    assert seen == [32, 16] and first.state == second.state == TrialState.FAIL
    assert second.user_attrs["reason"].endswith("(not re-queued: halved 1 time(s) already, faults.oom_retries is 1)")


def _image_folder(root: Path, corrupt: int) -> Path:
    from PIL import Image

    for label in ("cats", "dogs"):
        (root / label).mkdir(parents=True)
        for i in range(12):
            Image.new("L", (16, 16), color=40 * i if label == "cats" else 255 - 9 * i).save(root / label / f"{i}.png")
    for i in range(corrupt):
        (root / "dogs" / f"broken_{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    return root


@pytest.mark.parametrize("workers", ["1", "2"])
def test_corrupt_images_are_refused_before_anything_starts(write_experiments: Callable[..., Path],
                                                            tmp_path: Path, workers: str) -> None:
    folder = _image_folder(tmp_path / "images", corrupt=2)
    config = write_experiments(data={"source": "folder", "path": str(folder), "label": "parent", "limit": None,
                                     "bad_images": "refuse"})
    result = CliRunner().invoke(cli, ["run", "--config", str(config), "--workers", workers])
    assert result.exit_code == 2, result.output
    assert "2 unreadable image(s), first: " in result.output and "broken_0.png" in result.output
    assert not (tmp_path / "stores" / "optuna.db").exists()  # no study was created


def test_corrupt_images_are_skipped_when_the_experiment_says_so(write_experiments: Callable[..., Path],
                                                                tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from pet_sweep.train.data import build_data

    folder = _image_folder(tmp_path / "images", corrupt=1)
    exp = load_experiment(write_experiments(data={"source": "folder", "path": str(folder), "label": "parent",
                                                  "limit": None, "valid_pct": 0.25, "test_pct": 0.0,
                                                  "bad_images": "skip"}, model={"batch_size": 8}))
    bundle = build_data(exp)
    assert len(bundle.splits.train) + len(bundle.splits.valid) == 24
    assert "skipping 1 unreadable image(s), first: " in capsys.readouterr().out


def test_passwords_never_appear_in_errors_or_hints(write_experiments: Callable[..., Path]) -> None:
    config = write_experiments(data=FAST_DATA)
    url = "postgresql://sweeper:s3cret@127.0.0.1:9/nowhere"  # nothing listens on port 9
    result = CliRunner().invoke(cli, ["run", "--config", str(config), "--storage", url])
    assert result.exit_code == 2
    assert "sweeper:***@127.0.0.1:9" in result.output and "s3cret" not in result.output


@pytest.mark.slow
def test_when_every_worker_dies_their_trial_is_failed_and_queued_again(write_experiments: Callable[..., Path]) -> None:
    import psutil

    name = f"o{uuid.uuid4().hex[:8]}"
    config = write_experiments(space=LONG_TRIALS, data=FAST_DATA, study_name=name)  # default 120 s grace period
    exp = load_experiment(config)
    proc = pet_sweep("run", "--config", str(config), "--workers", "2", "--n-trials", "1")
    victim = wait_for(lambda: running_trial_with_epoch(exp.storage_url, name), 1800, "a trial past epoch 0", proc)
    for worker in psutil.Process(proc.pid).children():
        worker.kill()
    out, err = proc.communicate(timeout=1800)
    assert proc.returncode == 1 and "resume with:" in err, out + err
    trials = load(exp.storage_url, name).get_trials()
    assert trials[victim.number].state == TrialState.FAIL
    assert [t.system_attrs.get("failed_trial") for t in trials if t.state == TrialState.WAITING] == [victim.number]
    run = trial_runs(exp.tracking_uri, exp.tracking_experiment, name)[victim.number]
    assert run.info.status == "FAILED" and run.data.tags.get("reason") == STALE_REASON
