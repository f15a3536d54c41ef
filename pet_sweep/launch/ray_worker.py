"""The worker side of a sweep on Ray: one Ray task runs one worker's sweep loop.

Each invocation has one `Coordinator` (a small Ray actor beside the driver). It is
the claim lock that spans machines (a lease, renewed while held, so a holder killed
with the lock frees it after `LEASE_S`), it carries the workers' lines and trial events
to the driver (`Events`), and it keeps who ran a worker (host:pid, as the trials'
`worker` attr says), so a worker Ray started again knows the process it replaces.

Nothing secret travels in a task's arguments: the Experiment (with the storage and
tracking URLs) comes from the object store, handed over as a reference.
"""

from __future__ import annotations

import _thread
import asyncio
import socket
import threading
import time
import uuid
from typing import Any

import optuna
import ray
from optuna.trial import TrialState

from pet_sweep.sweep.budget import WorkerRole, this_process
from pet_sweep.sweep.lifecycle import fail_and_retry
from pet_sweep.sweep.loop import run_sweep
from pet_sweep.sweep.records import WORKER_ATTR, EpochRecord, SweepResult, TrialOutcome
from pet_sweep.sweep.storage import StaleTrialHandler, has_heartbeats, make_storage, quiet_optuna
from pet_sweep.tracking import RUN_ID_ATTR, Tracker
from pet_sweep.train import quiet_fastai_import

LEASE_S = 20.0  # a claim whose holder stopped renewing for this long is free again (holder killed)
RENEW_S = 2.0
POLL_S = 1.0    # how often a worker asks whether the driver was interrupted

NODE_ID_ATTR = "ray_node_id"    # trial user attrs: where the trial ran
HOSTNAME_ATTR = "ray_hostname"
NODE_TAGS = {NODE_ID_ATTR: "ray.node_id", HOSTNAME_ATTR: "ray.hostname"}  # the same, as MLflow tags


def call(method: Any, *args: Any, tries: int = 5) -> Any:
    """`ray.get(method.remote(*args))`, again while the actor is briefly unreachable (a node of
    the cluster went away meanwhile); every coordinator method may run twice."""
    for attempt in range(tries):
        try:
            return ray.get(method.remote(*args))
        except ray.exceptions.ActorUnavailableError:
            if attempt == tries - 1:
                raise
            time.sleep(0.5 * 2 ** attempt)


class Coordinator:
    """One invocation's claim lock, line queue and roll of worker processes (a Ray actor)."""

    def __init__(self, lease_s: float = LEASE_S) -> None:
        self.lease_s = lease_s
        self.holder: str | None = None
        self.expires = 0.0
        self.events: list[tuple[Any, ...]] = []  # (kind, worker index, *args): see `Events`
        self.processes: dict[str, int] = {}  # host:pid -> worker index
        self.finished: set[str] = set()
        self.stopping = False  # Ctrl-C on the driver: every worker stops its trial and its loop

    async def stop(self) -> None:
        self.stopping = True

    async def should_stop(self) -> bool:
        return self.stopping

    async def acquire(self, token: str) -> None:
        while not self._take(token):
            await asyncio.sleep(0.05)

    def _take(self, token: str) -> bool:
        now = time.monotonic()
        if self.holder not in (None, token) and now < self.expires:  # the same token: a call retried
            return False
        self.holder, self.expires = token, now + self.lease_s
        return True

    async def renew(self, token: str) -> bool:
        if self.holder != token:
            return False
        self.expires = time.monotonic() + self.lease_s
        return True

    async def release(self, token: str) -> None:
        if self.holder == token:
            self.holder = None

    async def say(self, event: tuple[Any, ...]) -> None:
        self.events.append(event)

    async def drain(self) -> list[tuple[Any, ...]]:
        events, self.events = self.events, []
        return events

    async def started(self, process: str, index: int) -> list[str]:
        """Record a worker's process; returns the earlier processes of the same worker (Ray
        starts a task again only when its process or node died)."""
        before = [p for p, i in self.processes.items() if i == index and p != process]
        self.processes[process] = index
        return before

    async def ended(self, process: str) -> None:
        self.finished.add(process)

    async def roll(self) -> tuple[dict[str, int], set[str]]:
        """(every worker process that started: its index, those that ended their sweep loop)."""
        return dict(self.processes), set(self.finished)


class RayClaimLock:
    """`WorkerRole.claim_lock` for workers on several machines: the coordinator's lease.

    While held, a thread renews the lease; a holder killed with the lock stops
    renewing, and the next worker gets it `LEASE_S` later.
    """

    def __init__(self, coordinator: Any) -> None:
        self.coordinator = coordinator
        self._token: str | None = None
        self._stop = threading.Event()

    def __reduce__(self) -> tuple[Any, ...]:  # travels to the workers unheld
        return (RayClaimLock, (self.coordinator,))

    def acquire(self) -> None:
        token = uuid.uuid4().hex
        call(self.coordinator.acquire, token)
        self._token, self._stop = token, threading.Event()
        threading.Thread(target=self._renew, args=(token, self._stop), daemon=True).start()

    def _renew(self, token: str, stop: threading.Event) -> None:
        while not stop.wait(RENEW_S):
            if not call(self.coordinator.renew, token):
                return

    def release(self) -> None:
        self._stop.set()
        if self._token is not None:
            call(self.coordinator.release, self._token)
            self._token = None


