"""`pet-sweep report` on a finished study: wall time, and whether it loaded torch or fastai.

    python -m bench.report_time [--runs 5] [--before PATH]

Trains one tiny two-trial digits study (300 digits at 16 px), then times
`python -m pet_sweep report` on it, fresh interpreter each time. With `--before
PATH` (a checkout of an older commit, e.g. `git worktree add /tmp/old c086bca`) the
old and this tree's report run alternately on the same study, so both medians
come from the same minutes of a noisy machine; the ratio is this tree / the old.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import ROOT, header, median, temp_dir, write_experiment

PROBE = ("import runpy, sys; sys.argv = ['pet-sweep', *sys.argv[1:]]\n"
         "try:\n    runpy.run_module('pet_sweep', run_name='__main__')\n"
         "except SystemExit as stop:\n    code = stop.code\n"
         "else:\n    code = 0\n"
         "print('HEAVY', ','.join(m for m in ('torch', 'fastai') if m in sys.modules) or '-')\n"
         "sys.exit(code)\n")


def finished_study(folder: Path) -> Path:
    space = {"arch": "resnet18", "base_lr": 1e-2, "lr_lo": {"low": 1e-4, "high": 1e-3, "log": True},
             "lr_hi": {"low": 1e-3, "high": 1e-2, "log": True}, "freeze_epochs": 1, "epochs": 1}
    experiment = {"data": {"source": "digits", "valid_pct": 0.2, "test_pct": 0.1, "limit": 300},
                  "model": {"img_size": 16, "batch_size": 32, "pretrained": False},
                  "budget": {"n_trials": 2}, "sampler": {"name": "random", "seed": 0}, "seed": 0,
                  "storage": f"sqlite:///{folder}/optuna.db", "tracking": {"uri": f"sqlite:///{folder}/mlflow.db"}}
    config = write_experiment(folder, experiment, space)
    subprocess.run([sys.executable, "-m", "pet_sweep", "run", "--config", str(config), "--quiet"],
                   check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return config


def report_seconds(tree: Path, config: Path, out: Path) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PROBE, "report", "--config", str(config), "--out", str(out),
                           "--no-mlflow-attach"], capture_output=True, text=True, cwd=tree,
                          env={**os.environ, "PYTHONPATH": str(tree)})
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"report failed in {tree}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    heavy = next(line.split(" ", 1)[1] for line in done.stdout.splitlines() if line.startswith("HEAVY "))
    return seconds, heavy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--before", type=Path, help="a checkout of an older commit to time side by side")
    args = parser.parse_args()
    folder = temp_dir("bench-report-")
    config = finished_study(folder)
    trees = {"this tree": ROOT} | ({"before": args.before.resolve()} if args.before else {})
    times: dict[str, list[float]] = {name: [] for name in trees}
    loaded: dict[str, str] = {}
    report_seconds(ROOT, config, folder / "warm-up")  # file caches warm for both
    for run in range(args.runs):
        for name, tree in (trees.items() if run % 2 == 0 else reversed(list(trees.items()))):
            seconds, loaded[name] = report_seconds(tree, config, folder / f"out-{name.replace(' ', '-')}-{run}")
            times[name].append(seconds)
    print(header("pet-sweep report on a finished two-trial study"))
    for name, values in times.items():
        print(f"{name:10} median {median(values):.2f} s over {args.runs} runs (min {min(values):.2f}, "
              f"max {max(values):.2f}); loaded torch/fastai: {loaded[name]}")
    if args.before:
        print(f"ratio this tree / before: {median(times['this tree']) / median(times['before']):.2f}")


if __name__ == "__main__":
    main()
