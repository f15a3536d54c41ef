"""Search efficiency: TPE vs random search, with fastai's default `fine_tune` settings
enqueued as trial 0 of every study as the baseline to beat.

fastai's `fine_tune(epochs, base_lr=2e-3, freeze_epochs=1, lr_mult=100)` trains the head
for one epoch at 2e-3, halves base_lr and unfreezes with slice(1e-5, 1e-3): in pet-sweep's
terms base_lr=2e-3, lr_hi=1e-3, lr_lo=1e-5 (lr_mult=100), freeze_epochs=1.

On digits trained from scratch fastai's defaults are a weak baseline (their small
learning rates suit pretrained weights), so the script also measures a stricter bar that
separates the samplers: how many trials each needs to reach the best error random search
found in all N trials of the same seed. Both samplers share the seed, so TPE's startup
trials (random) are the same trials as random search's first ones; they part after that.

    python bench/search.py [--n-trials 12] [--seeds 0 1 2] [--img-size 16] [--epochs 5]
"""

from __future__ import annotations

import argparse

import torch

from bench.common import default_digits, digits_space, machine, median, temp_dir, write_experiment


def study_errors(sampler: str, seed: int, n_trials: int, img_size: int, epochs: int, limit: int) -> list[float]:
    from pet_sweep.config import load_experiment
    from pet_sweep.study import open_study, quiet_optuna, run_sweep

    quiet_optuna()
    base = default_digits()
    experiment = {**base, "model": {**base["model"], "img_size": img_size},
                  "data": {**base["data"], "limit": limit},
                  "budget": {"n_trials": n_trials + 1}, "pruner": {"name": "none"},
                  "sampler": {"name": sampler, "seed": seed, "n_startup_trials": 4}}
    space = digits_space()
    path = write_experiment(temp_dir(f"search-{sampler}-{seed}"), experiment, space)
    exp = load_experiment(path)
    study = open_study(exp)
    study.enqueue_trial({"arch": space["arch"]["choices"][0], "base_lr": 2e-3, "lr_hi": 1e-3, "lr_mult": 100.0,
                         "freeze_epochs": 1, "epochs": epochs}, skip_if_exists=True)
    run_sweep(exp, echo=lambda line: None)
    return [t.value if t.value is not None else 1.0 for t in open_study(exp, create=False).trials]


def trials_to_reach(errors: list[float], target: float | None = None) -> int | None:
    """How many searched trials (after the baseline, trial 0) until one is at least as good
    as `target` (the baseline's error when not given)."""
    target = errors[0] if target is None else target
    for i, err in enumerate(errors[1:], start=1):
        if err <= target:
            return i
    return None


def best_so_far(errors: list[float]) -> list[float]:
    """Best error after each searched trial (the baseline not counted)."""
    out, best = [], float("inf")
    for err in errors[1:]:
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
    print(f"# search efficiency: digits ({args.limit} images), baseline + {args.n_trials} trials/study, "
          f"img {args.img_size}px, {machine()}")
    samplers = ("tpe", "random")
    reach: dict[str, list[float]] = {name: [] for name in samplers}
    reach_random_best: dict[str, list[float]] = {name: [] for name in samplers}
    curves: dict[str, list[list[float]]] = {name: [] for name in samplers}
    never = args.n_trials + 1
    print("sampler | seed | baseline err | best after N | trials to reach baseline | "
          "trials to reach random's best | errors")
    for seed in args.seeds:
        errors = {name: study_errors(name, seed, args.n_trials, args.img_size, args.epochs, args.limit)
                  for name in samplers}
        bar = min(errors["random"][1:])  # the best random search found in N trials
        for name in samplers:
            n = trials_to_reach(errors[name])
            m = trials_to_reach(errors[name], bar)
            reach[name].append(n if n is not None else never)
            reach_random_best[name].append(m if m is not None else never)
            curves[name].append(best_so_far(errors[name]))
            print(f"{name} | {seed} | {errors[name][0]:.4f} | {min(errors[name][1:]):.4f} | "
                  f"{n if n is not None else f'> {args.n_trials}'} | {m if m is not None else f'> {args.n_trials}'} | "
                  f"{[round(e, 4) for e in errors[name]]}", flush=True)
    for name in samplers:
        curve = [median([c[k] for c in curves[name]]) for k in range(args.n_trials)]
        print(f"{name}: median trials to reach the baseline {median(reach[name])}, to reach random's best "
              f"{median(reach_random_best[name])} (not reached counts as N+1); median best after "
              f"1..N trials: {[round(v, 4) for v in curve]}")


if __name__ == "__main__":
    main()
