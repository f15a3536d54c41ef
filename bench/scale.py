"""Trials per hour with 1 and 2 workers: today's local supervisor against a local Ray, side by side.

Each run is a fresh process on fresh stores, timed from its start to its exit, as a user
waits for it: start-up (imports, data, Ray's own start for the Ray engine) included.
The same fixed trials run in every case (one configuration, enqueued `--trials` times;
torch threads split between the workers: `cores // workers` each).

    python -m bench.scale [--trials 6] [--workers 1,2] [--engines local,ray] [--limit 300] [--img-size 16]

Prints one row per (engine, workers): seconds, trials per hour, the speed-up over one
worker of the same engine, and Ray's overhead per trial against the local engine at the
same number of workers. Targets (issue 17): 2 workers >= 1.8x one worker; Ray's
overhead <= 5 % of a one-process sweep of the same trials.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import ROOT, header, temp_dir, write_experiment

CONFIG = {"arch": "resnet18", "base_lr": 1e-2, "lr_hi": 1e-2, "lr_mult": 10.0, "freeze_epochs": 1, "epochs": 1}

# the Ray engine's run, in a fresh interpreter as the local engine's is
RAY_RUN = """
import sys
from pet_sweep.config import load_experiment
from pet_sweep.launch.ray import run_on_ray
result = run_on_ray(load_experiment(sys.argv[1]), int(sys.argv[2]), echo=lambda line: None)
sys.exit(0 if result.finished == result.ran else 1)
"""


def experiment(folder: Path, trials: int, limit: int, img_size: int) -> Path:
    data = {"source": "digits", "valid_pct": 0.2, "test_pct": 0.0, "limit": limit, "split_seed": 1}
    return write_experiment(folder, {"data": data, "model": {"img_size": img_size, "batch_size": 32,
                                                             "pretrained": False},
                                     "budget": {"n_trials": trials}, "sampler": {"name": "random", "seed": 0},
                                     "seed": 0}, CONFIG)


def timed_run(engine: str, workers: int, trials: int, limit: int, img_size: int) -> float:
    """Seconds from the start of a fresh `run` to its exit (it must finish every trial)."""
    config = experiment(temp_dir(f"scale-{engine}-{workers}"), trials, limit, img_size)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if engine == "ray":
        cmd = [sys.executable, "-c", RAY_RUN, str(config), str(workers)]
    else:
        cmd = [sys.executable, "-m", "pet_sweep", "run", "--config", str(config), "--quiet",
               *(["--workers", str(workers)] if workers > 1 else [])]
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{engine} with {workers} worker(s) failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--engines", default="local,ray")
    parser.add_argument("--limit", type=int, default=300, help="digits images (of 1797)")
    parser.add_argument("--img-size", type=int, default=16)
    args = parser.parse_args(argv)
    counts = [int(w) for w in args.workers.split(",")]
    engines = args.engines.split(",")
    print(header(f"bench.scale: {args.trials} trials, workers {counts}, engines {engines}"))
    seconds = {(e, w): timed_run(e, w, args.trials, args.limit, args.img_size) for w in counts for e in engines}
    print(f"{'engine':<7}{'workers':>8}{'seconds':>9}{'trials/h':>10}{'speed-up':>10}{'overhead/trial':>16}")
    for (engine, workers), took in seconds.items():
        one = seconds.get((engine, 1))
        speed_up = f"{one / took:.2f}x" if one else "-"
        local = seconds.get(("local", workers))
        overhead = f"{(took - local) / args.trials:+.2f}s" if engine == "ray" and local else "-"
        print(f"{engine:<7}{workers:>8}{took:>9.1f}{args.trials * 3600 / took:>10.0f}{speed_up:>10}{overhead:>16}")


if __name__ == "__main__":
    main()
