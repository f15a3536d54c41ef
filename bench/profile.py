"""Where a sweep's time goes: inside `recipe.fine_tune` (training) vs outside it (pet-sweep's
orchestration: Optuna storage, MLflow logging, artifacts, data set-up, garbage collection).

Runs bench.overhead's three enqueued configurations as one sweep. `recipe.fine_tune` is
wrapped with a timer, and cProfile runs only while the sweep is *outside* it, so the
profile lists the orchestration's own costs without the profiler slowing training down.

    python -m bench.profile [--img-size 32] [--top 15] [--limit N] [--callbacks]

`--callbacks` also profiles inside `fine_tune` and lists pet-sweep's callbacks there; the
profiler then slows training, so the inside/outside split of that run is not quoted.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import pstats
import time
from typing import Any, Callable

import torch

from bench.common import default_digits, experiment_in, header, temp_dir
from bench.overhead import CONFIGS, SPACE


def timed_outside(fine_tune: Callable[..., Any], outside: cProfile.Profile, inside: cProfile.Profile | None,
                  spent: list[float]) -> Callable[..., Any]:
    """`fine_tune` with the outside profiler paused (and the inside one running) during each call."""

    @functools.wraps(fine_tune)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        outside.disable()
        if inside is not None:
            inside.enable()
        started = time.perf_counter()
        try:
            return fine_tune(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - started)
            if inside is not None:
                inside.disable()
            outside.enable()

    return wrapper


def top(profile: cProfile.Profile, sort: str, limit: int, *restrict: str) -> str:
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out).strip_dirs().sort_stats(sort)
    stats.print_stats(*restrict, limit)
    lines = out.getvalue().splitlines()
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls")), 0)
    return "\n".join(line for line in lines[start:] if line.strip())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--limit", type=int, default=None, help="digits images used (default: all)")
    parser.add_argument("--top", type=int, default=15, help="functions listed")
    parser.add_argument("--callbacks", action="store_true", help="also profile pet-sweep's callbacks in training")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    from pet_sweep.sweep.loop import run_sweep
    from pet_sweep.sweep.storage import open_study, quiet_optuna
    from pet_sweep.tracking import Tracker
    from pet_sweep.train import recipe

    quiet_optuna()
    base = default_digits()
    experiment = {**base, "model": {**base["model"], "img_size": args.img_size}, "pruner": {"name": "none"},
                  "data": {**base["data"], "limit": args.limit}, "budget": {"n_trials": len(CONFIGS)}}
    exp = experiment_in(temp_dir("profile"), experiment, SPACE)
    Tracker(exp.tracking_uri, exp.tracking_experiment)  # the stores exist, as on every run after the first
    study = open_study(exp)
    for params in CONFIGS:
        study.enqueue_trial(params)
    outside, inside = cProfile.Profile(), cProfile.Profile() if args.callbacks else None
    spent: list[float] = []
    original = recipe.fine_tune
    recipe.fine_tune = timed_outside(original, outside, inside, spent)  # study.py calls recipe.fine_tune
    try:
        started = time.perf_counter()
        outside.enable()
        run_sweep(exp, echo=lambda line: None)
        outside.disable()
        total = time.perf_counter() - started
    finally:
        recipe.fine_tune = original
    epochs = sum(c["freeze_epochs"] + c["epochs"] for c in CONFIGS)
    print(header(f"profile: one sweep of {len(CONFIGS)} enqueued configs ({epochs} epochs), digits "
                 f"{args.img_size}px ({args.limit or 'all'} images), stores already created"))
    inside_s = sum(spent)
    print(f"sweep {total:.1f}s: inside recipe.fine_tune {inside_s:.1f}s, outside {total - inside_s:.1f}s "
          f"({(total - inside_s) / total:.1%} of the sweep; {(total - inside_s) / len(CONFIGS):.2f}s per trial)"
          + (" [inside slowed by --callbacks: do not quote this split]" if inside else ""))
    print(f"\n## outside fine_tune, by own time (top {args.top})")
    print(top(outside, "tottime", args.top))
    print(f"\n## outside fine_tune, by cumulative time (top {args.top})")
    print(top(outside, "cumulative", args.top))
    if inside is not None:
        print("\n## pet-sweep's callbacks inside fine_tune, by cumulative time")
        print(top(inside, "cumulative", args.top, "callbacks.py"))


if __name__ == "__main__":
    main()
