"""Workers on a Ray cluster sharing one study (`pet-sweep run EXP --workers N --ray ADDRESS`).

The driver (this process) does what the local supervisor does, with Ray in place of
subprocesses: it creates the study and owns the MLflow parent run, starts N Ray tasks
that each run one worker's sweep loop with the resources it asked for (Ray places them
on nodes with free CPUs or GPUs and sets ``CUDA_VISIBLE_DEVICES``; fractional GPUs pack
small trials on one card), shows their lines and trial events as a local run shows its
own (the status line, `--quiet` / `--verbose`; each line prefixed by worker), cancels
them on Ctrl-C, and closes the parent run at the end. With `storage_proxy` it also runs
Optuna's gRPC storage proxy for the workers (`launch.storage_proxy`).

Ray restarts a task whose process or node died (`max_retries`); the trial it was
running is failed after the grace period and retried by Optuna's heartbeat callback,
at no second slot of the budget. The claim lock spans machines (`ray_worker.Coordinator`).
The storage and tracking URLs travel through the object store, never in anything the
Ray dashboard or state API shows.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator

import optuna
from optuna.trial import TrialState

from pet_sweep.config import Experiment
from pet_sweep.errors import ConfigError, PetSweepError
from pet_sweep.progress import Progress
from pet_sweep.sweep.budget import Budget, WorkerRole, cap_reached
from pet_sweep.sweep.lifecycle import clean_leftovers, fail_and_retry
from pet_sweep.sweep.parent import close_dead_runs, close_parent_run, open_parent_run
from pet_sweep.sweep.records import WORKER_ATTR, StoppedBy, SweepResult, TrialOutcome, best_of, worker_line
from pet_sweep.sweep.storage import GRPC_PREFIX, StaleTrialHandler, open_study
from pet_sweep.tracking import Tracker, check_server
from pet_sweep.train.data import check_data

INSTALL_HINT = "the Ray engine needs ray: pip install 'pet-sweep[ray]'"
CLEANUP_S = 60.0  # after Ctrl-C: how long the cancelled workers get to close their trials


def import_ray() -> Any:
    try:
        import ray  # heavy and optional: only the Ray engine needs it
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return ray


def check_resources(n_workers: int, cpus_per_worker: float, gpus_per_worker: float) -> None:
    if n_workers < 1:
        raise ConfigError(f"--workers must be >= 1, but got {n_workers}")
    if not cpus_per_worker > 0:
        raise ConfigError(f"cpus_per_worker must be > 0, but got {cpus_per_worker:g}")
    if gpus_per_worker < 0 or (gpus_per_worker > 1 and gpus_per_worker != int(gpus_per_worker)):
        raise ConfigError(f"gpus_per_worker must be a fraction of one GPU or a whole number, "
                          f"but got {gpus_per_worker:g}")


def run_on_ray(exp: Experiment, n_workers: int, *, address: str | None = None, cpus_per_worker: float = 1,
               gpus_per_worker: float = 0, max_retries: int = 3, storage_proxy: bool = False,
               echo: Callable[[str], None] = print, warn: Callable[[str], None] | None = None,
               progress: Progress | None = None) -> SweepResult:
    """Run `exp`'s sweep in `n_workers` Ray tasks sharing one budget.

    `address`: the cluster's (``auto`` from a node of it, ``ray://head:10001``); None
    joins the Ray this process is connected to, or the one RAY_ADDRESS names, else
    starts a local Ray for this run. `max_retries`: how many times Ray starts a worker
    again whose process or node died. `storage_proxy`: the workers reach the study
    through Optuna's gRPC proxy, served by this process on its Ray node address.
    `echo` gets the driver's notes and the workers' lines (`w0| ...`); `progress`, when
    given, the workers' trial events too (the caller closes it); `warn` (default `echo`)
    a line per worker that ended with an error.
    """

    ray = import_ray()
    check_resources(n_workers, cpus_per_worker, gpus_per_worker)
    if storage_proxy:
        from pet_sweep.launch.storage_proxy import check_proxied  # heavy: grpc, only with --storage-proxy

        check_proxied(exp)
    check_server(exp.tracking_uri)  # an MLflow server that is down: said in seconds
    check_data(exp)  # a data error stops everything before any study or run exists
    joined = not ray.is_initialized()
    if joined:
        try:
            ray.init(address=address, log_to_driver=True)
        except (ConnectionError, ValueError, RuntimeError) as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(f"cannot connect to the Ray cluster at {address}: {first}") from None
    relay = Relay(echo, warn or echo, progress)
    try:
        return _drive(ray, exp, n_workers, (cpus_per_worker, gpus_per_worker, max_retries), storage_proxy, relay)
    finally:
        if joined:
            ray.shutdown()


class Relay:
    """Where the workers' lines and trial events go on the driver: each line, prefixed by
    its worker (`w0| `), to `echo`; the events to the progress display, when there is one
    (the status line; the lines `--quiet` and `--verbose` show or hide)."""

    def __init__(self, echo: Callable[[str], None], warn: Callable[[str], None], progress: Progress | None) -> None:
        self.echo, self.warn, self.progress = echo, warn, progress

    def __call__(self, events: list[tuple[Any, ...]]) -> None:
        for kind, index, *args in events:
            if kind == "line":
                self.echo(worker_line(index, args[0]))
            elif self.progress is not None:  # trial_started, epoch_done, trial_finished
                getattr(self.progress, kind)(*args)


@contextlib.contextmanager
def _workers_view(ray: Any, exp: Experiment, proxy: bool, echo: Callable[[str], None]) -> Iterator[Experiment]:
    """The experiment as the workers get it: as is, or with the storage proxy (run meanwhile) as its storage."""
    if not proxy:
        yield exp
        return
    from pet_sweep.launch.storage_proxy import storage_proxy  # heavy: grpc, only with --storage-proxy

    host = ray.util.get_node_ip_address()  # the address the other nodes reach this one at
    with storage_proxy(exp, host) as seen:
        echo(f"proxy        Optuna's gRPC storage proxy for the workers at {seen.storage_url[len(GRPC_PREFIX):]}")
        yield seen


def _drive(ray: Any, exp: Experiment, n_workers: int, resources: tuple[float, float, int], proxy: bool,
           relay: Relay) -> SweepResult:
    """The supervisor's part, as launch.local does it: study and parent run, workers, the end."""
    echo = relay.echo
    study = open_study(exp)  # the driver creates the study and the parent run: no worker races for them
    cleaned = clean_leftovers([exp])
    if cleaned:
        echo(cleaned)
    tracker = Tracker(exp.tracking_uri, exp.tracking_experiment)
    parent = open_parent_run(exp, study, tracker)
    status = "FAILED"
    try:
        with _workers_view(ray, exp, proxy, echo) as seen:
            ended = _run_workers(ray, seen, n_workers, parent, *resources, relay)
        orphans = _fail_orphans(study, exp.config.faults.max_retry, ended.processes)
        if orphans:
            echo(f"retry        trial(s) {', '.join(map(str, orphans))} of dead workers: "
                 "failed now, queued to run again in the next `pet-sweep run`")
        result = ended.result(exp, study, parent)
        status = "KILLED" if ended.interrupted else "FINISHED" if result.finished else "FAILED"
    finally:
        closed = close_dead_runs(study, tracker)
        close_parent_run(study, tracker, parent, status)
    if closed:
        echo(f"closed       {closed} MLflow run(s) a dead worker left running")
    return result


