"""Pruning savings: the same study budget with the experiment's pruner and without, several seeds.

Prints total epochs trained and the best error rate (with its Wilson 95 % interval) for
each seed, and the median saving. What the pruner sees: each trial's validation error
rate after every epoch, numbered across both phases (step = global epoch). A trial with
a long one-cycle schedule is still at a high learning rate when a short one has
finished, so the median pruner compares early epochs of schedules of different lengths;
the `pruned at epoch` column shows where it stopped trials.

pet-sweep's `schedule` pruner compares trials at the same phase and fraction of their
schedules instead; both are measured against no pruning. Each pruner starts from the
shipped digits experiment's pruner settings; an entry of --pruners may override them,
e.g. `schedule,percentile=50,n_warmup_steps=2`.

    python bench/pruning.py [--n-trials 12] [--seeds 0 1 2] [--img-size 16] [--pruners schedule median]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from bench.common import default_digits, digits_space, epochs_trained, machine, median, temp_dir, write_experiment


def wilson(errors: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (math.nan, math.nan)
    p = errors / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def sweep(pruner: dict, seed: int, n_trials: int, img_size: int, limit: int) -> dict:
    from pet_sweep.config import load_experiment
    from pet_sweep.study import open_study, quiet_optuna, run_sweep

    quiet_optuna()
    base = default_digits()
    experiment = {**base, "model": {**base["model"], "img_size": img_size},
                  "data": {**base["data"], "limit": limit},
                  "budget": {"n_trials": n_trials}, "sampler": {**base["sampler"], "seed": seed},
                  "pruner": pruner}
    path = write_experiment(temp_dir(f"pruning-{pruner['name']}-{seed}"), experiment, digits_space())
    exp = load_experiment(path)
    started = time.perf_counter()
    run_sweep(exp, echo=lambda line: None)
    seconds = time.perf_counter() - started
    study = open_study(exp, create=False)
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    best = min(done, key=lambda t: t.value)
    n_valid = len(best.user_attrs["valid_targets"])
    pruned_at = [len(t.user_attrs.get("history", [])) for t in study.trials if t.state.name == "PRUNED"]
    return {"epochs": epochs_trained(study), "best": best.value, "n_valid": n_valid,
            "interval": wilson(round(best.value * n_valid), n_valid), "seconds": seconds,
            "pruned": len(pruned_at), "pruned_at": pruned_at}


def pruner_settings(spec: str, base: dict) -> dict:
    """`name[,key=value...]` -> the experiment's `pruner` mapping (base settings overridden)."""
    name, *pairs = spec.split(",")
    settings = {**base, "name": name}
    if name != "schedule":  # settings of pet-sweep's schedule pruner only
        settings.pop("min_fraction", None)
    if name in ("median", "hyperband"):  # the median is the 50th percentile by definition
        settings.pop("percentile", None)
    for pair in pairs:
        key, _, value = pair.partition("=")
        settings[key] = float(value) if "." in value else int(value)
    return settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-trials", type=int, default=12)
    parser.add_argument("--pruners", nargs="+", default=["schedule", "median"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--img-size", type=int, default=16)
    parser.add_argument("--limit", type=int, default=900, help="digits images used (train + valid + test)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    settings = {k: v for k, v in default_digits()["pruner"].items() if k != "name"}
    variants = {spec: pruner_settings(spec, settings) for spec in args.pruners}
    print(f"# pruning savings: digits ({args.limit} images), {args.n_trials} trials/study, img {args.img_size}px, "
          f"{machine()}")
    for spec, pruner in variants.items():
        print(f"# {spec}: {pruner}")
    savings: dict[str, list[float]] = {spec: [] for spec in args.pruners}
    print("seed | pruner | epochs (pruner) | epochs (none) | saving | best err pruner [95% CI] | "
          "best err none [95% CI] | pruned (at epochs) | wall time pruner vs none")
    for seed in args.seeds:
        without = sweep({"name": "none"}, seed, args.n_trials, args.img_size, args.limit)
        for name, pruner in variants.items():
            with_p = sweep(pruner, seed, args.n_trials, args.img_size, args.limit)
            saving = 1 - with_p["epochs"] / without["epochs"]
            savings[name].append(saving)
            within = without["interval"][0] <= with_p["best"] <= without["interval"][1]
            print(f"{seed} | {name} | {with_p['epochs']} | {without['epochs']} | {saving:.0%} | "
                  f"{with_p['best']:.4f} [{with_p['interval'][0]:.4f}, {with_p['interval'][1]:.4f}] | "
                  f"{without['best']:.4f} [{without['interval'][0]:.4f}, {without['interval'][1]:.4f}] "
                  f"({'within' if within else 'OUTSIDE'} its interval) | {with_p['pruned']} {with_p['pruned_at']} | "
                  f"{with_p['seconds']:.0f}s vs {without['seconds']:.0f}s",
                  flush=True)
    for name, values in savings.items():
        print(f"{name}: median saving {median(values):.0%} fewer epochs (target >= 40 %)")


if __name__ == "__main__":
    main()
