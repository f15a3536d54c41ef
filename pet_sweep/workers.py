"""Several worker processes sharing one study, and the global trial budget.

Scale-out is Optuna's own distributed mode: every worker is an ordinary
`study.optimize` loop on the shared storage (SQLite, PostgreSQL, MySQL/MariaDB,
or a journal file). What pet-sweep adds is the budget and the supervision:

* **Budget.** `pet-sweep run EXP --workers N` runs `budget.n_trials` trials in
  all, not N x n_trials. Every invocation has an id; a worker *claims* a trial
  slot under a file lock held from the budget check until its objective starts,
  so the check and the creation of the trial are one step for the workers of
  one machine. The slots used are the invocation's trials in the storage, so the
  count survives a dead worker: a trial whose worker was killed and which
  Optuna retried (`RetryHeartbeatStaleTrialCallback` marks the copy with the
  system attr ``failed_trial``) uses no second slot, nor does a trial re-queued
  at half the batch size after running out of memory. Invocations on other
  machines have their own ids and their own budgets; `budget.max_trials` caps
  the whole study, counting the trials running anywhere, so machines do not all
  start one more when the cap is near (only two that check within the same
  instant can both start the last one).
* **Supervisor.** Starts the workers (`python -m pet_sweep run ... --worker`),
  one GPU each via ``CUDA_VISIBLE_DEVICES`` (CPU cores split between them
  otherwise), prints their trial lines with a worker prefix, forwards Ctrl-C /
  SIGTERM, and closes the MLflow parent run when they are done.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal

import optuna
from optuna.trial import FrozenTrial, TrialState

# Trial user attribute: the invocation (one `pet-sweep run`) whose budget the trial used.
INVOCATION_ATTR = "pet_sweep_invocation"
RETRY_OF = "failed_trial"  # system attr RetryHeartbeatStaleTrialCallback sets on a retry
OOM_RETRY_OF = "oom_retry_of"  # user attr of a trial re-queued at half the batch size after an out-of-memory
WORKER_ENV = "PET_SWEEP_WORKER"
# Study user attr: "host:pid@unix-time" of the process that last opened the MLflow parent
# run and will close it; "" once closed. A killed opener leaves it set (`clean_leftovers`).
PARENT_OPEN_ATTR = "mlflow_parent_open"
INTERRUPTED = "interrupted"  # the reason of a trial Ctrl-C or SIGTERM stopped (not retried)


def this_process() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def process_gone(owner: str) -> bool | None:
    """Is the process `host:pid` gone? None when it runs on another host (it cannot be asked)."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process: alive
        return False
    return False


@dataclass(frozen=True)
class WorkerRole:
    """Who this process is within an invocation of `pet-sweep run`."""

    invocation: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    index: int = 0
    n_workers: int = 1
    parent_run_id: str | None = None  # set by a supervisor: it owns (and closes) the parent run
    threads: int | None = None        # torch threads of this worker (CPU cores split)

    def encode(self) -> str:
        return f"{self.invocation}:{self.index}:{self.n_workers}:{self.parent_run_id or ''}:{self.threads or ''}"

    @classmethod
    def decode(cls, text: str) -> "WorkerRole":
        try:
            invocation, index, n_workers, parent, threads = text.split(":")
            return cls(invocation, int(index), int(n_workers), parent or None, int(threads) if threads else None)
        except ValueError:
            raise ValueError(f"--worker must be INVOCATION:INDEX:N:PARENT_RUN:THREADS, but got {text!r}") from None

    @property
    def lock_path(self) -> Path:
        return Path(tempfile.gettempdir()) / f"{LOCK_PREFIX}{self.invocation}.lock"

    def own_lock(self) -> None:
        """Write this process (the one that removes the lock at the end) into the lock file,
        so a later command can tell the lock of a killed supervisor from a live one."""
        self.lock_path.write_text(this_process() + "\n")


LOCK_PREFIX = "pet-sweep-"


