"""Simulated workers for `bench.scale --simulated`: pet-sweep's real sweep loop, with a stand-in
for the training alone.

- `StandIn` is a `sweep.training.Training` that trains nothing: each trial reports its epochs
  (one every `pace` seconds, error rates that fall with the epochs and depend on the
  learning rates) and a final value, through the same listeners the fastai recipe calls
  (the MLflow epoch logger, Optuna's report and pruner). It imports neither torch nor fastai.
  For benchmarks only: a sweep always trains with `Training()`.
- `Zygote` starts the workers of `launch.local.supervise` (its `start` argument) by forking
  one process that has imported everything once, so a worker costs its own pages, not
  another interpreter's start-up (about 200 MB and 3 s of CPU each with mlflow, Optuna and
  SQLAlchemy). It forks before the supervisor opens any connection, so no worker
  inherits a database or HTTP connection.
- `Probe` times Optuna's ask and tell in the worker processes of this benchmark (wrappers
  installed there, in no pet-sweep module) and the stand-in times each epoch's report.
"""

from __future__ import annotations

import functools
import gc
import json
import math
import os
import random
import select
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import optuna

from pet_sweep.config import Experiment, ModelConfig
from pet_sweep.params import TrialParams
from pet_sweep.space import Anchors
from pet_sweep.sweep.budget import WorkerRole
from pet_sweep.sweep.records import EpochListener, EpochRecord
from pet_sweep.sweep.training import Training
from pet_sweep.tracking import Tracker
from pet_sweep.train.data import SplitFingerprint, Splits, split_fingerprint