class Ended:
    """What the workers of one invocation ended with."""

    def __init__(self, role: WorkerRole, results: list[SweepResult], errors: list[BaseException],
                 interrupted: bool, processes: set[str]) -> None:
        self.role, self.results, self.errors = role, results, errors
        self.interrupted, self.processes = interrupted, processes

    def result(self, exp: Experiment, study: optuna.Study, parent: str) -> SweepResult:
        """The invocation's SweepResult, counted from the storage (as one process counts it)."""
        n_trials = exp.config.budget.n_trials
        budget = Budget(self.role, n_trials)
        trials = study.get_trials(deepcopy=False)
        if not self.results and self.errors and not self.interrupted:
            first = self.errors[0]
            if isinstance(first, PetSweepError):  # every worker failed the same way: the CLI says it
                raise first
        said: dict[int, TrialOutcome] = {t.number: t for r in self.results for t in r.trials}
        return SweepResult(exp.study_name, parent, ran=budget.used(trials), finished=budget.finished(trials),
                           best=best_of(study), stopped_by=self._stopped_by(budget, trials, exp),
                           left=budget.left(trials), trials=[said[n] for n in sorted(said)])

    def _stopped_by(self, budget: Budget, trials: list[Any], exp: Experiment) -> StoppedBy:
        said = {r.stopped_by for r in self.results}
        if self.interrupted:
            return "interrupt"
        if budget.used(trials) >= budget.n_trials:
            return "budget"
        if "cap" in said or cap_reached(trials, exp.config.budget.max_trials):
            return "cap"
        if "converged" in said:
            return "converged"
        return "timeout" if "timeout" in said else "workers"


