"""Resume instead of restart: a worker killed (kill -9) or preempted (SIGTERM) at epoch 2 of 4
leaves a checkpoint, and the retry runs only epochs 2-3, as the uninterrupted run did.

Tolerance: none. On a CPU with one thread the resumed trial's losses, error rate and learning
rates are bit-for-bit those of the uninterrupted run with the same seed (the checkpoint holds
every RNG state), so the tests compare with ==.
"""

from __future__ import annotations

import signal
import subprocess
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest
from optuna.trial import FrozenTrial, TrialState

from pet_sweep.config import load_experiment
from pet_sweep.sweep.resume import CHECKPOINT_EPOCHS_ATTR, EPOCH_LRS_ATTR, RESUMED_ATTR, RESUMED_TAG, checkpoint_path
from tests._sweeps import FAST_FAULTS, load, pet_sweep, trial_runs, wait_for
from tests.conftest import trains
from tests.test_databases import server_url

# 1 frozen + 3 unfrozen epochs; fixed parameters, so every study trains the same trial
FOUR_EPOCHS = {"arch": "resnet18", "base_lr": 1.0e-2, "lr_hi": 1.0e-2, "lr_mult": 10, "freeze_epochs": 1, "epochs": 3}
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # the same float sums in every process
ONE_TRIAL = {"n_trials": 1, "max_trials": 1}  # the resume runs the retry, then stops
FAULTS = {**FAST_FAULTS, "checkpoint_min_seconds": 0, "checkpoint_max_share": 1}  # after every epoch, however short


def _config(write_experiments: Callable[..., Path], name: str, storage: str | None = None) -> Path:
    extra = {"storage": storage} if storage else {}
    return write_experiments(space=FOUR_EPOCHS, faults=FAULTS, budget=ONE_TRIAL, study_name=name, **extra)


def _run(config: Path, *args: str) -> subprocess.Popen:
    return pet_sweep("run", "--config", str(config), *args, env=ONE_THREAD)


def _checkpointed(storage: str, name: str, epochs: int) -> FrozenTrial | None:
    """The RUNNING trial once its checkpoint holds `epochs` epochs."""
    import sqlalchemy.exc

    try:
        running = load(storage, name).get_trials(states=(TrialState.RUNNING,))
    except (KeyError, sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError):
        return None
    return next((t for t in running if t.user_attrs.get(CHECKPOINT_EPOCHS_ATTR, 0) >= epochs), None)


@pytest.fixture(scope="module")
@trains
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> FrozenTrial:
    """The same trial, run to its end without a stop."""
    from tests.conftest import write_experiments_file

    folder = tmp_path_factory.mktemp("uninterrupted")
    proc = _run(write_experiments_file(folder, FOUR_EPOCHS, faults=FAULTS, budget=ONE_TRIAL))
    out, err = proc.communicate(timeout=1800)
    assert proc.returncode == 0, out + err
    trial, = load(load_experiment(folder / "experiments.yaml").storage_url, "tiny").get_trials()
    assert trial.state == TrialState.COMPLETE and len(trial.user_attrs[EPOCH_LRS_ATTR]) == 4
    return trial


def _stop_at_epoch_2_and_resume(config: Path, name: str, stop: Callable[[subprocess.Popen], Any],
                                uninterrupted: FrozenTrial) -> tuple[FrozenTrial, FrozenTrial, str]:
    """Stop the sweep once its trial has checkpointed 2 epochs, run it again; (victim, retry, output)."""
    exp = load_experiment(config)
    proc = _run(config)
    wait_for(lambda: _checkpointed(exp.storage_url, name, 2), 1800, "a trial checkpointed after 2 epochs", proc)
    stop(proc)
    proc.communicate(timeout=600)
    victim = load(exp.storage_url, name).get_trials()[0]  # (after SIGTERM its retry is queued already)
    assert victim.user_attrs[CHECKPOINT_EPOCHS_ATTR] == 2  # stopped during epoch 2 (0-based), before its checkpoint
    assert checkpoint_path(exp, victim.number).is_file()
    resumed = _run(config)  # the resume command: it waits out the grace period of a killed worker's trial
    out, err = resumed.communicate(timeout=1800)
    assert resumed.returncode == 0, out + err
    trials = load(exp.storage_url, name).get_trials()
    victim = trials[victim.number]
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == victim.number)
    assert retry.state == TrialState.COMPLETE, out + err
    assert retry.user_attrs[RESUMED_ATTR] == {"trial": victim.number, "epoch": 1}
    history, before = retry.user_attrs["history"], victim.user_attrs["history"]
    assert [r["epoch"] for r in history] == [0, 1, 2, 3]  # the numbering goes on
    # epochs 0-1 are the dead trial's own records (their timings too: not trained again) ...
    assert history[:2] == before[:2]
    # ... and epochs 2-3 ran at the uninterrupted run's learning rates, to its very error
    lrs = retry.user_attrs[EPOCH_LRS_ATTR]
    assert len(lrs) == 4 and lrs == uninterrupted.user_attrs[EPOCH_LRS_ATTR]
    assert retry.value == uninterrupted.value
    assert [r["train_loss"] for r in history] == [r["train_loss"] for r in uninterrupted.user_attrs["history"]]
    assert sorted(retry.intermediate_values) == [0, 1, 2, 3]  # Optuna sees each epoch once
    run = trial_runs(exp.tracking_uri, exp.tracking_experiment, name)[retry.number]
    assert run.data.tags[RESUMED_TAG] == f"trial {victim.number} at epoch 1"
    # both trials ended for good: no checkpoint is left
    assert not list(checkpoint_path(exp, 0).parent.glob("*.pt"))
    return victim, retry, out


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.train
def test_a_worker_killed_at_epoch_2_of_4_is_resumed_there_on_sqlite(
        write_experiments: Callable[..., Path], uninterrupted: FrozenTrial) -> None:
    name = f"k{uuid.uuid4().hex[:8]}"
    victim, retry, _ = _stop_at_epoch_2_and_resume(_config(write_experiments, name), name, _kill, uninterrupted)
    assert victim.state == TrialState.FAIL


@pytest.mark.slow
@pytest.mark.train
@pytest.mark.postgres
def test_a_worker_killed_at_epoch_2_of_4_is_resumed_there_on_postgresql(
        write_experiments: Callable[..., Path], uninterrupted: FrozenTrial) -> None:
    name = f"k{uuid.uuid4().hex[:8]}"
    config = _config(write_experiments, name, server_url("postgres"))
    _stop_at_epoch_2_and_resume(config, name, _kill, uninterrupted)


@pytest.mark.slow
@pytest.mark.train
def test_sigterm_leaves_the_trial_to_resume_from_its_checkpoint(
        write_experiments: Callable[..., Path], uninterrupted: FrozenTrial) -> None:
    name = f"t{uuid.uuid4().hex[:8]}"
    codes: list[int] = []

    def terminate(proc: subprocess.Popen) -> None:
        proc.send_signal(signal.SIGTERM)
        codes.append(proc.wait(timeout=600))

    config = _config(write_experiments, name)
    exp = load_experiment(config)
    victim, retry, _ = _stop_at_epoch_2_and_resume(config, name, terminate, uninterrupted)
    assert codes == [130]
    assert victim.state == TrialState.FAIL
    assert victim.user_attrs["reason"] == "preempted (SIGTERM), resumable from its checkpoint after epoch 1"
    run = trial_runs(exp.tracking_uri, exp.tracking_experiment, name)[victim.number]
    assert run.info.status == "FAILED" and run.data.tags["reason"] == victim.user_attrs["reason"]
