"""Trials per hour with 1 and 2 workers: today's local supervisor against a local Ray, side by side.

Each run is a fresh process on fresh stores, timed from its start to its exit, as a user
waits for it: start-up (imports, data, Ray's own start for the Ray engine) included.
The same fixed trials run in every case (one configuration, `--trials` times; torch
threads split between the workers: `cores // workers` each).

    python -m bench.scale [--trials 6] [--workers 1,2] [--engines local,ray] [--limit 300] [--img-size 16]

Prints one row per (engine, workers):
- seconds: from the start of the command to its exit;
- start-up: from the start of the command to the start of its first trial (imports, data,
  the study and the parent run, the workers, and for Ray its own start);
- peak memory: the largest sum, over the command's process tree (for Ray: the driver, Ray's
  daemons and its worker processes, all children of the command), of each process's
  proportional set size (PSS: a page shared by n processes counts 1/n in each, so shared
  libraries are not counted twice), sampled every 0.5 s;
- trials per hour, the speed-up over one worker of the same engine, and Ray's overhead per
  trial against the local engine at the same number of workers, also as a share of a
  one-process sweep's time per trial.

`--simulated N[,N...]` runs instead N simulated workers on real stores (PostgreSQL, an MLflow
server; bench/scale_sim.py says what it measures).

Targets (issue 17): 2 workers >= 1.8x one worker; Ray's overhead <= 5 % of a one-process
sweep of the same trials.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from bench.common import ROOT, header, temp_dir, write_experiment

CONFIG = {"arch": "resnet18", "base_lr": 1e-2, "lr_hi": 1e-2, "lr_mult": 10.0, "freeze_epochs": 1, "epochs": 1}

# the Ray engine's run, in a fresh interpreter as the local engine's is, on a Ray of its own
# ("local": not one already running on this machine, which `--ray` with no address would join)
RAY_RUN = """
import sys
from pet_sweep.config import load_experiment
from pet_sweep.launch.ray import run_on_ray
result = run_on_ray(load_experiment(sys.argv[1]), int(sys.argv[2]), address="local", echo=lambda line: None)
sys.exit(0 if result.finished == result.ran else 1)
"""


@dataclass(frozen=True)
class Measured:
    seconds: float
    startup: float  # to the first trial's start
    peak_mb: float  # the process tree's largest PSS sum


def experiment(folder: Path, trials: int, limit: int, img_size: int) -> Path:
    data = {"source": "digits", "valid_pct": 0.2, "test_pct": 0.0, "limit": limit, "split_seed": 1}
    return write_experiment(folder, {"data": data, "model": {"img_size": img_size, "batch_size": 32,
                                                             "pretrained": False},
                                     "budget": {"n_trials": trials}, "sampler": {"name": "random", "seed": 0},
                                     "seed": 0}, CONFIG)


class TreeMemory:
    """Samples the PSS sum of a process and all its descendants until stopped; keeps the peak."""

    def __init__(self, pid: int) -> None:
        import psutil  # a dependency of ray and of the test extra

        self.psutil, self.root, self.peak = psutil, psutil.Process(pid), 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            total = 0
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except self.psutil.Error:
                return
            for proc in procs:
                try:
                    total += proc.memory_full_info().pss
                except self.psutil.Error:  # ended meanwhile
                    pass
            self.peak = max(self.peak, total)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak / 2**20


def first_trial_start(config: Path) -> datetime:
    import optuna  # heavy: only after the run

    storage = f"sqlite:///{config.parent / 'optuna.db'}"
    trials = optuna.load_study(study_name="bench", storage=storage).get_trials(deepcopy=False)
    return min(t.datetime_start for t in trials if t.datetime_start is not None)


def timed_run(engine: str, workers: int, trials: int, limit: int, img_size: int) -> Measured:
    """A fresh `run` (it must finish every trial): its seconds, start-up and peak memory."""
    config = experiment(temp_dir(f"scale-{engine}-{workers}"), trials, limit, img_size)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if engine == "ray":
        cmd = [sys.executable, "-c", RAY_RUN, str(config), str(workers)]
    else:
        cmd = [sys.executable, "-m", "pet_sweep", "run", "--config", str(config), "--quiet",
               *(["--workers", str(workers)] if workers > 1 else [])]
    launched = datetime.now()  # Optuna's trial times are naive local times
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    memory = TreeMemory(proc.pid)
    out, _ = proc.communicate()
    seconds = time.perf_counter() - started
    peak = memory.stop()
    if proc.returncode != 0:
        raise SystemExit(f"{engine} with {workers} worker(s) failed ({proc.returncode}):\n{out}")
    return Measured(seconds, (first_trial_start(config) - launched).total_seconds(), peak)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if any(arg.startswith("--simulated") for arg in argv):  # many workers, simulated: bench/scale_sim.py
        from bench.scale_sim import main as simulated

        simulated(argv)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--engines", default="local,ray")
    parser.add_argument("--limit", type=int, default=300, help="digits images (of 1797)")
    parser.add_argument("--img-size", type=int, default=16)
    args = parser.parse_args(argv)
    counts = [int(w) for w in args.workers.split(",")]
    engines = args.engines.split(",")
    print(header(f"bench.scale: {args.trials} trials, workers {counts}, engines {engines}"), flush=True)
    runs = {}
    for workers in counts:
        for engine in engines:  # each run said as it ends: a failure later keeps the figures so far
            runs[engine, workers] = run = timed_run(engine, workers, args.trials, args.limit, args.img_size)
            print(f"# {engine} x{workers}: {run.seconds:.1f} s, start-up {run.startup:.1f} s, "
                  f"peak {run.peak_mb:.0f} MB, load average {os.getloadavg()[0]:.1f}", flush=True)
    print(f"{'engine':<7}{'workers':>8}{'seconds':>9}{'start-up':>10}{'peak MB':>9}{'trials/h':>10}"
          f"{'speed-up':>10}{'overhead/trial':>16}")
    one_process = runs.get(("local", 1))
    for (engine, workers), run in runs.items():
        one = runs.get((engine, 1))
        speed_up = f"{one.seconds / run.seconds:.2f}x" if one else "-"
        local = runs.get(("local", workers))
        overhead = "-"
        if engine == "ray" and local:
            per_trial = (run.seconds - local.seconds) / args.trials
            share = f" ({per_trial / (one_process.seconds / args.trials):+.0%})" if one_process else ""
            overhead = f"{per_trial:+.2f}s{share}"
        print(f"{engine:<7}{workers:>8}{run.seconds:>9.1f}{run.startup:>10.1f}{run.peak_mb:>9.0f}"
              f"{args.trials * 3600 / run.seconds:>10.0f}{speed_up:>10}{overhead:>16}")


if __name__ == "__main__":
    main()
