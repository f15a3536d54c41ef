"""Sweeps on this machine: one worker loop in this process, or several worker processes
sharing one study (`--workers N`).

Scale-out is Optuna's own distributed mode: every worker is an ordinary
`study.optimize` loop on the shared storage. The supervisor starts the workers
(`python -m pet_sweep worker ROLE ...`, a hidden command), one GPU each via
``CUDA_VISIBLE_DEVICES`` (CPU cores split between them otherwise), prints their
trial lines with a worker prefix, forwards Ctrl-C / SIGTERM, closes the MLflow
parent run when they are done, and says why the sweep stopped.
"""

from __future__ import annotations

import base64
import contextlib
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from pet_sweep.config import Experiment
from pet_sweep.errors import ConfigError
from pet_sweep.sweep.budget import Budget, WorkerRole, cap_reached
from pet_sweep.sweep.confirm import best_config_text, completed_runs
from pet_sweep.sweep.converge import converged_in
from pet_sweep.sweep.lifecycle import clean_leftovers, fail_orphans
from pet_sweep.sweep.loop import run_sweep, split_callbacks
from pet_sweep.sweep.parent import close_dead_runs, close_parent_run, open_parent_run, tracker_when_needed
from pet_sweep.sweep.records import StoppedBy, SweepResult, best_of, worker_line
from pet_sweep.sweep.storage import open_study
from pet_sweep.sweep.training import Training
from pet_sweep.tracking import check_server
from pet_sweep.train.data import check_data

Echo = Callable[[str], None]


def to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def nothing_ran(exp: Experiment) -> SweepResult:
    """The result of a sweep that Ctrl-C stopped before it started: the whole budget is left."""
    n_trials = exp.config.budget.n_trials
    return SweepResult(exp.study_name, "", ran=0, finished=0, best=None, stopped_by="interrupt", left=n_trials)


EXPERIMENT_ENV = "PET_SWEEP_WORKER_EXPERIMENT"  # the supervisor's validated Experiment (and callbacks), pickled


def pack_experiment(exp: Experiment, callbacks: tuple[Any, ...] = ()) -> str:
    """`exp` and the run's callbacks as the workers receive them, in the environment (not argv:
    it holds the URLs): an experiment built or changed in Python reaches them as it is."""
    try:
        data = pickle.dumps((exp, tuple(callbacks)))
    except (pickle.PicklingError, AttributeError, TypeError) as err:
        raise ConfigError(f"with workers > 1 each worker process gets a copy of the callbacks, so they must "
                          f"pickle (module-level classes and functions, no lambdas): {err}") from None
    return base64.b64encode(data).decode("ascii")


def unpack_experiment(text: str) -> tuple[Experiment, tuple[Any, ...]]:
    """What `pack_experiment` wrote: the supervisor's experiment and callbacks."""
    exp, callbacks = pickle.loads(base64.b64decode(text))  # written by our own supervisor (its environment)
    return exp, callbacks


def work(exp: Experiment, role: str, echo: Echo = print, callbacks: tuple[Any, ...] = (),
         training: Training | None = None) -> SweepResult:
    """One of a supervisor's workers (the hidden `pet-sweep worker` command): `role` as
    `WorkerRole.encode` wrote it. The supervisor prints the banner, the result and the hints.
    `training`: a benchmark's stand-in (`sweep.training`); fastai's otherwise."""
    listeners, cbs = split_callbacks(callbacks)
    try:
        return run_sweep(exp, echo=echo, role=WorkerRole.decode(role), epoch_listeners=listeners, fastai_cbs=cbs,
                         training=training)
    except KeyboardInterrupt:  # before the sweep started
        return nothing_ran(exp)


def parse_gpus(text: str | None) -> list[str] | None:
    if not text:
        return None
    gpus = [g.strip() for g in text.split(",") if g.strip()]
    if not gpus or not all(g.isdigit() for g in gpus):
        raise ConfigError(f"--gpus must be GPU indices like 0,1, but got {text!r}")
    return gpus


THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def worker_threads(share: int) -> int:
    """Torch threads of one CPU worker: the user's `OMP_NUM_THREADS` where it is set, else its
    `share` of the cores (at least 1). Two workers with all the cores each fight over them:
    bench.threads (docs/benchmarks.md, "Threads per worker") measured the split against that."""
    given = os.environ.get("OMP_NUM_THREADS")
    if not given:
        return max(1, share)
    if not given.strip().isdigit() or int(given) < 1:
        raise ConfigError(f"environment variable OMP_NUM_THREADS must be a whole number >= 1, but got {given!r}")
    return int(given)


