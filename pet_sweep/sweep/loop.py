"""One worker's sweep: open the study and MLflow, then run one trial after another
until the budget, the study's cap or the time limit ends it.

Data flow of one sweep process: open the study (created or resumed by name) ->
open the MLflow parent run -> build the DataLoaders once -> for each trial:
claim a budget slot -> `space.suggest` -> child MLflow run -> `recipe.fine_tune` with
the epoch listeners (MLflow, Optuna pruning) -> result back to Optuna.
"""

from __future__ import annotations

import functools
import gc
import time
from typing import Any, Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from pet_sweep.config import Experiment
from pet_sweep.errors import Preempted, TrackingAway, TrialFailed
from pet_sweep.sweep.budget import Budget, Claim, WorkerRole, this_process
from pet_sweep.sweep.confirm import Confirmer, best_config_text, completed_runs, first_resolution, selection_metrics
from pet_sweep.sweep.converge import Convergence
from pet_sweep.sweep.keep import KeepWinner
from pet_sweep.sweep.lifecycle import clean_leftovers
from pet_sweep.sweep.objective import Objective, TrialListener
from pet_sweep.sweep.parent import close_dead_runs, close_parent_run, open_parent_run, tracker_when_needed
from pet_sweep.sweep.records import (
    INVOCATION_ATTR,
    WORKER_ATTR,
    EpochRecord,
    StoppedBy,
    SweepResult,
    TrialOutcome,
    best_of,
    describe_trial,
    fail_stale_trials,
    format_trial,
)
from pet_sweep.sweep.resume import queue_preempted
from pet_sweep.sweep.storage import StaleTrialHandler, check_split, has_heartbeats, open_study
from pet_sweep.sweep.training import Training
from pet_sweep.sweep.warm import WarmConfig, enqueue_warm_start, plan_warm_start
from pet_sweep.tracking import Tracker, check_server


def run_sweep(exp: Experiment, *, echo: Callable[[str], None] = print,
              epoch_listeners: tuple[Callable[[int, EpochRecord], None], ...] = (),
              trial_listeners: tuple[TrialListener, ...] = (),
              role: WorkerRole | None = None, fastai_cbs: tuple[Any, ...] = (),
              training: Training | None = None) -> SweepResult:
    """Run (or resume) the experiment's study in this process: `budget.n_trials` more trials.

    With a `role` from a supervisor (`pet-sweep run --workers N`) this process is one
    of N workers sharing that budget, and the supervisor owns the MLflow parent run.
    `fastai_cbs` (Callback instances or classes) join every trial's Learner. `training`: what
    the trials train with (`sweep.training`: fastai; a benchmark gives a stand-in).
    """
    role, training = role or WorkerRole(), training or Training()
    study, tracker, data, warm = _open(exp, role, training, echo)
    owns_parent = role.parent_run_id is None
    parent = _open_parent_run(exp, study, tracker, echo) if owns_parent else role.parent_run_id
    budget = Budget(role, exp.config.budget.n_trials, exp.config.budget.max_trials,
                    heartbeats=has_heartbeats(exp.storage_url))
    trial_ended = TrialEnded(tracker, parent, echo, trial_listeners, tuple(exp.config.objectives), exp.config.seed)
    status = "FAILED"
    stopped_by: StoppedBy = "budget"
    objective: Objective | None = None
    if owns_parent:
        role.own_lock()  # removed in `finally`; left behind only by a kill -9 (clean_leftovers)
    try:
        # under the claim lock: of the workers starting together on one machine the first
        # pretrains or runs the LR finder and stores it, the others read it back in their turn
        with budget.claim():
            enqueue_warm_start(study, warm, echo)  # first in the queue: sweep.confirm queues a baseline at the first claim, after them
            checkpoints, anchors = training.starting_points(exp, data, study, tracker, parent, echo)
        # budget.timeout counts the trials only: a first run that pretrains its bodies or runs
        # the LR finder (minutes, cached or stored for later runs) still gets its full time
        # for trials, rather than possibly none
        started = time.monotonic()
        objective = Objective(exp, data, tracker, parent, epoch_listeners, trial_listeners,
                              anchors=anchors, checkpoints=checkpoints, fastai_cbs=fastai_cbs, training=training)
        confirmer = Confirmer(exp, anchors, data.n_valid, echo if role.index == 0 else lambda line: None)
        convergence = Convergence(exp, role.invocation, data.n_valid)
        if role.index == 0:
            echo(f"resolution   {first_resolution(data.n_valid, completed_runs(study.get_trials(), exp.config.seed))}")
        freeze_long_lived_objects()
        stopped_by = _run_trials(exp, study, objective, budget, trial_ended, started, echo, confirmer, convergence)
        status = "FINISHED"
    except KeyboardInterrupt as err:
        status, stopped_by = "KILLED", "interrupt"
        if isinstance(err, Preempted) and objective is not None:  # SIGTERM: its trial resumes from its checkpoint
            queue_preempted(study, objective.preempted, exp, lambda: tracker, echo)
    except TrackingAway:  # between two trials: nothing runs, every trial is closed
        status, stopped_by = "KILLED", "tracking"
    finally:
        gc.unfreeze()  # a library caller's later collections see everything again
        if owns_parent:
            close_dead_runs(study, tracker)
            close_parent_run(study, tracker, parent, status)
            role.lock_path.unlink(missing_ok=True)
        tracker.close()  # says what waits in the spool while the MLflow server is away
    trials = study.get_trials(deepcopy=False)
    return SweepResult(exp.study_name, parent, ran=budget.used(trials), finished=budget.finished(trials),
                       best=best_of(study), stopped_by=stopped_by, left=budget.left(trials), trials=trial_ended.seen,
                       best_config=best_config_text(completed_runs(trials, exp.config.seed)))


