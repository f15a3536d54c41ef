"""Several worker processes on this machine sharing one study (`--workers N`).

Scale-out is Optuna's own distributed mode: every worker is an ordinary
`study.optimize` loop on the shared storage. The supervisor starts the workers
(`python -m pet_sweep run ... --worker`), one GPU each via ``CUDA_VISIBLE_DEVICES``
(CPU cores split between them otherwise), prints their trial lines with a worker
prefix, forwards Ctrl-C / SIGTERM, and closes the MLflow parent run when they are
done.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable

from pet_sweep.sweep.budget import Budget, WorkerRole, cap_reached
from pet_sweep.sweep.lifecycle import clean_leftovers, fail_orphans

WORKER_ENV = "PET_SWEEP_WORKER"


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
    from pet_sweep.sweep.parent import close_dead_runs, close_parent_run, open_parent_run
    from pet_sweep.sweep.records import best_of
    from pet_sweep.sweep.storage import open_study
    from pet_sweep.tracking import Tracker, check_server
    from pet_sweep.train.data import check_data

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
