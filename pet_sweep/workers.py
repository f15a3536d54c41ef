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
import subprocess
import sys
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import optuna
from optuna.trial import FrozenTrial, TrialState

# Trial user attribute: the invocation (one `pet-sweep run`) whose budget the trial used.
INVOCATION_ATTR = "pet_sweep_invocation"
RETRY_OF = "failed_trial"  # system attr RetryHeartbeatStaleTrialCallback sets on a retry
OOM_RETRY_OF = "oom_retry_of"  # user attr of a trial re-queued at half the batch size after an out-of-memory
WORKER_ENV = "PET_SWEEP_WORKER"


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
        return Path(tempfile.gettempdir()) / f"pet-sweep-{self.invocation}.lock"


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
    try:
        procs, pumps = start_workers(argv, roles, envs, secrets, echo)
        exits, interrupted = wait_workers(procs)
        for pump in pumps:
            pump.join(timeout=5)
        orphans = fail_orphans(study, tracker, exp.config.faults.max_retry, [p.pid for p in procs])
        budget = Budget(roles[0], exp.config.budget.n_trials)
        trials = study.get_trials(deepcopy=False)
        finished, used = budget.finished(trials), budget.used(trials)
        capped = cap_reached(trials, exp.config.budget.max_trials)
        status = "KILLED" if interrupted else "FINISHED" if finished else "FAILED"
    finally:
        closed = close_dead_runs(study, tracker)
        close_parent_run(study, tracker, parent, status)
        roles[0].lock_path.unlink(missing_ok=True)
    return Supervised(exp.study_name, parent, exits, interrupted, finished, used, best_of(study), closed, orphans,
                      capped)


def fail_orphans(study: optuna.Study, tracker: Any, max_retry: int, pids: list[int]) -> list[int]:
    """Fail the trials our dead workers left RUNNING, queue their retry, close their MLflow runs.

    Every worker has exited, so none of their trials can still be running; waiting
    for the grace period would only leave them RUNNING for the next `pet-sweep run`.
    """
    import socket

    from pet_sweep.study import WORKER_ATTR, StaleTrialHandler

    ours = {f"{socket.gethostname()}:{pid}" for pid in pids}
    handler = StaleTrialHandler(max_retry)
    handler.tracker = tracker  # no echo: the supervisor says which trials it queued again
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.user_attrs.get(WORKER_ATTR) not in ours:
            continue
        frozen = study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
        retried = any(t.system_attrs.get(RETRY_OF) == trial.number for t in study.get_trials(deepcopy=False))
        if frozen.state != TrialState.FAIL or retried:
            continue  # finished meanwhile, or failed and retried by a worker on another machine
        handler(study, frozen)
        failed.append(trial.number)
    return failed
