"""Optuna studies: storage, sampler, pruner, the objective, and the sweep loop.

Data flow of one sweep process: open the study (created or resumed by name) ->
open the MLflow parent run -> build the DataLoaders once -> for each trial:
`space.suggest` -> child MLflow run -> `recipe.fine_tune` with the epoch
listeners (MLflow, Optuna pruning) -> result back to Optuna.
"""

from __future__ import annotations

import functools
import gc
import time
from typing import Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from pet_sweep.config import JOURNAL_PREFIX, Experiment
from pet_sweep.errors import TrialFailed
from pet_sweep.sweep.budget import Budget, Claim, WorkerRole, this_process
from pet_sweep.sweep.objective import Objective, TrialListener
from pet_sweep.sweep.records import (
    INVOCATION_ATTR,
    PARENT_OPEN_ATTR,
    WORKER_ATTR,
    EpochRecord,
    StoppedBy,
    SweepResult,
    TrialOutcome,
    describe_trial,
    format_trial,
    sweep_settings,
)
from pet_sweep.sweep.storage import StaleTrialHandler, check_split, open_study
from pet_sweep.tracking import PARENT_RUN_ATTR, Tracker, check_server, redact_url
from pet_sweep.train.pretrain import checkpoints_for


def best_of(study: optuna.Study) -> tuple[float, int] | None:
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    if not done:
        return None
    top = min(done, key=lambda t: t.value)
    return float(top.value), top.number


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