def worker_envs(n_workers: int, gpus: list[str] | None) -> list[dict[str, str]]:
    """Environment per worker: its own GPU where there are GPUs, a share of the cores otherwise
    (`worker_threads`), OpenMP's passive wait; the user's own settings of these variables win."""
    if gpus is None:
        import torch  # heavy: only to count the GPUs

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = [g for g in visible.split(",") if g] if visible else [str(i) for i in range(count)]
        gpus = ids[:count] if count else []
    threads = worker_threads((os.cpu_count() or 1) // n_workers)
    envs = []
    for i in range(n_workers):
        env = {var: os.environ.get(var) or str(threads) for var in THREAD_VARS}  # the user's own win
        # OpenMP threads that wait sleep rather than spin: beside other jobs a spinning thread
        # steals the core the one it waits for needs (bench.threads: 7x to 18x with 2 threads)
        env["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY") or "PASSIVE"
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]  # more workers than GPUs: they share
        envs.append(env)
    return envs


@dataclass(frozen=True)
class WorkerExit:
    index: int
    returncode: int

    @property
    def describe(self) -> str:
        if self.returncode < 0:
            return f"worker {self.index} was killed by signal {signal.Signals(-self.returncode).name}"
        return f"worker {self.index} exited with code {self.returncode}"


def worker_command(exp: Experiment, role: WorkerRole) -> list[str]:
    """The hidden `pet-sweep worker` command line of one worker: its role and, for `ps`, the
    experiment's name. The experiment itself travels in the environment (`start_workers`)."""
    return [sys.executable, "-m", "pet_sweep", "worker", role.encode(), exp.name]


def start_workers(exp: Experiment, roles: list[WorkerRole], envs: list[dict[str, str]], echo: Echo,
                  callbacks: tuple[Any, ...] = ()) -> tuple[list[subprocess.Popen], list[threading.Thread]]:
    """Start the worker processes, a fresh interpreter each; a thread per worker prints its lines with a prefix."""
    # The experiment (with its URLs) travels in the environment, not argv, so no password shows in `ps`.
    secrets = {EXPERIMENT_ENV: pack_experiment(exp, callbacks)}
    procs, pumps = [], []
    for role, env in zip(roles, envs):
        full_env = {**os.environ, **env, **secrets, "PYTHONUNBUFFERED": "1"}
        # Own session: a Ctrl-C in the terminal reaches the supervisor only, which
        # forwards it once to every worker (a second one would cut their cleanup short).
        proc = subprocess.Popen(worker_command(exp, role), env=full_env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
        pump = threading.Thread(target=_pump, args=(proc, role.index, echo), daemon=True)
        pump.start()
        procs.append(proc)
        pumps.append(pump)
    return procs, pumps


def _pump(proc: subprocess.Popen, index: int, echo: Echo) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        echo(worker_line(index, line.rstrip()))


def wait_workers(procs: list[subprocess.Popen]) -> tuple[list[WorkerExit], bool]:
    """Wait for every worker; on SIGINT/SIGTERM forward that signal to them once and keep waiting
    (SIGTERM: the workers leave their trials to resume from their checkpoints)."""
    interrupted = threading.Event()

    def forward(signum: int, frame: Any) -> None:
        if interrupted.is_set():
            return
        interrupted.set()
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM if signum == signal.SIGTERM else signal.SIGINT)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        exits = [WorkerExit(i, proc.wait()) for i, proc in enumerate(procs)]
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return exits, interrupted.is_set()


def worker_roles(exp: Experiment, n_workers: int, gpus: list[str] | None, parent: str, echo: Echo
                 ) -> tuple[list[WorkerRole], list[dict[str, str]]]:
    """Each worker's role in this invocation and its environment, said in one line per worker."""
    envs = worker_envs(n_workers, gpus)
    threads = int(envs[0]["OMP_NUM_THREADS"]) if "CUDA_VISIBLE_DEVICES" not in envs[0] else None
    invocation = WorkerRole().invocation
    roles = [WorkerRole(invocation, i, n_workers, parent, threads) for i in range(n_workers)]
    for role, env in zip(roles, envs):
        where = f"GPU {env['CUDA_VISIBLE_DEVICES']}" if "CUDA_VISIBLE_DEVICES" in env else f"CPU, {threads} thread(s)"
        echo(f"worker {role.index}     {where}")
    return roles, envs


