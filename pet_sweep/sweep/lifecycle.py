"""What a killed process leaves behind, and how the next command cleans it: trials
left RUNNING, the MLflow parent run left open, stale lock files."""

from __future__ import annotations

import socket
import time
from typing import Any, Callable, Iterable

import optuna
from optuna.trial import FrozenTrial, TrialState

from pet_sweep.config import Experiment
from pet_sweep.errors import PetSweepError, StudyError
from pet_sweep.sweep.budget import _numbers, clean_stale_locks, process_gone
from pet_sweep.sweep.parent import close_dead_runs, tracker_when_needed
from pet_sweep.sweep.records import (
    PARENT_OPEN_ATTR,
    STALE_REASON,
    WORKER_ATTR,
    fail_stale_trials,
    retried_trial_number,
)
from pet_sweep.sweep.storage import StaleTrialHandler, missing_store_file, open_study
from pet_sweep.tracking import PARENT_RUN_ATTR, Tracker


def owner_of(pid: int) -> str:
    """The "host:pid" a process of this machine writes as a trial's worker (`budget.this_process`)."""
    return f"{socket.gethostname()}:{pid}"


def fail_orphans(study: optuna.Study, tracker: Tracker, max_retry: int, pids: list[int]) -> list[int]:
    """Fail the trials our dead workers left RUNNING, queue their retry, close their MLflow runs.

    Every worker has exited, so none of their trials can still be running; waiting
    for the grace period would only leave them RUNNING for the next `pet-sweep run`.
    """
    ours = {owner_of(pid) for pid in pids}
    # no echo: the supervisor says which trials it queued again
    handler = StaleTrialHandler(max_retry, tracker=lambda: tracker)
    return [trial.number for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if trial.user_attrs.get(WORKER_ATTR) in ours and fail_and_retry(study, trial.number, handler)]


def fail_and_retry(study: optuna.Study, number: int, handler: StaleTrialHandler) -> bool:
    """Fail the RUNNING trial `number` whose worker is gone; `handler` queues its retry
    and closes its MLflow run. False if it finished meanwhile, or another process failed
    and retried it first."""
    frozen = study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
    retried = any(retried_trial_number(t) == number for t in study.get_trials(deepcopy=False))
    if frozen.state != TrialState.FAIL or retried:
        return False
    handler(study, frozen)
    return True


def optuna_stale_trial_ids(storage: Any, study_id: int) -> list[int]:
    """The ids of the study's RUNNING trials whose heartbeat is stale, by Optuna's own test.

    A private use, wrapped here alone: `BaseHeartbeat._get_stale_trial_ids` is what Optuna's
    `fail_stale_trials` calls, and Optuna has no public way to list stale trials without
    failing them. tests/test_lifecycle.py pins it; an Optuna without it fails clearly here.
    """
    private = getattr(storage, "_get_stale_trial_ids", None)
    if private is None:
        raise RuntimeError(f"this Optuna ({optuna.__version__}) has no {type(storage).__name__}._get_stale_trial_ids, "
                           "which pet-sweep uses to find trials with a stale heartbeat; install optuna 5.x")
    return list(private(study_id))


def stale_trial_numbers(study: optuna.Study) -> set[int] | None:
    """The RUNNING trials whose heartbeat is older than the grace period (None: no heartbeats here)."""
    storage = study._storage  # Optuna has no public way to reach a study's storage
    if getattr(storage, "get_heartbeat_interval", lambda: None)() is None:  # journal: no heartbeats
        return None
    ids = set(optuna_stale_trial_ids(storage, study._study_id))
    return {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if t._trial_id in ids}


def live_trials(study: optuna.Study) -> list[int]:
    """RUNNING trials that may still have a worker: a fresh (or no) heartbeat; any, without heartbeats."""
    stale = stale_trial_numbers(study) or set()
    return [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if t.number not in stale]


def abandoned_parent(study: optuna.Study, grace_period: float) -> str | None:
    """Why the study's MLflow parent run, held open, has nobody left to close it (None: it may be in use)."""
    opener = study.user_attrs.get(PARENT_OPEN_ATTR)
    if not opener or live_trials(study):
        return None
    owner, _, since = opener.rpartition("@")
    gone = process_gone(owner)
    if gone is None:  # opened on another machine: closed once the study has been quiet for a grace period
        ends = [t.datetime_complete.timestamp() for t in study.get_trials(deepcopy=False) if t.datetime_complete]
        quiet = time.time() - max([float(since or 0), *ends])
        return f"no live trial for {quiet:.0f}s" if quiet > grace_period else None
    return f"its process {owner} is gone and no trial is live" if gone else None


