"""One case of `bench.scale --simulated` (a path and a number of workers): run it, then check and
measure it from the stores themselves. See bench/scale_sim.py."""

from __future__ import annotations

import os
import random
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from bench.common import experiment_in
from bench.scale_sim import OPTUNA_DB, MlflowServer, Postgres, Proxy, Sampler, tree
from bench.simulated import Zygote
from pet_sweep.launch.local import supervise
from pet_sweep.sweep.budget import is_retry
from pet_sweep.sweep.records import WORKER_ATTR, retried_trial_number


def space(epochs: int) -> dict[str, Any]:
    return {"arch": "resnet18", "base_lr": {"low": 1e-3, "high": 3e-2, "log": True},
            "lr_hi": {"low": 1e-3, "high": 3e-2, "log": True}, "lr_mult": 10.0,
            "freeze_epochs": 1, "epochs": max(1, epochs - 1)}


@dataclass(frozen=True)
class Row:
    path: str
    workers: int
    budget: int
    finished: int      # COMPLETE or PRUNED
    slots: int         # trials that used a slot (retries excluded)
    duplicates: int    # finished twice: a trial and its retry both finished
    lost: int          # failed trials with no finished retry
    killed: int        # workers killed (--faults)
    retried: int       # trials failed because their worker died, and retried
    mlflow_running: int
    seconds: float
    trials_per_s: float
    latency: dict[str, tuple[float, float, int]]  # op -> (p50 s, p99 s, samples)
    connections: dict[str, int]
    mlflow_rps: float
    mlflow_errors: tuple[int, int]  # (4xx, 5xx)
    pss_mb: dict[str, float]
    cpu_s: dict[str, float]
    pg_restart_s: float | None


def _percentiles(values: list[float]) -> tuple[float, float, int]:
    if len(values) < 2:
        return (values[0] if values else float("nan"), values[0] if values else float("nan"), len(values))
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return statistics.median(values), cuts[98], len(values)


def latencies(folder: Path, pids: list[int]) -> dict[str, tuple[float, float, int]]:
    import json

    by_op: dict[str, list[float]] = {}
    for pid in pids:
        path = folder / f"timings-{pid}.jsonl"
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    item = json.loads(line)
                except ValueError:  # the last line of a worker killed while writing it
                    continue
                by_op.setdefault(item["op"], []).append(item["s"])
    return {op: _percentiles(values) for op, values in sorted(by_op.items())}