def split_callbacks(callbacks: tuple[Any, ...]) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """`pet_sweep.run(callbacks=...)`: (epoch listeners, fastai callbacks). A fastai `Callback`
    (instance or class) joins each trial's Learner; any other callable is an epoch listener,
    called as `listener(trial_number, EpochRecord)`."""
    if not callbacks:
        return (), ()
    from fastai.callback.core import Callback  # heavy: fastai

    def is_fastai(cb: Any) -> bool:
        return isinstance(cb, Callback) or (isinstance(cb, type) and issubclass(cb, Callback))

    for cb in callbacks:
        if not is_fastai(cb) and not callable(cb):
            raise TypeError(f"callbacks must be fastai Callbacks or epoch listeners "
                            f"(callable(trial_number, record)), but got {cb!r}")
    return tuple(cb for cb in callbacks if not is_fastai(cb)), tuple(cb for cb in callbacks if is_fastai(cb))


def _open(exp: Experiment, role: WorkerRole, training: Training,
          echo: Callable[[str], None]) -> tuple[optuna.Study, Tracker, Any, list[WarmConfig]]:
    """The study, the MLflow tracker, the data and the warm-start configs, checked and opened
    in the order that leaves no store behind when a check fails."""
    # an MLflow server that is down: said in seconds, before the data. Not in a supervised worker: its
    # supervisor asked, and a server slow to answer 128 workers starting at once is no reason to die
    supervised = role.parent_run_id is not None
    if not supervised:
        check_server(exp.tracking_uri)
    # before any store: a missing data folder, or an objective this device cannot measure,
    # must not leave a study or run behind
    data = training.open_data(exp, role)
    if role.index == 0:  # one line per sweep, not per worker
        echo(f"data         {data.describe(exp.config.data)}")
    tracker = tracker_when_needed(exp, check=not supervised)
    stale = StaleTrialHandler(exp.config.faults.max_retry, tracker=tracker, echo=echo)
    study = open_study(exp, on_stale=stale)  # a bad storage URL: before the MLflow store
    check_split(study, exp, data.fingerprint, echo)  # another split: refused before any run is opened
    warm = plan_warm_start(exp) if exp.config.sampler.warm_start else []  # a foreign config: refused here too
    return study, tracker(), data, warm


def _open_parent_run(exp: Experiment, study: optuna.Study, tracker: Tracker, echo: Callable[[str], None]) -> str:
    """This process runs the sweep alone: clean what a killed run left, then open the parent run."""
    cleaned = clean_leftovers([exp])
    if cleaned:
        echo(cleaned)
    return open_parent_run(exp, study, tracker)


