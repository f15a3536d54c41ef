"""Search efficiency: TPE vs random search, against fastai's own `fine_tune` as the baseline to beat.

The baseline is `learn.fine_tune(epochs)` itself, fastai 2.8's schedule: one frozen epoch of
`fit_one_cycle` at base_lr=2e-3 with pct_start=0.99, then base_lr halved and the unfrozen
epochs at slice(1e-5, 1e-3) with pct_start=0.3 and div=5. pet-sweep's recipe cannot express
that schedule (its phases use fit_one_cycle's defaults, pct_start=0.25 and div=25), so the
baseline is trained outside the studies, once, on the same DataLoaders, architecture (the
space's first), training seed and image size, and its validation error is the bar.

On digits trained from scratch fastai's defaults are a weak baseline (their small
learning rates suit pretrained weights), so the script also measures a stricter bar that
separates the samplers: how many trials each needs to reach the best error random search
found in all N trials of the same seed. Both samplers share the seed, so TPE's startup
trials (random) are the same trials as random search's first ones; they part after that.

    python -m bench.search [--n-trials 12] [--seeds 0 1 2] [--img-size 16] [--epochs 5]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch

from bench.common import default_digits, digits_space, experiment_in, header, median, temp_dir


def experiment(sampler: str, seed: int, args: argparse.Namespace) -> Any:
    base = default_digits()
    settings = {**base, "model": {**base["model"], "img_size": args.img_size},
                "data": {**base["data"], "limit": args.limit},
                "budget": {"n_trials": args.n_trials}, "pruner": {"name": "none"},
                "sampler": {"name": sampler, "seed": seed, "n_startup_trials": 4}}
    return experiment_in(temp_dir(f"search-{sampler}-{seed}"), settings, digits_space())


def fastai_default_error(exp: Any, epochs: int) -> float:
    """Validation error of fastai's own `learn.fine_tune(epochs)` (all its defaults) with the
    space's first architecture, on the experiment's DataLoaders and training seed."""
    from pet_sweep.train import recipe
    from pet_sweep.train.data import build_data

    dls = build_data(exp).dls
    recipe.reseed(dls, exp.config.seed)  # as every trial is seeded
    with tempfile.TemporaryDirectory() as tmp:
        learn = recipe.create_learner(dls, digits_space()["arch"]["choices"][0], exp.config.model, Path(tmp))
        recipe.apply_precision(learn, exp.config.model)
        with learn.no_bar(), learn.no_logging():
            learn.fine_tune(epochs)
            error = float(learn.validate()[1])  # [valid_loss, error_rate]
        recipe.release(learn)
    return error


def study_errors(exp: Any) -> list[float]:
    from pet_sweep.sweep.loop import run_sweep
    from pet_sweep.sweep.storage import open_study, quiet_optuna

    quiet_optuna()
    run_sweep(exp, echo=lambda line: None)
    return [t.value if t.value is not None else 1.0 for t in open_study(exp, create=False).trials]


# fastai's error_rate is 1 - accuracy in float32: two trials with the same number of mistakes
# can differ in the 8th digit, so "as good as" allows that much
SAME_ERROR = 1e-6


def trials_to_reach(errors: list[float], target: float) -> int | None:
    """How many trials until one is at least as good as `target` (to within float32 rounding)."""
    for i, err in enumerate(errors, start=1):
        if err <= target + SAME_ERROR:
            return i
    return None


def best_so_far(errors: list[float]) -> list[float]:
    """Best error after each trial."""
    out, best = [], float("inf")
    for err in errors:
        best = min(best, err)
        out.append(best)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-trials", type=int, default=12)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--img-size", type=int, default=16)
    parser.add_argument("--limit", type=int, default=900, help="digits images used (train + valid + test)")
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(header(f"search efficiency: digits ({args.limit} images), {args.n_trials} trials/study, "
                 f"img {args.img_size}px, seeds {' '.join(map(str, args.seeds))}"))
    samplers = ("tpe", "random")
    baseline = fastai_default_error(experiment("tpe", args.seeds[0], args), args.epochs)
    print(f"baseline: fastai's learn.fine_tune({args.epochs}) (1 frozen epoch at 2e-3, pct_start=0.99; then "
          f"slice(1e-5, 1e-3), pct_start=0.3, div=5): validation error {baseline:.4f}", flush=True)
    reach: dict[str, list[float]] = {name: [] for name in samplers}
    reach_random_best: dict[str, list[float]] = {name: [] for name in samplers}
    curves: dict[str, list[list[float]]] = {name: [] for name in samplers}
    never = args.n_trials + 1
    print("sampler | seed | best after N | trials to reach the baseline | trials to reach random's best | errors")
    for seed in args.seeds:
        errors = {name: study_errors(experiment(name, seed, args)) for name in samplers}
        bar = min(errors["random"])  # the best random search found in N trials
        for name in samplers:
            n = trials_to_reach(errors[name], baseline)
            m = trials_to_reach(errors[name], bar)
            reach[name].append(n if n is not None else never)
            reach_random_best[name].append(m if m is not None else never)
            curves[name].append(best_so_far(errors[name]))
            print(f"{name} | {seed} | {min(errors[name]):.4f} | "
                  f"{n if n is not None else f'> {args.n_trials}'} | {m if m is not None else f'> {args.n_trials}'} | "
                  f"{[round(e, 4) for e in errors[name]]}", flush=True)
    for name in samplers:
        curve = [median([c[k] for c in curves[name]]) for k in range(args.n_trials)]
        print(f"{name}: median trials to reach the baseline {median(reach[name])}, to reach random's best "
              f"{median(reach_random_best[name])} (not reached counts as N+1); median best after "
              f"1..N trials: {[round(v, 4) for v in curve]}")
    met = median(reach["tpe"]) < median(reach["random"])
    print(f"target (TPE reaches the baseline in fewer trials than random search, medians): "
          f"{'met' if met else 'not met'}")


if __name__ == "__main__":
    main()