class Faults:
    """kill -9 a tenth of the workers once a quarter of the budget has finished; restart
    PostgreSQL once half of it has."""

    def __init__(self, pg: Postgres, zygote: Zygote, study: str, budget: int, first: int) -> None:
        self.pg, self.zygote, self.study, self.budget, self.first = pg, zygote, study, budget, first
        self.killed: list[int] = []
        self.restart_s: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _finished(self) -> int:
        rows = self.pg.sql(OPTUNA_DB, "SELECT count(*) FROM trials t JOIN studies s ON s.study_id = t.study_id "
                           f"WHERE s.study_name = '{self.study}' AND t.state IN ('COMPLETE', 'PRUNED')")
        return rows[0][0]

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            try:
                done = self._finished()
            except Exception:  # no tables yet, or restarting
                continue
            if not self.killed and done >= self.budget // 4:
                alive = [w for w in self.zygote.workers.values() if w.returncode is None
                         and w.pid in self.zygote._started[self.first:]]
                for worker in random.Random(0).sample(alive, max(1, len(alive) // 10)):
                    os.kill(worker.pid, 9)
                    self.killed.append(worker.pid)
            if self.killed and self.restart_s is None and done >= self.budget // 2:
                self.restart_s = self.pg.restart()
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_case(args: Any, zygote: Zygote, pg: Postgres, mlflow: MlflowServer, path: str, n: int, folder: Path) -> Row:
    name = f"sim-{path}-{n}" + ("-faults" if args.faults else "")
    direct = pg.url(OPTUNA_DB)
    proxy = Proxy(direct) if path == "proxy" else None
    try:
        exp = experiment_in(folder / name, {
            "storage": proxy.url if proxy else direct, "tracking": {"uri": mlflow.uri},
            "budget": {"n_trials": args.trials}, "sampler": {"name": "random"},
            "faults": {"heartbeat_interval": 5, "grace_period": 20, "max_retry": 3},
            "data": {"source": "digits", "limit": 100}, "model": {"pretrained": False}}, space(args.epochs), name)
        first = len(zygote._started)
        groups = {"supervisor": lambda: [os.getpid()], "proxy": lambda: [proxy.proc.pid] if proxy else [],
                  "mlflow": lambda: tree(mlflow.proc.pid),
                  "workers": lambda: [pid for pid in zygote._started[first:] if zygote.workers[pid].returncode is None]}
        requests_before = mlflow.requests()
        cpu_before = os.times()
        sampler = Sampler(pg, groups, every=2.0)
        faults = Faults(pg, zygote, exp.study_name, args.trials, first) if args.faults else None
        log = (folder / f"{name}.log").open("w", buffering=1)
        started = time.perf_counter()
        supervise(exp, n, [], echo=lambda line: log.write(line + "\n"), warn=lambda line: log.write(line + "\n"),
                  start=zygote.start)
        seconds = time.perf_counter() - started
        if faults is not None:
            faults.stop()
        peaks = sampler.stop()
        cpu_after = os.times()
        peaks.cpu_s["supervisor"] = (cpu_after.user + cpu_after.system - cpu_before.user - cpu_before.system
                                     - sampler.own_cpu_s)
        requests = [a - b for a, b in zip(mlflow.requests(), requests_before)]
    finally:
        if proxy is not None:
            proxy.stop()
    return _check(exp, direct, mlflow, path, n, args.trials, seconds, peaks, requests, faults,
                  latencies(folder, zygote._started[first:]))


def _check(exp: Any, storage: str, mlflow: MlflowServer, path: str, n: int, budget: int, seconds: float,
           peaks: Any, requests: list[int], faults: Faults | None, latency: dict[str, Any]) -> Row:
    """What the stores hold once the supervisor returned."""
    from mlflow import MlflowClient

    trials = optuna.load_study(study_name=exp.study_name, storage=storage).get_trials(deepcopy=False)
    done = (TrialState.COMPLETE, TrialState.PRUNED)
    finished = [t for t in trials if t.state in done]
    retry_of = {retried_trial_number(t): t for t in trials if retried_trial_number(t) is not None}

    def ends_finished(number: int) -> bool:  # the trial, or its retry (or the retry's retry), finished
        trial = next(t for t in trials if t.number == number)
        return trial.state in done or (number in retry_of and ends_finished(retry_of[number].number))

    failed = [t for t in trials if t.state == TrialState.FAIL]
    killed = {f"{os.uname().nodename}:{pid}" for pid in (faults.killed if faults else [])}
    client = MlflowClient(mlflow.uri)
    experiment = client.get_experiment_by_name(exp.tracking_experiment)
    running = client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'", max_results=1000)
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in finished if t.datetime_complete]
    span = (max(ends) - min(starts)).total_seconds() if ends else float("nan")
    return Row(path, n, budget, len(finished), sum(1 for t in trials if not is_retry(t)),
               sum(1 for t in finished if t.number in retry_of and retry_of[t.number].state in done),
               sum(1 for t in failed if not ends_finished(t.number)), len(killed),
               sum(1 for t in failed if t.user_attrs.get(WORKER_ATTR) in killed and t.number in retry_of),
               len(running), seconds, len(finished) / span, latency, dict(peaks.connections),
               requests[0] / seconds, (requests[1], requests[2]), dict(peaks.pss_mb), dict(peaks.cpu_s),
               faults.restart_s if faults else None)


def show(rows: list[Row], header: bool) -> str:
    lines = []
    if header:
        lines.append("| path | workers | finished / budget | dup / lost | killed, retried | RUNNING runs | seconds "
                     "| trials/s | ask p50/p99 | report p50/p99 | tell p50/p99 | PG conns (Optuna, MLflow) "
                     "| MLflow req/s (4xx, 5xx) | PSS MB sup/proxy/mlflow/workers | CPU s sup/proxy/mlflow/workers |")
        lines.append("|" + "---|" * 15)
    for r in rows:
        def lat(op: str) -> str:
            p50, p99, _ = r.latency.get(op, (float("nan"), float("nan"), 0))
            return f"{p50 * 1000:.0f} / {p99 * 1000:.0f} ms"

        groups = ("supervisor", "proxy", "mlflow", "workers")
        lines.append(
            f"| {r.path} | {r.workers} | {r.finished} / {r.budget} ({r.slots} slots) | {r.duplicates} / {r.lost} "
            f"| {r.killed}, {r.retried}" + (f" (PG restart {r.pg_restart_s:.1f} s)" if r.pg_restart_s else "")
            + f" | {r.mlflow_running} | {r.seconds:.0f} | {r.trials_per_s:.2f} | {lat('ask')} | {lat('report')} "
            f"| {lat('tell')} | {r.connections.get(OPTUNA_DB, 0)}, {r.connections.get('scale_sim_mlflow', 0)} "
            f"| {r.mlflow_rps:.0f} ({r.mlflow_errors[0]}, {r.mlflow_errors[1]}) "
            f"| {' / '.join(f'{r.pss_mb.get(g, 0):.0f}' for g in groups)} "
            f"| {' / '.join(f'{r.cpu_s.get(g, 0):.0f}' for g in groups)} |")
    return "\n".join(lines)