def clean_stale_locks() -> list[str]:
    """Remove the lock files whose owner (host:pid) is gone from this host; returns the owners."""
    removed = []
    for path in Path(tempfile.gettempdir()).glob(f"{LOCK_PREFIX}*.lock"):
        try:
            owner = path.read_text().strip()
        except OSError:  # removed meanwhile, or another user's
            continue
        if owner and process_gone(owner):
            path.unlink(missing_ok=True)
            removed.append(owner)
    return removed


def is_retry(trial: FrozenTrial) -> bool:
    """A second go at a trial that already used a slot: its worker died, or it ran out of memory."""
    return RETRY_OF in trial.system_attrs or OOM_RETRY_OF in trial.user_attrs


class Budget:
    """The global budget of one invocation: `n_trials` trials, whichever worker runs them."""

    def __init__(self, role: WorkerRole, n_trials: int, max_trials: int | None = None,
                 heartbeats: bool = True) -> None:
        self.role, self.n_trials, self.max_trials, self.heartbeats = role, n_trials, max_trials, heartbeats
        self.waiting_on = ""  # why next_step last said "wait", in words
        self.capped = False   # next_step said "stop" because of budget.max_trials

    def used(self, trials: list[FrozenTrial]) -> int:
        """Slots used: this invocation's trials, retries of a dead worker's trial not counted again."""
        return sum(1 for t in trials if t.user_attrs.get(INVOCATION_ATTR) == self.role.invocation
                   and not is_retry(t))

    def left(self, trials: list[FrozenTrial]) -> int:
        """What a resume must run to finish this budget, queued retries aside (they are free).

        A slot stays used by a trial that completed, was pruned, failed, or failed and was
        queued again (its retry fills it). A trial (or retry) Ctrl-C stopped is not queued
        again, so its slot is given back.
        """
        interrupted = sum(1 for t in trials if t.user_attrs.get(INVOCATION_ATTR) == self.role.invocation
                          and t.state == TrialState.FAIL and t.user_attrs.get("reason") == INTERRUPTED)
        return max(0, self.n_trials - self.used(trials) + interrupted)

    def finished(self, trials: list[FrozenTrial]) -> int:
        """This invocation's trials that ran to the end (complete or pruned), retries included."""
        return sum(1 for t in trials if t.user_attrs.get(INVOCATION_ATTR) == self.role.invocation
                   and t.state in (TrialState.COMPLETE, TrialState.PRUNED))

    def next_step(self, study: optuna.Study) -> Literal["run", "wait", "stop"]:
        """What a free worker does now (call it holding the claim lock)."""
        trials = study.get_trials(deepcopy=False)
        self.capped = cap_full = False
        if self.max_trials is not None:
            finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
            if finished >= self.max_trials:
                self.capped = True
                return "stop"
            # the rest of the cap may be running, on this machine or another: start none beyond it
            cap_full = cap_reached(trials, self.max_trials)
        if not cap_full and any(t.state == TrialState.WAITING for t in trials):
            return "run"  # a retry (or an enqueued trial): optimize pops it first, no new slot
        if self.used(trials) < self.n_trials:
            if not cap_full:
                return "run"
            # the cap is full: stay while those trials run, to retry one whose worker dies
            running = [t.number for t in trials if t.state == TrialState.RUNNING]
            self.waiting_on = f"budget.max_trials {self.max_trials} is reached counting trial(s) {_numbers(running)}"
            self.capped = not self.heartbeats
            return "wait" if self.heartbeats else "stop"
        mine = [t.number for t in trials if t.state == TrialState.RUNNING
                and t.user_attrs.get(INVOCATION_ATTR) == self.role.invocation]
        # Stay while another worker's trial runs: if that worker dies, its trial is
        # failed after the grace period and retried, and someone must be there to run it.
        # Without heartbeats (journal storage) a dead worker's trial is never failed.
        self.waiting_on = f"this run's budget is used; trial(s) {_numbers(mine)} of it still running"
        return "wait" if mine and self.heartbeats else "stop"

    @contextlib.contextmanager
    def claim(self) -> Iterator["Claim"]:
        """Hold the invocation's lock; the objective releases it once its trial exists."""
        handle = open(self.role.lock_path, "a+")
        fcntl.flock(handle, fcntl.LOCK_EX)
        claim = Claim(handle)
        try:
            yield claim
        finally:
            claim.release()