# what starts the workers: `start_workers`, or a benchmark's (bench.simulated forks them);
# each process it returns has `pid`, `wait`, `poll` and `send_signal`, as a `subprocess.Popen`
Start = Callable[[Experiment, list[WorkerRole], list[dict[str, str]], Echo, tuple[Any, ...]],
                 tuple[list[Any], list[threading.Thread]]]


def supervise(exp: Experiment, n_workers: int, gpus: list[str] | None, *,
              echo: Echo = print, warn: Echo = to_stderr, callbacks: tuple[Any, ...] = (),
              start: Start = start_workers) -> SweepResult:
    """Run `exp`'s sweep in `n_workers` worker processes sharing one budget.

    `echo` gets the workers' lines and the supervisor's notes; `warn` a line per
    worker that ended with an error; `start` starts the workers (a fresh interpreter
    each; `bench.scale --simulated` forks them with a stand-in for the training).
    """
    started = time.monotonic()
    pack_experiment(exp, callbacks)  # callbacks that cannot travel: refused before anything starts
    check_server(exp.tracking_uri)  # an MLflow server that is down: said in seconds
    check_data(exp)  # a data error stops everything before any study or run exists
    # The supervisor creates the study, the tables and the parent run, so the
    # workers never race to create them.
    study = open_study(exp)  # a bad storage URL: before the MLflow store
    cleaned = clean_leftovers([exp])
    if cleaned:
        echo(cleaned)
    tracker = tracker_when_needed(exp)()  # its writes wait in the spool while an MLflow server is away
    parent = open_parent_run(exp, study, tracker)
    roles, envs = worker_roles(exp, n_workers, gpus, parent, echo)
    status = "FAILED"
    roles[0].own_lock()
    try:
        procs, pumps = start(exp, roles, envs, echo, callbacks)
        exits, interrupted = wait_workers(procs)
        for pump in pumps:
            pump.join(timeout=5)
        orphans = fail_orphans(study, tracker, exp.config.faults.max_retry, [p.pid for p in procs])
        budget = Budget(roles[0], exp.config.budget.n_trials)
        trials = study.get_trials(deepcopy=False)
        status = "KILLED" if interrupted else "FINISHED" if budget.finished(trials) else "FAILED"
    finally:
        closed = close_dead_runs(study, tracker)
        close_parent_run(study, tracker, parent, status)
        roles[0].lock_path.unlink(missing_ok=True)
        tracker.close()
    _say_what_went_wrong(exits, closed, [] if interrupted else orphans, echo, warn)
    used = budget.used(trials)
    timed_out = exp.config.budget.timeout is not None and time.monotonic() - started >= exp.config.budget.timeout
    stopped_by = why_stopped(exits, interrupted, short=used < budget.n_trials,
                             capped=cap_reached(trials, exp.config.budget.max_trials), timed_out=timed_out,
                             converged=converged_in(study, roles[0].invocation))
    return SweepResult(exp.study_name, parent, ran=used, finished=budget.finished(trials), best=best_of(study),
                       stopped_by=stopped_by, left=budget.left(trials),
                       best_config=best_config_text(completed_runs(trials, exp.config.seed)))


def _say_what_went_wrong(exits: list[WorkerExit], closed: int, orphans: list[int], echo: Echo, warn: Echo) -> None:
    """Workers that ended with an error, the MLflow runs they left open, the trials to retry."""
    for worker_exit in exits:
        if worker_exit.returncode not in (0, 130):
            warn(f"warning      {worker_exit.describe}")
    if closed:
        echo(f"closed       {closed} MLflow run(s) a dead worker left running")
    if orphans:
        echo(f"retry        trial(s) {', '.join(map(str, orphans))} of dead workers: "
             "failed now, queued to run again in the next `pet-sweep run`")


def why_stopped(exits: list[WorkerExit], interrupted: bool, *, short: bool, capped: bool, timed_out: bool,
                converged: bool = False) -> StoppedBy:
    """Why the workers stopped. Fewer trials than the budget: the study's cap (read from the
    storage), else a converged search (its verdict is in the study), else the time budget (the
    workers' clocks started after the supervisor's: if they timed out, so did it), else the
    workers ended early."""
    if interrupted:
        return "interrupt"
    if not any(e.returncode == 0 for e in exits):
        return "workers"
    if not short:
        return "budget"
    if capped:
        return "cap"
    if converged:
        return "converged"
    return "timeout" if timed_out else "workers"