def _run_trials(exp: Experiment, study: optuna.Study, objective: Objective, budget: Budget,
                trial_ended: TrialEnded, started: float, echo: Callable[[str], None],
                confirmer: Confirmer, convergence: Convergence) -> StoppedBy:
    """Run one trial at a time, each in a slot claimed from the budget, or wait while another
    worker's trial runs, until the budget, the study's cap, budget.timeout or a converged search
    ends it (returned). Before each claim the confirmer queues the baseline and the repeats the
    selection needs (at once, when the search has converged)."""
    timeout, faults = exp.config.budget.timeout, exp.config.faults
    callbacks = [trial_ended, *([KeepWinner(exp, objective, echo)] if exp.config.keep_winner else [])]
    waiting, first = False, True
    # as Optuna's own `timeout`, checked between trials: the first one always starts
    while first or timeout is None or time.monotonic() - started < timeout:
        first = False
        _check_tracking(objective.tracker, exp.config.tracking.max_outage)
        with budget.claim() as claim:
            search_over = convergence.search_over(study)
            if convergence.verdict is not None:  # evaluated now, by this worker
                echo(f"terminator   {convergence.verdict.text()}")
            hold = confirmer.top_up(study, budget, search_over)
            step = budget.next_step(study, search_over)
            if hold and step == "run" and not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
                step = budget.hold(confirmer.holding)
            if step == "stop":
                if budget.capped:
                    return "cap"
                return "converged" if search_over and budget.left(study.get_trials(deepcopy=False)) else "budget"
            waiting, was_waiting = step == "wait", waiting
            if step == "run":
                take_slot = functools.partial(_take_slot, role=budget.role, claim=claim)
                # no gc_after_trial: recipe.release already collects once per trial (a full
                # collection costs ~0.4 s with fastai loaded)
                study.optimize(functools.partial(objective, on_start=take_slot), n_trials=1,
                               callbacks=callbacks, catch=(TrialFailed,))
                continue
        # "wait": another worker's trial is running; if that worker died, its trial
        # turns stale after the grace period and is failed and retried here.
        if not was_waiting:
            echo(f"waiting      {budget.waiting_on}; retries any whose worker dies")
        time.sleep(min(faults.heartbeat_interval, 5))
        fail_stale_trials(study)
    # the time limit ended it; it cut the run short only with slots left
    return "timeout" if budget.used(study.get_trials(deepcopy=False)) < exp.config.budget.n_trials else "budget"


def _check_tracking(tracker: Tracker, max_outage: float) -> None:
    """The MLflow server away past `max_outage` ends the sweep here, between trials, like a Ctrl-C."""
    if tracker.down_for() > max_outage:
        raise TrackingAway(f"the MLflow tracking server has been unreachable for {tracker.down_for():.0f}s")


def _take_slot(trial: optuna.Trial, *, role: WorkerRole, claim: Claim) -> None:
    """The trial exists (RUNNING): mark it as this invocation's, then let the next worker claim.

    A retry of a dead worker's trial carries the original's user attrs, so it
    already has an invocation and takes no new slot.
    """
    if INVOCATION_ATTR not in trial.user_attrs:
        trial.set_user_attr(INVOCATION_ATTR, role.invocation)
    trial.set_user_attr(WORKER_ATTR, this_process())
    claim.release()


class TrialEnded:
    """Optuna's callback after each trial: print its line, tell the listeners, and bring
    the parent run's counts and best up to date."""

    def __init__(self, tracker: Tracker, parent_run_id: str, echo: Callable[[str], None],
                 listeners: tuple[TrialListener, ...], objectives: tuple[str, ...] = ("error_rate",),
                 seed: int = 0) -> None:
        self.tracker, self.parent_run_id, self.echo, self.listeners = tracker, parent_run_id, echo, listeners
        self.objectives = objectives  # the study's: their costs show on each trial's line
        self.seed = seed              # the experiment's: the training seed of a trial that records none
        self.seen: list[TrialOutcome] = []  # the trials this process saw end

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        done = describe_trial(trial, self.objectives)
        self.seen.append(done)
        best = best_of(study)
        self.echo(format_trial(done, best))
        for listener in self.listeners:
            listener.trial_finished(done, best)
        self.tracker.update_sweep(self.parent_run_id, *sweep_metrics(study, best, self.seed))


def sweep_metrics(study: optuna.Study, best: tuple[float, int] | None,
                  seed: int = 0) -> tuple[dict[str, float], dict[str, str]]:
    """The parent run's metrics (trials complete, pruned and failed; the best error rate; the best
    config's mean, spread and seeds, and the baseline's mean, where the selection ran them) and tags."""
    counts = {s.name.lower(): 0 for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    for t in study.get_trials(deepcopy=False):
        if t.state.name.lower() in counts:
            counts[t.state.name.lower()] += 1
    metrics = {f"n_{k}": float(v) for k, v in counts.items()}
    tags = {}
    if best:
        metrics.update(best_error_rate=best[0], best_trial=float(best[1]))
        tags["best_trial"] = str(best[1])
    selected = selection_metrics(completed_runs(study.get_trials(deepcopy=False), seed))
    return {**metrics, **selected[0]}, {**tags, **selected[1]}


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