class Probe:
    """Latencies of one worker process, one JSON line each ({"op": ..., "s": ...}) in its file."""

    def __init__(self, path: Path) -> None:
        self.file = path.open("a", buffering=1)

    def add(self, op: str, seconds: float) -> None:
        self.file.write(json.dumps({"op": op, "s": round(seconds, 6)}) + "\n")

    def timed(self, op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(op, time.perf_counter() - started)
        return wrapper

    def install(self) -> None:
        """Wrap Optuna's ask and the tell `study.optimize` calls, in this (benchmark worker) process.

        `_tell_with_warning` is Optuna's private function that `optimize` tells with (it does not
        call `Study.tell`); a missing one stops the benchmark here rather than time nothing.
        """
        from optuna.study import _optimize  # private: see above

        if not hasattr(_optimize, "_tell_with_warning"):
            raise SystemExit(f"optuna {optuna.__version__} has no study._optimize._tell_with_warning to time")
        optuna.study.Study.ask = self.timed("ask", optuna.study.Study.ask)
        _optimize._tell_with_warning = self.timed("tell", _optimize._tell_with_warning)


@dataclass(frozen=True)
class _Loaders:
    device: str = "cpu"


@dataclass(frozen=True)
class _Data:
    """What the stand-in's worker "builds": no images, a split fingerprint of made-up names."""

    dls: _Loaders
    fingerprint: SplitFingerprint
    n_valid: int  # the stand-in's "validation items", as `selection` reads them
    loader_workers: int = 0

    def describe(self, data: Any) -> str:
        return "simulated: no images (bench.simulated.StandIn)"


@dataclass(frozen=True)
class _NoCheckpoints:
    path: None = None
    resume: None = None


@dataclass
class _Result:
    history: list[EpochRecord]
    valid_preds: list[int]
    valid_targets: list[int]
    costs: dict[str, float] = field(default_factory=dict)
    cost_seconds: float = 0.0
    learner: Any = None  # nothing trained, so nothing for `keep_winner` to keep

    @property
    def error_rate(self) -> float:
        return self.history[-1].error_rate


class StandIn(Training):
    """Training that trains nothing: `params.freeze_epochs + params.epochs` epochs, one every `pace` s.

    The error rate is lowest near base_lr = lr_hi = 3e-3 and falls with each epoch, so the
    pruner and the sampler see a landscape; `valid_items` predictions are stored per trial, as a
    real trial stores its validation predictions.
    """

    def __init__(self, pace: float, valid_items: int = 100, probe: Probe | None = None) -> None:
        self.pace, self.valid_items, self.probe = pace, valid_items, probe

    def open_data(self, exp: Experiment, role: WorkerRole) -> _Data:
        names = tuple(Path(f"{i % 10}_{i}.png") for i in range(10 * self.valid_items))
        splits = Splits(names[self.valid_items:], names[:self.valid_items], ())
        return _Data(_Loaders(), split_fingerprint(splits, Path(".")), len(splits.valid))

    def starting_points(self, exp: Experiment, data: Any, study: optuna.Study, tracker: Tracker, parent: str,
                        echo: Callable[[str], None]) -> tuple[dict[str, Any], Anchors]:
        return {}, {}

    def precision(self, requested: str, device: Any) -> str:
        return "fp32"

    def checkpoint_plan(self, exp: Experiment, trial: optuna.Trial, freeze_epochs: int) -> Any:
        return _NoCheckpoints()

    def threads(self) -> int:
        return 1  # nothing trains: torch stays unimported

    def fine_tune(self, dls: Any, params: TrialParams, model: ModelConfig, *, seed: int,
                  listeners: Sequence[EpochListener], checkpoint: Any, cbs: Sequence[Any],
                  lr_find: Any, keep_learner: bool = False) -> _Result:
        def miss(lr: float) -> float:
            return abs(math.log10(lr / 3e-3))

        level = 0.02 + 0.1 * (miss(params.lr_hi) + miss(params.base_lr or params.lr_hi))
        rng = random.Random(f"{params}")
        history: list[EpochRecord] = []
        n = params.freeze_epochs + params.epochs
        for epoch in range(n):
            time.sleep(self.pace)
            error = min(0.9, level + 0.3 * 0.5 ** epoch + rng.uniform(0, 0.01))
            phase = "frozen" if epoch < params.freeze_epochs else "unfrozen"
            history.append(EpochRecord(epoch, phase, 2 * error, 2.2 * error, error, self.pace))
            for op, listener in zip(("log", "report"), listeners):  # the MLflow logger, then Optuna's report
                (self.probe.timed(op, listener) if self.probe else listener)(history[-1])
        wrong = round(history[-1].error_rate * self.valid_items)
        targets = [i % 10 for i in range(self.valid_items)]
        return _Result(history, [(t + 1) % 10 if i < wrong else t for i, t in enumerate(targets)], targets)

    def out_of_memory(self) -> type[BaseException]:
        return MemoryError


class Forked:
    """A worker forked by the `Zygote`, as `launch.local.wait_workers` uses a `subprocess.Popen`."""

    def __init__(self, pid: int) -> None:
        self.pid, self.returncode = pid, None
        self.ended = threading.Event()

    def wait(self) -> int:
        self.ended.wait()
        return self.returncode

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)


