"""The trial budget of one invocation of `pet-sweep run`, shared by its workers.

`pet-sweep run EXP --workers N` runs `budget.n_trials` trials in all, not
N x n_trials. Every invocation has an id; a worker *claims* a trial slot under a
file lock held from the budget check until its objective starts, so the check
and the creation of the trial are one step for the workers of one machine. The
slots used are the invocation's trials in the storage, so the count survives a
dead worker: a trial whose worker was killed and which Optuna retried
(`RetryHeartbeatStaleTrialCallback.retried_trial_number` names the trial it
re-runs) uses no second slot, nor does a trial re-queued at half the
batch size after running out of memory. Invocations on other machines have
their own ids and their own budgets; `budget.max_trials` caps the whole study,
counting the trials running anywhere, so machines do not all start one more when
the cap is near (only two that check within the same instant can both start the
last one).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Protocol

import optuna
from optuna.trial import FrozenTrial, TrialState

from pet_sweep.sweep.records import INTERRUPTED, INVOCATION_ATTR, OOM_RETRY_OF, retried_trial_number


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


class ClaimLock(Protocol):
    """The invocation's claim lock: `acquire` blocks until this process holds it."""

    def acquire(self) -> None: ...

    def release(self) -> None: ...


class FileClaimLock:
    """The invocation's lock file under `flock`: one machine's workers; the kernel frees it if its holder dies."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: Any = None

    def acquire(self) -> None:
        handle = open(self.path, "a+")
        fcntl.flock(handle, fcntl.LOCK_EX)
        self._handle = handle

    def release(self) -> None:
        fcntl.flock(self._handle, fcntl.LOCK_UN)
        self._handle.close()
        self._handle = None


@dataclass(frozen=True)
class WorkerRole:
    """Who this process is within an invocation of `pet-sweep run`."""

    invocation: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    index: int = 0
    n_workers: int = 1
    parent_run_id: str | None = None  # set by a supervisor: it owns (and closes) the parent run
    threads: int | None = None        # torch threads of this worker (CPU cores split)
    # what serialises the claims of the invocation's workers: None, the lock file (one
    # machine); a lock that spans machines where the workers do (launch.ray). Not encoded:
    # a worker started by `pet-sweep worker` (local supervisor) uses the lock file.
    claim_lock: ClaimLock | None = field(default=None, compare=False, repr=False)

    def encode(self) -> str:
        return f"{self.invocation}:{self.index}:{self.n_workers}:{self.parent_run_id or ''}:{self.threads or ''}"

    @classmethod
    def decode(cls, text: str) -> "WorkerRole":
        try:
            invocation, index, n_workers, parent, threads = text.split(":")
            return cls(invocation, int(index), int(n_workers), parent or None, int(threads) if threads else None)
        except ValueError:
            raise ValueError(f"a worker's ROLE must be INVOCATION:INDEX:N:PARENT_RUN:THREADS, but got {text!r}") from None

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
    return retried_trial_number(trial) is not None or OOM_RETRY_OF in trial.user_attrs


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

    def next_step(self, study: optuna.Study, search_over: bool = False) -> Literal["run", "wait", "stop"]:
        """What a free worker does now (call it holding the claim lock). `search_over`: the search has
        converged (`sweep.converge`), so only queued trials still run, within the budget."""
        trials = study.get_trials(deepcopy=False)
        self.capped = cap_full = False
        if self.max_trials is not None:
            finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
            if finished >= self.max_trials:
                self.capped = True
                return "stop"
            # the rest of the cap may be running, on this machine or another: start none beyond it
            cap_full = cap_reached(trials, self.max_trials)
        waiting = [t for t in trials if t.state == TrialState.WAITING]
        # optimize pops the first queued trial: a retry runs free, any other queued trial (a repeat on
        # another seed, the baseline) takes a slot like a new one, and none beyond the budget
        if not cap_full and waiting and (is_retry(waiting[0]) or self.used(trials) < self.n_trials):
            return "run"
        if self.used(trials) < self.n_trials and not search_over:
            if not cap_full:
                return "run"
            # the cap is full: stay while those trials run, to retry one whose worker dies
            running = [t.number for t in trials if t.state == TrialState.RUNNING]
            self.waiting_on = f"for trial(s) {_numbers(running)} (budget.max_trials {self.max_trials} reached)"
            self.capped = not self.heartbeats
            return "wait" if self.heartbeats else "stop"
        mine = [t.number for t in trials if t.state == TrialState.RUNNING
                and t.user_attrs.get(INVOCATION_ATTR) == self.role.invocation]
        # Stay while another worker's trial runs: if that worker dies, its trial is
        # failed after the grace period and retried, and someone must be there to run it.
        # Without heartbeats (journal storage) a dead worker's trial is never failed.
        self.waiting_on = f"for trial(s) {_numbers(mine)} (this run's " + \
            ("search has converged)" if search_over else "budget is used)")
        return "wait" if mine and self.heartbeats else "stop"

    def hold(self, why: str) -> Literal["wait"]:
        """Wait rather than start a new trial (`why`, in words): the selection keeps the rest of the budget."""
        self.waiting_on = why
        return "wait"

    @contextlib.contextmanager
    def claim(self) -> Iterator["Claim"]:
        """Hold the invocation's lock; the objective releases it once its trial exists."""
        lock = self.role.claim_lock or FileClaimLock(self.role.lock_path)
        lock.acquire()
        claim = Claim(lock)
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

    def __init__(self, lock: ClaimLock) -> None:
        self._lock: ClaimLock | None = lock

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
