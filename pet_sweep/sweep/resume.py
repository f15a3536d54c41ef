"""Resume instead of restart: a trial's epoch checkpoints in the study's folder, the retry of a
dead or preempted trial going on from the last one, and SIGTERM leaving a trial to resume.

A retry (Optuna's `RetryHeartbeatStaleTrialCallback`, queued by a heartbeat, `fail-stale`,
the supervisor or a preemption) is a new trial with the same parameters; its retry history
names the attempts before it, and the newest of their checkpoints is where it goes on.
Each trial keeps only its latest checkpoint; it is deleted once the trial ends for good
(complete, pruned or failed), with those of the attempts it went on from.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import optuna
from optuna.trial import TrialState

from pet_sweep.config import JOURNAL_PREFIX, Experiment
from pet_sweep.sweep.lifecycle import fail_and_retry
from pet_sweep.sweep.records import EpochRecord, retry_history
from pet_sweep.sweep.storage import StaleTrialHandler
from pet_sweep.tracking import sqlite_path

if TYPE_CHECKING:  # heavy: torch, fastai
    from pet_sweep.train.checkpoint import CheckpointPlan, ResumePoint

# Trial user attributes.
RESUMED_ATTR = "resumed_from"             # {"trial": T, "epoch": E}: went on from T's checkpoint after E epochs
CHECKPOINT_EPOCHS_ATTR = "checkpoint_epochs"   # epochs in the trial's latest checkpoint
CHECKPOINT_SECONDS_ATTR = "checkpoint_seconds"  # seconds its checkpoint saves took, in all (bench.overhead)
EPOCH_LRS_ATTR = "epoch_lrs"              # per epoch: the last parameter group's lr at its first and last batch
RESUMED_TAG = "pet_sweep.resumed_from"    # the MLflow run's tag: "trial T at epoch E"


def preempted_reason(epochs: int | None) -> str:
    """The reason of a trial SIGTERM stopped."""
    where = f"from its checkpoint after epoch {epochs - 1}" if epochs else "from the start (no checkpoint yet)"
    return f"preempted (SIGTERM), resumable {where}"


def checkpoint_dir(exp: Experiment) -> Path:
    """The folder of the experiment's epoch checkpoints: `checkpoints:` (relative to the experiments
    file), or `checkpoints/` beside the sqlite or journal storage file (beside the experiments file
    for a database server)."""
    if exp.config.checkpoints:
        return (exp.base_dir / Path(exp.config.checkpoints.removeprefix("file://")).expanduser()).resolve()
    url = exp.storage_url
    store = Path(url[len(JOURNAL_PREFIX):]) if url.startswith(JOURNAL_PREFIX) else sqlite_path(url)
    return (store.parent if store is not None else exp.base_dir) / "checkpoints"


def checkpoint_path(exp: Experiment, number: int) -> Path:
    """Trial `number`'s checkpoint file: one per trial, in a folder per study."""
    study = re.sub(r"[^A-Za-z0-9._-]", "_", exp.study_name)
    return checkpoint_dir(exp) / study / f"trial-{number}.pt"


def resume_point(exp: Experiment, trial: optuna.Trial, freeze_epochs: int) -> ResumePoint | None:
    """The newest checkpoint of the attempts `trial` retries (None: not a retry, or none saved one)."""
    from pet_sweep.train import checkpoint  # heavy: torch

    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    for number in reversed(retry_history(frozen)):
        point = checkpoint.load(checkpoint_path(exp, number), freeze_epochs)
        if point is not None:
            return point
    return None


def plan(exp: Experiment, trial: optuna.Trial, freeze_epochs: int) -> CheckpointPlan:
    """What the trial saves (as `faults.checkpoint_every` says) and where it goes on from."""
    from pet_sweep.train.checkpoint import CheckpointPlan  # heavy: torch, fastai

    faults = exp.config.faults
    spent = [0.0]

    def saved(epochs: int, seconds: float) -> None:
        spent[0] += seconds
        trial.set_user_attr(CHECKPOINT_EPOCHS_ATTR, epochs)
        trial.set_user_attr(CHECKPOINT_SECONDS_ATTR, spent[0])

    return CheckpointPlan(checkpoint_path(exp, trial.number) if faults.checkpoint_every else None,
                          trial=trial.number, every=faults.checkpoint_every, min_seconds=faults.checkpoint_min_seconds,
                          max_share=faults.checkpoint_max_share,
                          resume=resume_point(exp, trial, freeze_epochs), on_saved=saved,
                          on_epoch=lambda lrs: trial.set_user_attr(EPOCH_LRS_ATTR, lrs))


def note_resumed(trial: optuna.Trial, point: ResumePoint, report: Callable[[EpochRecord], None],
                 tag: Callable[[str], None]) -> None:
    """The retry goes on from `point`: say so on the trial and its run, and hand the epochs it
    already has to `report` (its history, its MLflow curve, Optuna's intermediate values)."""
    trial.set_user_attr(RESUMED_ATTR, {"trial": point.trial, "epoch": point.epochs - 1})
    tag(f"trial {point.trial} at epoch {point.epochs - 1}")
    for record in point.history:
        report(record)


def discard(exp: Experiment, plan: CheckpointPlan) -> None:
    """The trial ended for good: its checkpoint and those it went on from are not needed again."""
    if plan.path is not None:
        plan.path.unlink(missing_ok=True)
    if plan.resume is not None:
        checkpoint_path(exp, plan.resume.trial).unlink(missing_ok=True)


def queue_preempted(study: optuna.Study, numbers: list[int], exp: Experiment, tracker: Callable,
                    echo: Callable[[str], None]) -> list[int]:
    """Queue the retry of each trial SIGTERM stopped (Optuna has failed them): it resumes from
    its checkpoint, in this study's next run or in any worker still running it."""
    queued = []
    for number in numbers:
        trial = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
        if trial.state not in (TrialState.FAIL, TrialState.RUNNING):
            continue
        reason = preempted_reason(trial.user_attrs.get(CHECKPOINT_EPOCHS_ATTR))
        handler = StaleTrialHandler(exp.config.faults.max_retry, reason, tracker=tracker, echo=echo)
        if fail_and_retry(study, number, handler):
            queued.append(number)
    return queued