def _run_workers(ray: Any, exp: Experiment, n_workers: int, parent: str, cpus: float, gpus: float,
                 max_retries: int, relay: Relay) -> Ended:
    """Start the tasks, relay their lines until they end; Ctrl-C cancels them."""
    # optional: ray (and the worker side, which imports it)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pet_sweep.launch.local import worker_threads
    from pet_sweep.launch.ray_worker import Coordinator, RayClaimLock, call, run_worker

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)  # goes with the driver
    coordinator = ray.remote(Coordinator).options(num_cpus=0, scheduling_strategy=here).remote()
    invocation = WorkerRole().invocation
    threads = worker_threads(int(cpus)) if not gpus else None  # the user's OMP_NUM_THREADS wins
    roles = [WorkerRole(invocation, i, n_workers, parent, threads, claim_lock=RayClaimLock(coordinator))
             for i in range(n_workers)]
    exp_box = [ray.put(exp)]  # a reference in a list: the task's arguments show no URL
    task = ray.remote(max_calls=1)(run_worker)  # a fresh process per worker: its memory and connections freed
    refs = [task.options(name=f"pet-sweep-w{role.index}", num_cpus=cpus, num_gpus=gpus, max_retries=max_retries)
            .remote(exp_box, role, coordinator) for role in roles]
    where = f"{gpus:g} GPU" if gpus else f"{cpus:g} CPU, {threads} thread(s)"
    nodes = sum(1 for node in ray.nodes() if node["Alive"])
    relay.echo(f"ray          {n_workers} worker(s) of {where} each, on {nodes} node(s)")
    interrupted = _wait(ray, refs, coordinator, call, relay)
    results: list[SweepResult] = []
    errors: list[BaseException] = []
    for index, ref in enumerate(refs):
        try:
            results.append(ray.get(ref))
        except ray.exceptions.TaskCancelledError:
            pass
        except ray.exceptions.RayError as err:
            cause = getattr(err, "cause", None)
            errors.append(cause if isinstance(cause, BaseException) else err)
            first = str(errors[-1]).splitlines()[0] if str(errors[-1]) else type(errors[-1]).__name__
            relay.warn(f"warning      worker {index} failed: {first}")
    started, _ = call(coordinator.roll)
    return Ended(roles[0], results, errors, interrupted, set(started))


def _wait(ray: Any, refs: list[Any], coordinator: Any, call: Callable[..., Any], relay: Relay) -> bool:
    """Relay the workers' lines and events until every task ended; True if Ctrl-C stopped them.

    Ctrl-C asks every worker to stop (its trial ends FAIL "interrupted", its loop returns);
    a worker still running `CLEANUP_S` later is cancelled outright.
    """
    pending, deadline = list(refs), None
    while pending:
        try:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
            relay(call(coordinator.drain))
            if deadline is not None and time.monotonic() > deadline:
                for ref in pending:
                    ray.cancel(ref, force=True)
                deadline = float("inf")
        except KeyboardInterrupt:
            if deadline is None:  # a second Ctrl-C is not forwarded: it would cut the workers' cleanup short
                deadline = time.monotonic() + CLEANUP_S
                call(coordinator.stop)
    relay(call(coordinator.drain))
    return deadline is not None


def _fail_orphans(study: optuna.Study, max_retry: int, processes: set[str]) -> list[int]:
    """Fail the trials our dead workers left RUNNING and queue their retry (their runs
    are closed by close_dead_runs): every worker has ended, so none can still run them."""
    handler = StaleTrialHandler(max_retry)
    return [trial.number for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if trial.user_attrs.get(WORKER_ATTR) in processes and fail_and_retry(study, trial.number, handler)]