class NodeRecorder:
    """A trial listener that writes where each trial runs: the Ray node id and the host
    name, as trial user attrs and as tags of the trial's MLflow run."""

    def __init__(self, exp: Any) -> None:
        self.study_name = exp.study_name
        self.where = {NODE_ID_ATTR: ray.get_runtime_context().get_node_id(), HOSTNAME_ATTR: socket.gethostname()}
        self.storage = make_storage(exp.storage_url, exp.config.faults)
        self.tracker = Tracker(exp.tracking_uri, exp.tracking_experiment)

    def trial_started(self, number: int, params: dict[str, Any]) -> None:
        # the storage's public interface: the trial object itself stays inside the objective
        study_id = self.storage.get_study_id_from_name(self.study_name)
        trial_id = self.storage.get_trial_id_from_study_id_trial_number(study_id, number)
        for key, value in self.where.items():
            self.storage.set_trial_user_attr(trial_id, key, value)
        run_id = self.storage.get_trial(trial_id).user_attrs.get(RUN_ID_ATTR)
        if run_id:  # update_sweep: MLflow's log_batch, for any run
            self.tracker.update_sweep(run_id, {}, {NODE_TAGS[k]: v for k, v in self.where.items()})

    def trial_finished(self, outcome: TrialOutcome, best: tuple[float, int] | None) -> None:
        pass


class Interrupter:
    """Ctrl-C on the driver, brought to this worker as a KeyboardInterrupt in its main thread.

    A thread asks the coordinator every `POLL_S` and interrupts the main thread once, as
    Ctrl-C would (the trial ends FAIL "interrupted", run_sweep returns). An interrupt that
    lands where Python ignores it (a garbage-collector callback) would leave the worker
    sweeping, so the listeners raise it again at the next epoch or trial boundary.
    """

    def __init__(self, coordinator: Any) -> None:
        self.coordinator = coordinator
        self.requested = threading.Event()
        self.done = threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while not self.done.wait(POLL_S):
            if call(self.coordinator.should_stop):
                self.requested.set()
                _thread.interrupt_main()
                return

    def check(self, *args: Any) -> None:
        if self.requested.is_set() and not self.done.is_set():
            raise KeyboardInterrupt

    def epoch_done(self, number: int, record: EpochRecord) -> None:
        self.check()

    def trial_started(self, number: int, params: dict[str, Any]) -> None:
        self.check()

    def trial_finished(self, outcome: TrialOutcome, best: tuple[float, int] | None) -> None:
        self.check()


class Events:
    """This worker's lines and trial events, sent to the driver through the coordinator as
    (kind, worker index, *args); the driver shows them as a local run shows its own
    (`launch.ray.Relay`): `line`, and the progress hooks `trial_started`, `epoch_done`,
    `trial_finished`."""

    def __init__(self, coordinator: Any, index: int) -> None:
        self.coordinator, self.index = coordinator, index

    def _send(self, kind: str, *args: Any) -> None:
        self.coordinator.say.remote((kind, self.index, *args))

    def echo(self, text: str) -> None:
        for line in text.splitlines() or [""]:
            self._send("line", line)

    def trial_started(self, number: int, params: dict[str, Any]) -> None:
        self._send("trial_started", number, params)

    def epoch_done(self, number: int, record: EpochRecord) -> None:
        self._send("epoch_done", number, record)

    def trial_finished(self, outcome: TrialOutcome, best: tuple[float, int] | None) -> None:
        self._send("trial_finished", outcome, best)


def take_over(exp: Any, dead: list[str], echo: Any) -> list[int]:
    """Fail the trials that this worker's dead earlier processes left RUNNING and queue their
    retry, as Optuna's heartbeat callback does where there are heartbeats (the storage
    proxy has none). Returns their numbers."""
    if not dead or has_heartbeats(exp.storage_url):  # heartbeats: the stale trial is failed after the grace period
        return []
    tracker = Tracker(exp.tracking_uri, exp.tracking_experiment)
    handler = StaleTrialHandler(exp.config.faults.max_retry, "its worker died; Ray started the worker again",
                                tracker=lambda: tracker, echo=echo)
    study = optuna.load_study(study_name=exp.study_name, storage=make_storage(exp.storage_url, exp.config.faults))
    return [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if t.user_attrs.get(WORKER_ATTR) in dead and fail_and_retry(study, t.number, handler)]


def run_worker(exp_box: list[Any], role: WorkerRole, coordinator: Any) -> SweepResult:
    """One worker of the invocation (a Ray task): the sweep loop, its lines and events sent to the driver.

    `exp_box` holds the Experiment's object reference; in a list, so that Ray hands the
    reference over instead of the value, and the task's arguments show no URL.
    """
    quiet_optuna()  # the driver prints one line per trial, as a local run does
    quiet_fastai_import()
    exp = ray.get(exp_box[0])
    me = this_process()
    events = Events(coordinator, role.index)
    take_over(exp, call(coordinator.started, me, role.index), events.echo)
    interrupter = Interrupter(coordinator)
    try:
        return run_sweep(exp, echo=events.echo, epoch_listeners=(events.epoch_done, interrupter.epoch_done),
                         trial_listeners=(NodeRecorder(exp), events, interrupter), role=role)
    finally:
        interrupter.done.set()
        call(coordinator.ended, me)