class Zygote:
    """A process forked early (imports done, no connection, no thread) that forks the workers.

    `start` is `launch.local.supervise`'s `start`: each worker is `launch.local.work` with
    the stand-in, its lines in `folder/worker-<index>.log`, its latencies in
    `folder/timings-<pid>.jsonl`.
    """

    def __init__(self, folder: Path, pace: float, valid_items: int) -> None:
        self.folder = folder
        _preload()
        command_r, self._command_w = os.pipe()
        self._reply_r, reply_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the zygote
            os.close(self._command_w)
            os.close(self._reply_r)
            code = _serve(command_r, reply_w, folder, pace, valid_items)
            os._exit(code)
        os.close(command_r)
        os.close(reply_w)
        self.workers: dict[int, Forked] = {}
        self._started: list[int] = []
        self._lock = threading.Condition()
        threading.Thread(target=self._replies, daemon=True).start()

    def _replies(self) -> None:
        with os.fdopen(self._reply_r) as replies:
            for line in replies:
                kind, pid, code = line.split()
                with self._lock:
                    if kind == "started":
                        self.workers[int(pid)] = Forked(int(pid))
                        self._started.append(int(pid))
                    else:
                        worker = self.workers[int(pid)]
                        worker.returncode = int(code)
                        worker.ended.set()
                    self._lock.notify_all()

    def start(self, exp: Experiment, roles: list[WorkerRole], envs: list[dict[str, str]], echo: Any,
              callbacks: tuple[Any, ...] = ()) -> tuple[list[Forked], list[threading.Thread]]:
        """Fork one worker per role (`envs` and `callbacks` unused: the stand-in takes no threads or callbacks)."""
        import pickle

        payload = pickle.dumps((exp, [role.encode() for role in roles])).hex()
        with self._lock:
            first = len(self._started)
            os.write(self._command_w, (payload + "\n").encode())
            while len(self._started) < first + len(roles):
                self._lock.wait()
            return [self.workers[pid] for pid in self._started[first:]], []

    def close(self) -> None:
        os.close(self._command_w)  # the zygote exits once its last worker ended
        os.waitpid(self.pid, 0)


def _preload() -> None:
    """What every worker imports, imported once before the fork, so the workers share its pages."""
    import matplotlib

    matplotlib.use("Agg")
    import mlflow.tracking  # noqa: F401
    import psycopg2  # noqa: F401

    import pet_sweep.launch.local  # noqa: F401
    import pet_sweep.report.figures  # noqa: F401
    import pet_sweep.sweep.loop  # noqa: F401


def _serve(command_r: int, reply_w: int, folder: Path, pace: float, valid_items: int) -> int:
    """The zygote's loop: fork the workers asked for, say when each starts and ends."""
    import pickle

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor forwards signals to the workers
    # The imported modules' objects out of the collector's reach: a collection writes to every
    # object it visits, which copies the page it lies on into each forked worker (copy-on-write)
    gc.freeze()
    commands, children, buffer, closed = os.fdopen(command_r, "rb", buffering=0), set(), b"", False
    while not closed or children:
        ready, _, _ = select.select([] if closed else [commands], [], [], 0.2)
        if ready:
            chunk = commands.read(1 << 20)
            closed = not chunk
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                exp, roles = pickle.loads(bytes.fromhex(line.decode()))
                for role in roles:
                    pid = os.fork()
                    if pid == 0:
                        os.close(reply_w)
                        os._exit(_worker(exp, role, folder, pace, valid_items))
                    children.add(pid)
                    os.write(reply_w, f"started {pid} 0\n".encode())
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            children.discard(pid)
            os.write(reply_w, f"exited {pid} {os.waitstatus_to_exitcode(status)}\n".encode())
    return 0


def _worker(exp: Experiment, role: str, folder: Path, pace: float, valid_items: int) -> int:
    """One forked worker: the supervisor's worker (`launch.local.work`) with the stand-in."""
    from pet_sweep.launch.local import work
    from pet_sweep.sweep.storage import quiet_optuna

    os.setsid()  # as `start_workers` starts each worker in a session of its own
    signal.signal(signal.SIGINT, signal.default_int_handler)
    index = role.split(":")[1]
    log = (folder / f"worker-{index}.log").open("a", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    if "torch" in sys.modules:  # forked from a process that ran torch (a test's): its OpenMP pool did not
        sys.modules["torch"].set_num_threads(1)  # come with the fork, and a parallel op would wait on it forever
    probe = Probe(folder / f"timings-{os.getpid()}.jsonl")
    probe.install()
    quiet_optuna()
    try:
        result = work(exp, role, lambda line: print(line, flush=True), training=StandIn(pace, valid_items, probe))
    except BaseException as err:  # the worker's traceback, in its log
        import traceback

        traceback.print_exc()
        sys.stdout.flush()
        return 130 if isinstance(err, KeyboardInterrupt) else 1
    sys.stdout.flush()
    return 0 if result.stopped_by != "interrupt" else 130