def run_sweep(exp: Experiment, *, echo: Callable[[str], None] = print,
              epoch_listeners: tuple[Callable[[int, EpochRecord], None], ...] = (),
              trial_listeners: tuple[TrialListener, ...] = (),
              role: WorkerRole | None = None) -> SweepResult:
    """Run (or resume) the experiment's study in this process: `budget.n_trials` more trials.

    With a `role` from a supervisor (`pet-sweep run --workers N`) this process is one
    of N workers sharing that budget, and the supervisor owns the MLflow parent run.
    """
    from optuna.storages import fail_stale_trials

    from pet_sweep.train import lrfind
    from pet_sweep.train.data import build_data

    role = role or WorkerRole()
    if role.threads:
        import torch

        torch.set_num_threads(role.threads)
    check_server(exp.tracking_uri)  # an MLflow server that is down: said in seconds, before the data
    data = build_data(exp)  # before any store: a missing data folder must not leave a study or run behind
    stale = StaleTrialHandler(exp.config.faults.max_retry)
    study = open_study(exp, on_stale=stale)  # a bad storage URL: before the MLflow store
    check_split(study, exp, data.fingerprint, echo)  # another split: refused before any run is opened
    tracker = Tracker(exp.tracking_uri, exp.tracking_experiment)
    stale.tracker, stale.echo = tracker, echo
    owns_parent = role.parent_run_id is None
    if owns_parent:
        from pet_sweep.sweep.lifecycle import clean_leftovers

        cleaned = clean_leftovers([exp])
        if cleaned:
            echo(cleaned)
    parent = open_parent_run(exp, study, tracker) if owns_parent else role.parent_run_id
    seen: list[TrialOutcome] = []
    stopped_by: StoppedBy = "budget"
    budget_cfg, faults = exp.config.budget, exp.config.faults
    budget = Budget(role, budget_cfg.n_trials, budget_cfg.max_trials,
                    heartbeats=not exp.storage_url.startswith(JOURNAL_PREFIX))  # make_storage: RDB has them

    def after_trial(study: optuna.Study, trial: FrozenTrial) -> None:
        done = describe_trial(trial)
        seen.append(done)
        best = best_of(study)
        echo(format_trial(done, best))
        for listener in trial_listeners:
            listener.trial_finished(done, best)
        counts = {s.name.lower(): 0 for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
        for t in study.get_trials(deepcopy=False):
            if t.state.name.lower() in counts:
                counts[t.state.name.lower()] += 1
        metrics = {f"n_{k}": float(v) for k, v in counts.items()}
        tags = {}
        if best:
            metrics.update(best_error_rate=best[0], best_trial=float(best[1]))
            tags["best_trial"] = str(best[1])
        tracker.update_sweep(parent, metrics, tags)

    objective = Objective(exp, data, tracker, parent, epoch_listeners, trial_listeners)
    started = time.monotonic()
    status = "FAILED"
    if owns_parent:
        role.own_lock()  # removed in `finally`; left behind only by a kill -9 (clean_leftovers)
    try:
        # anchored spaces: the LR finder once per (arch, phase) for the study, before any trial.
        # Under the claim lock, so of the workers starting together on one machine the first
        # runs it and stores it in the study, and the others read it back when it is their turn.
        with budget.claim():
            objective.checkpoints = checkpoints_for(exp, echo=echo)  # a missing one is pretrained first
            objective.anchors = lrfind.study_anchors(study, exp, data, tracker=tracker, parent_run_id=parent,
                                                     echo=echo, checkpoints=objective.checkpoints)
        freeze_long_lived_objects()
        waiting = False
        while budget_cfg.timeout is None or time.monotonic() - started < budget_cfg.timeout:
            with budget.claim() as claim:
                step = budget.next_step(study)
                if step == "stop":
                    stopped_by = "cap" if budget.capped else "budget"
                    break
                waiting, was_waiting = step == "wait", waiting
                if step == "run":
                    objective.on_start = functools.partial(_take_slot, role=role, claim=claim)
                    # no gc_after_trial: recipe.release already collects once per trial (a full
                    # collection costs ~0.4 s with fastai loaded)
                    study.optimize(objective, n_trials=1, callbacks=[after_trial], catch=(TrialFailed,))
                    continue
            # "wait": another worker's trial is running; if that worker died, its trial
            # turns stale after the grace period and is failed and retried here.
            if not was_waiting:
                echo(f"waiting      {budget.waiting_on}: staying to run the retry of any whose worker "
                     f"dies (no heartbeat for {faults.grace_period}s)")
            time.sleep(min(faults.heartbeat_interval, 5))
            fail_stale_trials(study)
        else:
            # the loop's condition ended it (no break); it cut the run short only with slots left
            if budget.used(study.get_trials(deepcopy=False)) < budget_cfg.n_trials:
                stopped_by = "timeout"
        status = "FINISHED"
    except KeyboardInterrupt:
        status, stopped_by = "KILLED", "interrupt"
    finally:
        gc.unfreeze()  # a library caller's later collections see everything again
        if owns_parent:
            close_dead_runs(study, tracker)
            close_parent_run(study, tracker, parent, status)
            role.lock_path.unlink(missing_ok=True)
    trials = study.get_trials(deepcopy=False)
    return SweepResult(exp.study_name, parent, ran=budget.used(trials), finished=budget.finished(trials),
                       best=best_of(study), stopped_by=stopped_by, left=budget.left(trials), trials=seen)


def freeze_long_lived_objects() -> None:
    """Move everything alive now (modules, stores, DataLoaders, cached images) out of
    the garbage collector's sight.

    `recipe.release` runs a full collection after every trial so a finished
    learner's reference cycles free their memory at once. With torch, fastai, MLflow
    and SQLAlchemy loaded that is some 600,000 objects and about 0.3 s a trial; after
    `gc.freeze()` a collection scans only what the trial itself created.
    """
    gc.collect()
    gc.freeze()


def _take_slot(trial: optuna.Trial, *, role: WorkerRole, claim: Claim) -> None:
    """The trial exists (RUNNING): mark it as this invocation's, then let the next worker claim.

    A retry of a dead worker's trial carries the original's user attrs, so it
    already has an invocation and takes no new slot.
    """
    if INVOCATION_ATTR not in trial.user_attrs:
        trial.set_user_attr(INVOCATION_ATTR, role.invocation)
    trial.set_user_attr(WORKER_ATTR, this_process())
    claim.release()