def clean_leftovers(exps: Iterable[Experiment]) -> str:
    """Undo what a killed `pet-sweep run` (supervisor or single process) left behind.

    Removes the lock files of processes gone from this host, and closes (KILLED) the MLflow
    parent run of each experiment's study whose opener is gone and which has no live
    trial, with the trial runs left RUNNING. Creates nothing. Returns one line saying
    what was cleaned, "" when nothing was.
    """
    done = [f"lock file of {owner} (gone)" for owner in clean_stale_locks()]
    for exp in exps:
        if missing_store_file(exp.storage_url) is not None:
            continue
        try:
            study = open_study(exp, create=False)
        except PetSweepError:  # no study yet, or a store that cannot be read: nothing of ours to close
            continue
        why, parent = abandoned_parent(study, exp.config.faults.grace_period), study.user_attrs.get(PARENT_RUN_ATTR)
        if why is None or not parent:
            continue
        from mlflow.exceptions import MlflowException  # heavy: mlflow

        try:
            tracker = Tracker(exp.tracking_uri, exp.tracking_experiment)
            tracker.finish_sweep(parent, "KILLED")
            closed = close_dead_runs(study, tracker)
        except (MlflowException, PetSweepError):  # the run lives in another tracking store
            continue
        study.set_user_attr(PARENT_OPEN_ATTR, "")
        done.append(f"MLflow parent run of study {exp.study_name!r} closed ({why})"
                    + (f" with {closed} trial run(s) left running" if closed else ""))
    return "cleaned      " + "; ".join(done) if done else ""


def fail_stale(exp: Experiment, number: int | None, confirm: Callable[[str], bool],
               echo: Callable[[str], None]) -> list[int]:
    """Fail RUNNING trials whose worker is gone, queue their retries, close their MLflow runs.

    Without `number`: Optuna's `fail_stale_trials` (trials silent for faults.grace_period;
    needs heartbeats). With `number`: that trial, once `confirm` agrees (nothing
    tells whether its worker on another machine is gone). Returns the trials failed.
    """
    reason = STALE_REASON if number is None else f"failed by `pet-sweep fail-stale --trial {number}`: its worker is gone"
    tracker = tracker_when_needed(exp)
    handler = StaleTrialHandler(exp.config.faults.max_retry, reason, tracker=tracker, echo=echo)
    study = open_study(exp, create=False, on_stale=handler)
    tracker()  # MLflow opened before anything is failed: a tracking store it cannot use stops it here
    if number is None:
        failed = _fail_silent_trials(exp, study, echo)
    else:
        failed = _fail_trial(exp, study, number, handler, confirm)
    for run_id in handler.closed_runs:
        echo(f"closed       MLflow run {run_id} (FAILED)")
    return failed


def _running(study: optuna.Study) -> dict[int, FrozenTrial]:
    return {t.number: t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}


def _fail_silent_trials(exp: Experiment, study: optuna.Study, echo: Callable[[str], None]) -> list[int]:
    """`fail-stale` without --trial: the trials silent for faults.grace_period, failed by Optuna
    (the study's StaleTrialHandler queues their retries and closes their runs)."""
    stale, running = stale_trial_numbers(study), _running(study)
    if stale is None:
        raise StudyError(f"{exp.storage_url.split(':', 1)[0]} storage has no heartbeats, so no trial is known "
                         f"stale; name the trial whose worker is gone: --trial N (running: "
                         f"{_numbers(sorted(running)) or 'none'})")
    fail_stale_trials(study)  # calls the study's StaleTrialHandler for each trial it failed
    now = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    failed = sorted(n for n in stale if now[n] == TrialState.FAIL)
    alive = sorted(set(running) - set(failed))
    if alive:
        echo(f"running      trial(s) {_numbers(alive)} sent a heartbeat within faults.grace_period "
             f"({exp.config.faults.grace_period}s) or never sent one; name one with --trial N to fail it anyway")
    return failed


def _fail_trial(exp: Experiment, study: optuna.Study, number: int, handler: StaleTrialHandler,
                confirm: Callable[[str], bool]) -> list[int]:
    """`fail-stale --trial N`: that RUNNING trial, unless its worker still runs here or `confirm` says no."""
    stale, trial = stale_trial_numbers(study), _running(study).get(number)
    if trial is None:
        states = {t.number: t.state.name for t in study.get_trials(deepcopy=False)}
        raise StudyError(f"trial {number} of study {exp.study_name!r} is "
                         f"{states.get(number, 'not in the study')}, not RUNNING: nothing to fail")
    worker = trial.user_attrs.get(WORKER_ATTR, "unknown")
    if process_gone(worker) is False:
        raise StudyError(f"trial {number}'s worker {worker} still runs on this machine; stop it "
                         "(Ctrl-C) instead of failing its trial")
    fresh = stale is not None and number not in stale
    if not confirm(f"fail trial {number} of study {exp.study_name!r} (worker {worker}, started "
                   f"{trial.datetime_start:%Y-%m-%d %H:%M:%S})"
                   + (f"; it sent a heartbeat within {exp.config.faults.grace_period}s or never sent one"
                      if fresh else "")
                   + "? Only if its worker is gone"):
        return []
    return [number] if fail_and_retry(study, number, handler) else []