def cap_reached(trials: list[FrozenTrial], max_trials: int | None) -> bool:
    """Does the study-wide cap count enough trials, finished or running on any machine?"""
    live = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    return max_trials is not None and sum(t.state in live for t in trials) >= max_trials


def _numbers(numbers: list[int]) -> str:
    return ", ".join(str(n) for n in numbers)


class Claim:
    """A held budget lock; `release` is idempotent."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


# -- the supervisor -------------------------------------------------------------


def parse_gpus(text: str | None) -> list[str] | None:
    if not text:
        return None
    gpus = [g.strip() for g in text.split(",") if g.strip()]
    if not gpus or not all(g.isdigit() for g in gpus):
        from pet_sweep.errors import ConfigError

        raise ConfigError(f"--gpus must be GPU indices like 0,1, but got {text!r}")
    return gpus


def worker_envs(n_workers: int, gpus: list[str] | None) -> list[dict[str, str]]:
    """Environment per worker: its own GPU where there are GPUs, a share of the cores otherwise."""
    if gpus is None:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = [g for g in visible.split(",") if g] if visible else [str(i) for i in range(count)]
        gpus = ids[:count] if count else []
    threads = max(1, (os.cpu_count() or 1) // n_workers)
    envs = []
    for i in range(n_workers):
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]  # more workers than GPUs: they share
        envs.append(env)
    return envs


@dataclass
class WorkerExit:
    index: int
    returncode: int

    @property
    def describe(self) -> str:
        if self.returncode < 0:
            return f"worker {self.index} was killed by signal {signal.Signals(-self.returncode).name}"
        return f"worker {self.index} exited with code {self.returncode}"


def start_workers(argv: list[str], roles: list[WorkerRole], envs: list[dict[str, str]],
                  secrets: dict[str, str], echo: Callable[[str], None]
                  ) -> tuple[list[subprocess.Popen], list[threading.Thread]]:
    """Start the worker processes; a thread per worker prints its lines with a prefix."""
    procs, pumps = [], []
    for role, env in zip(roles, envs):
        cmd = [sys.executable, "-m", "pet_sweep", *argv, "--worker", role.encode()]
        # URLs travel in the environment, not argv, so no password shows in `ps`.
        full_env = {**os.environ, **env, **secrets, "PYTHONUNBUFFERED": "1"}
        # Own session: a Ctrl-C in the terminal reaches the supervisor only, which
        # forwards it once to every worker (a second one would cut their cleanup short).
        proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1, start_new_session=True)
        pump = threading.Thread(target=_pump, args=(proc, f"w{role.index}", echo), daemon=True)
        pump.start()
        procs.append(proc)
        pumps.append(pump)
    return procs, pumps


def _pump(proc: subprocess.Popen, prefix: str, echo: Callable[[str], None]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        echo(f"{prefix}| {line.rstrip()}")


def wait_workers(procs: list[subprocess.Popen]) -> tuple[list[WorkerExit], bool]:
    """Wait for every worker; on SIGINT/SIGTERM forward SIGINT to them once and keep waiting."""
    interrupted = threading.Event()

    def forward(signum: int, frame: Any) -> None:
        if interrupted.is_set():
            return
        interrupted.set()
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGINT)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        exits = [WorkerExit(i, proc.wait()) for i, proc in enumerate(procs)]
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return exits, interrupted.is_set()


@dataclass
class Supervised:
    """What a supervised sweep ended with."""

    study_name: str
    parent_run_id: str
    exits: list[WorkerExit]
    interrupted: bool
    finished: int          # this invocation's trials that ran to the end
    used: int              # budget slots used (failed trials included)
    best: tuple[float, int] | None
    closed_runs: int       # MLflow runs a dead worker left RUNNING, closed at the end
    orphans: list[int]     # trials whose worker died with no other worker left to retry them
    capped: bool = False   # budget.max_trials stopped the workers
    left: int = 0          # what a resume must run to finish the budget, queued retries aside (Budget.left)


def supervise(exp: Any, n_workers: int, gpus: list[str] | None, argv: list[str],
              echo: Callable[[str], None] = print) -> Supervised:
    """Run `exp`'s sweep in `n_workers` worker processes sharing one budget.

    `argv` is the `run` command line the workers repeat (no URLs: those go in
    PET_SWEEP_STORAGE / PET_SWEEP_TRACKING_URI).
    """
    from pet_sweep.data import check_data
    from pet_sweep.study import best_of, close_dead_runs, close_parent_run, open_parent_run, open_study
    from pet_sweep.tracking import Tracker, check_server

    check_server(exp.tracking_uri)  # an MLflow server that is down: said in seconds
    check_data(exp)  # a data error stops everything before any study or run exists
    # The supervisor creates the study, the tables and the parent run, so the
    # workers never race to create them.
    study = open_study(exp)  # a bad storage URL: before the MLflow store
    cleaned = clean_leftovers([exp])
    if cleaned:
        echo(cleaned)
    tracker = Tracker(exp.tracking_uri, exp.tracking_experiment)
    parent = open_parent_run(exp, study, tracker)
    envs = worker_envs(n_workers, gpus)
    threads = int(envs[0]["OMP_NUM_THREADS"]) if "CUDA_VISIBLE_DEVICES" not in envs[0] else None
    invocation = WorkerRole().invocation
    roles = [WorkerRole(invocation, i, n_workers, parent, threads) for i in range(n_workers)]
    for role, env in zip(roles, envs):
        where = f"GPU {env['CUDA_VISIBLE_DEVICES']}" if "CUDA_VISIBLE_DEVICES" in env else f"CPU, {threads} thread(s)"
        echo(f"worker {role.index}     {where}")
    secrets = {"PET_SWEEP_STORAGE": exp.storage_url, "PET_SWEEP_TRACKING_URI": exp.tracking_uri}
    status = "FAILED"
    roles[0].own_lock()
    try:
        procs, pumps = start_workers(argv, roles, envs, secrets, echo)
        exits, interrupted = wait_workers(procs)
        for pump in pumps:
            pump.join(timeout=5)
        orphans = fail_orphans(study, tracker, exp.config.faults.max_retry, [p.pid for p in procs])
        budget = Budget(roles[0], exp.config.budget.n_trials)
        trials = study.get_trials(deepcopy=False)
        finished, used, left = budget.finished(trials), budget.used(trials), budget.left(trials)
        capped = cap_reached(trials, exp.config.budget.max_trials)
        status = "KILLED" if interrupted else "FINISHED" if finished else "FAILED"
    finally:
        closed = close_dead_runs(study, tracker)
        close_parent_run(study, tracker, parent, status)
        roles[0].lock_path.unlink(missing_ok=True)
    return Supervised(exp.study_name, parent, exits, interrupted, finished, used, best_of(study), closed, orphans,
                      capped, left)


def fail_orphans(study: optuna.Study, tracker: Any, max_retry: int, pids: list[int]) -> list[int]:
    """Fail the trials our dead workers left RUNNING, queue their retry, close their MLflow runs.

    Every worker has exited, so none of their trials can still be running; waiting
    for the grace period would only leave them RUNNING for the next `pet-sweep run`.
    """
    from pet_sweep.study import WORKER_ATTR, StaleTrialHandler

    ours = {f"{socket.gethostname()}:{pid}" for pid in pids}
    handler = StaleTrialHandler(max_retry)
    handler.tracker = tracker  # no echo: the supervisor says which trials it queued again
    return [trial.number for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if trial.user_attrs.get(WORKER_ATTR) in ours and fail_and_retry(study, trial.number, handler)]


def fail_and_retry(study: optuna.Study, number: int, handler: Any) -> bool:
    """Fail the RUNNING trial `number` whose worker is gone; `handler` (a StaleTrialHandler)
    queues its retry and closes its MLflow run. False if it finished meanwhile, or another
    process failed and retried it first."""
    frozen = study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
    retried = any(t.system_attrs.get(RETRY_OF) == number for t in study.get_trials(deepcopy=False))
    if frozen.state != TrialState.FAIL or retried:
        return False
    handler(study, frozen)
    return True


# -- what a killed process leaves behind ------------------------------------------


def stale_trial_numbers(study: optuna.Study) -> set[int] | None:
    """The RUNNING trials whose heartbeat is older than the grace period (None: no heartbeats here)."""
    # Optuna's own test, as `fail_stale_trials` makes it (the storage's heartbeat interface)
    from optuna.storages._heartbeat import is_heartbeat_enabled

    storage = study._storage
    if not is_heartbeat_enabled(storage):
        return None
    ids = set(storage._get_stale_trial_ids(study._study_id))
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


def clean_leftovers(exps: Iterable[Any]) -> str:
    """Undo what a killed `pet-sweep run` (supervisor or single process) left behind.

    Removes the lock files of processes gone from this host, and closes (KILLED) the MLflow
    parent run of each experiment's study whose opener is gone and which has no live
    trial, with the trial runs left RUNNING. Creates nothing. Returns one line saying
    what was cleaned, "" when nothing was.
    """
    from pet_sweep.errors import PetSweepError
    from pet_sweep.study import close_dead_runs, missing_store_file, open_study
    from pet_sweep.tracking import PARENT_RUN_ATTR, Tracker

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
        from mlflow.exceptions import MlflowException

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


def fail_stale(exp: Any, number: int | None, confirm: Callable[[str], bool],
               echo: Callable[[str], None]) -> list[int]:
    """Fail RUNNING trials whose worker is gone, queue their retries, close their MLflow runs.

    Without `number`: Optuna's `fail_stale_trials` (trials silent for faults.grace_period;
    needs heartbeats). With `number`: that trial, once `confirm` agrees (nothing
    tells whether its worker on another machine is gone). Returns the trials failed.
    """
    from optuna.storages import fail_stale_trials

    from pet_sweep.errors import StudyError
    from pet_sweep.study import WORKER_ATTR, StaleTrialHandler, open_study
    from pet_sweep.tracking import Tracker

    handler = StaleTrialHandler(exp.config.faults.max_retry)
    study = open_study(exp, create=False, on_stale=handler)
    handler.tracker, handler.echo = Tracker(exp.tracking_uri, exp.tracking_experiment), echo
    stale = stale_trial_numbers(study)
    running = {t.number: t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    grace = exp.config.faults.grace_period
    if number is None:
        if stale is None:
            raise StudyError(f"{exp.storage_url.split(':', 1)[0]} storage has no heartbeats, so no trial is known "
                             f"stale; name the trial whose worker is gone: --trial N (running: "
                             f"{_numbers(sorted(running)) or 'none'})")
        fail_stale_trials(study)  # calls handler for each trial it failed
        now = {t.number: t.state for t in study.get_trials(deepcopy=False)}
        failed = sorted(n for n in stale if now[n] == TrialState.FAIL)
        alive = sorted(set(running) - set(failed))
        if alive:
            echo(f"running      trial(s) {_numbers(alive)} sent a heartbeat within faults.grace_period ({grace}s)"
                 " or never sent one; name one with --trial N to fail it anyway")
    else:
        trial = running.get(number)
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
                       + (f"; it sent a heartbeat within {grace}s or never sent one" if fresh else "")
                       + "? Only if its worker is gone"):
            return []
        handler.reason = f"failed by `pet-sweep fail-stale --trial {number}`: its worker is gone"
        failed = [number] if fail_and_retry(study, number, handler) else []
    for run_id in handler.closed_runs:
        echo(f"closed       MLflow run {run_id} (FAILED)")
    return failed
