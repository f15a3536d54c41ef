"""The sweep's side in MLflow: the parent run every trial run hangs under, opened by
whoever starts a sweep (one process, or the supervisor of its workers) and closed by
the last to finish, and the trial runs a dead worker left open."""

from __future__ import annotations

import functools
import time
from typing import Callable

import optuna
from optuna.trial import TrialState

from pet_sweep.config import Experiment
from pet_sweep.sweep.budget import this_process
from pet_sweep.sweep.records import PARENT_OPEN_ATTR, sweep_settings
from pet_sweep.tracking import PARENT_RUN_ATTR, Tracker, redact_url
from pet_sweep.tracking_spool import spool_dir


def tracker_when_needed(exp: Experiment, check: bool = True) -> Callable[[], Tracker]:
    """The experiment's MLflow tracker, opened at the first call and the same one after.

    Opening it creates the tracking store, so a command opens it only once the checks
    that come first (the data, the Optuna storage, the split) have passed; the handler
    of stale trials, built with the storage before that, gets it this way. `check`: see `Tracker`.
    """
    return functools.cache(functools.partial(Tracker, exp.tracking_uri, exp.tracking_experiment,
                                             spool_dir(exp.storage_url, exp.tracking_uri),
                                             exp.config.tracking.max_outage, check))


def open_parent_run(exp: Experiment, study: optuna.Study, tracker: Tracker) -> str:
    """The study's MLflow parent run (the sweep), reused by resumes and every worker.

    Machines opening a new study together agree on one run (`Tracker.sweep_run`).
    The study records who holds it open, so a command can close it if that process is killed.
    """
    parent = tracker.sweep_run(exp.study_name, sweep_settings(exp), study.user_attrs.get(PARENT_RUN_ATTR))
    study.set_user_attr(PARENT_OPEN_ATTR, f"{this_process()}@{time.time():.0f}")
    if study.user_attrs.get(PARENT_RUN_ATTR) != parent:
        study.set_user_attr(PARENT_RUN_ATTR, parent)
        study.set_user_attr("mlflow_experiment_id", tracker.experiment_id)
        study.set_user_attr("mlflow_tracking_uri", redact_url(exp.tracking_uri))
    return parent


def close_parent_run(study: optuna.Study, tracker: Tracker, parent: str, status: str) -> bool:
    """End this invocation's hold on the sweep's parent run: close it, unless trials of
    other machines still run under it (the last machine to finish closes it). True if closed."""
    if any(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False)):
        return False
    tracker.finish_sweep(parent, status)
    study.set_user_attr(PARENT_OPEN_ATTR, "")
    return True


def close_dead_runs(study: optuna.Study, tracker: Tracker) -> int:
    """Close MLflow trial runs left RUNNING whose Optuna trial is no longer running."""
    trials = study.get_trials(deepcopy=False)
    return tracker.close_stale_runs(
        study.study_name, {t.number for t in trials if t.state == TrialState.RUNNING},
        {t.number: t.state.name for t in trials})
