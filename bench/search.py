"""Search efficiency: TPE vs random search, with fastai's default `fine_tune` settings
enqueued as trial 0 of every study as the baseline to beat.

fastai's `fine_tune(epochs, base_lr=2e-3, freeze_epochs=1, lr_mult=100)` trains the head
for one epoch at 2e-3, halves base_lr and unfreezes with slice(1e-5, 1e-3): in pet-sweep's
terms base_lr=2e-3, lr_hi=1e-3, lr_lo=1e-5 (lr_mult=100), freeze_epochs=1.

    python bench/search.py [--n-trials 8] [--seeds 0 1 2] [--img-size 16] [--epochs 5]
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
    path = write_experiment(temp_dir(f"search-{sampler}-{seed}"), experiment, digits_space())
    exp = load_experiment(path)
    study = open_study(exp)
    study.enqueue_trial({"arch": "resnet18", "base_lr": 2e-3, "lr_hi": 1e-3, "lr_mult": 100.0,
                         "freeze_epochs": 1, "epochs": epochs}, skip_if_exists=True)
    run_sweep(exp, echo=lambda line: None)
    return [t.value if t.value is not None else 1.0 for t in open_study(exp, create=False).trials]


def trials_to_reach(errors: list[float]) -> int | None:
    """How many searched trials (after the baseline, trial 0) until one is at least as good."""
    for i, err in enumerate(errors[1:], start=1):
        if err <= errors[0]:
            return i
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-trials", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--img-size", type=int, default=16)
    parser.add_argument("--limit", type=int, default=900, help="digits images used (train + valid + test)")
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"# search efficiency: digits ({args.limit} images), baseline + {args.n_trials} trials/study, "
          f"img {args.img_size}px, {machine()}")
    reach: dict[str, list[float]] = {"tpe": [], "random": []}
    print("sampler | seed | baseline err | best after N | trials to reach baseline | errors")
    for seed in args.seeds:
        for sampler in ("tpe", "random"):
            errors = study_errors(sampler, seed, args.n_trials, args.img_size, args.epochs, args.limit)
            n = trials_to_reach(errors)
            reach[sampler].append(n if n is not None else args.n_trials + 1)
            print(f"{sampler} | {seed} | {errors[0]:.4f} | {min(errors[1:]):.4f} | "
                  f"{n if n is not None else f'> {args.n_trials}'} | {[round(e, 4) for e in errors]}", flush=True)
    for sampler, values in reach.items():
        print(f"{sampler}: median trials to reach the baseline: {median(values)} (not reached counts as N+1)")


if __name__ == "__main__":
    main()
