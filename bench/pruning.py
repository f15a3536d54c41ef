"""Pruning: epochs saved and the held-out error of the best trial, per pruner, several seeds.

For each seed, one sweep without pruning and one per pruner (Optuna's median, percentile,
hyperband and wilcoxon, pet-sweep's schedule), all with the same budget, sampler seed and
training seed, on a shipped experiment (`--experiment`, default digits: its space, image
size, data and pruner settings; no time budget, so that every sweep runs the same number of
trials; digits-transfer's trials fine-tune the digits-source bodies from pet-sweep's cache). A pruner
is judged on two things:

- epochs saved: 1 - epochs trained / epochs of the unpruned sweep of the same seed;
- the held-out error of its best trial, exported and replayed with pet-sweep's `train` (the
  test split no trial saw, so a pruner cannot look good by keeping a trial that was lucky
  on the validation items), pooled over the seeds' test items, with its Wilson interval.

Target: a median saving >= 40 % with the pooled held-out error inside the unpruned best's
pooled 95 % interval. The winner is the pruner that meets it with the largest saving.

    python -m bench.pruning [--seeds 0 1 2] [--pruners median percentile hyperband wilcoxon schedule]
    python -m bench.pruning --seeds 0 --n-trials 2 --img-size 16 --limit 200 --space tiny.yaml   # smoke run
    python -m bench.pruning --seeds 1 --threads 1 --save s1.json   # one seed a process, then:
    python -m bench.pruning --combine s0.json s1.json s2.json      # the verdicts over all their seeds
    python -m bench.pruning --experiment digits-transfer            # the transfer default's space and pruner

An entry of --pruners may override the shipped settings, e.g. `schedule,min_fraction=0.0`.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from bench.common import (
    epochs_trained,
    header,
    median,
    replay_best,
    shipped_experiment,
    temp_dir,
    wilson_text,
    write_experiment,
)

PRUNERS = ["median", "percentile", "hyperband", "wilcoxon", "schedule"]
TARGET_SAVING = 0.40


@dataclass
class Sweep:
    epochs: int
    seconds: float
    pruned_at: list[int]             # epochs each pruned trial trained
    best_trial: int | None
    valid_errors: int = 0
    n_valid: int = 0
    test_errors: int = 0
    n_test: int = 0


def pruner_settings(spec: str, base: dict[str, Any]) -> dict[str, Any]:
    """`name[,key=value...]` -> the experiment's `pruner` mapping: the shipped settings that
    apply to that pruner, overridden by the pairs."""
    name, *pairs = spec.split(",")
    settings = {**base, "name": name}
    if name != "schedule":  # settings of pet-sweep's schedule pruner only
        settings.pop("min_fraction", None)
    if name in ("median", "hyperband", "wilcoxon"):  # the median is the 50th percentile by definition
        settings.pop("percentile", None)
    if name != "wilcoxon":
        settings.pop("p_threshold", None)
    for pair in pairs:
        key, _, value = pair.partition("=")
        settings[key] = float(value) if "." in value else int(value)
    return settings


def sweep(pruner: dict[str, Any], seed: int, args: argparse.Namespace, space: dict[str, Any], root: Path,
          label: str) -> Sweep:
    """One sweep in its own Optuna store; all of them log to one MLflow store under `root`
    (a fresh MLflow sqlite store costs seconds of migrations, paid once)."""
    from pet_sweep.config import load_experiment
    from pet_sweep.report.stats import errors_of
    from pet_sweep.sweep.loop import run_sweep
    from pet_sweep.sweep.storage import open_study, quiet_optuna

    quiet_optuna()
    base, _, others = shipped_experiment(args.experiment)
    experiment = {**base, "model": {**base["model"], "img_size": args.img_size},
                  "data": {**base["data"], "limit": args.limit},
                  "budget": {"n_trials": args.n_trials}, "sampler": {**base["sampler"], "seed": seed},
                  "pruner": pruner, "seed": seed,
                  "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": f"pruning-{label}-{seed}"}}
    folder = root / f"{label}-{seed}"
    exp = load_experiment(write_experiment(folder, experiment, space, others=others))
    started = time.perf_counter()
    run_sweep(exp, echo=lambda line: None)
    seconds = time.perf_counter() - started
    study = open_study(exp, create=False)
    pruned_at = [len(t.user_attrs.get("history", [])) for t in study.trials if t.state.name == "PRUNED"]
    result = Sweep(epochs_trained(study), seconds, pruned_at, None)
    if not any(t.state.name == "COMPLETE" for t in study.trials):
        return result  # nothing to replay: judged as not meeting the target
    best = study.best_trial
    replay = replay_best(exp, folder)
    result.best_trial = best.number
    result.n_valid = len(best.user_attrs["valid_targets"])
    result.valid_errors = errors_of(best.value, result.n_valid)
    result.n_test = replay.n_test
    result.test_errors = errors_of(replay.test_error, replay.n_test) if replay.test_error is not None else 0
    return result


def judge(runs: dict[str, list[Sweep]], reference: list[Sweep]) -> dict[str, dict[str, Any]]:
    """Per pruner: median saving, pooled held-out errors, and whether the target is met."""
    from pet_sweep.report.stats import wilson

    ref_errors, ref_n = sum(r.test_errors for r in reference), sum(r.n_test for r in reference)
    lo, hi = wilson(ref_errors, ref_n) if ref_n else (float("nan"), float("nan"))
    verdicts = {}
    for name, sweeps in runs.items():
        saving = median([1 - s.epochs / r.epochs for s, r in zip(sweeps, reference)])
        errors, n = sum(s.test_errors for s in sweeps), sum(s.n_test for s in sweeps)
        inside = bool(n) and all(s.best_trial is not None for s in sweeps) and lo <= errors / n <= hi
        verdicts[name] = {"saving": saving, "errors": errors, "n": n, "inside": inside,
                          "met": inside and saving >= TARGET_SAVING}
    return verdicts


def winner(verdicts: dict[str, dict[str, Any]]) -> str | None:
    """The pruner that meets the target with the largest saving (ties: the lower held-out error)."""
    met = [name for name, v in verdicts.items() if v["met"]]
    return min(met, key=lambda name: (-verdicts[name]["saving"], verdicts[name]["errors"] / verdicts[name]["n"]),
               default=None)


def measure(args: argparse.Namespace) -> tuple[list[Sweep], dict[str, list[Sweep]]]:
    """Every seed's unpruned sweep and one sweep per pruner, a row printed as each ends."""
    torch.set_num_threads(args.threads)
    base, shipped_space, _ = shipped_experiment(args.experiment)
    space = yaml.safe_load(args.space.read_text()) if args.space else shipped_space
    shipped = {k: v for k, v in base["pruner"].items() if k != "name"}
    variants = {spec: pruner_settings(spec, shipped) for spec in args.pruners}
    print(header(f"pruning: {args.experiment} ({args.limit or 'all'} images), {args.n_trials} trials per sweep, "
                 f"{args.img_size}px, seeds {' '.join(map(str, args.seeds))}, {args.threads} thread(s), "
                 f"space {args.space or 'as shipped'}"))
    for spec, pruner in variants.items():
        print(f"# {spec}: {pruner}")
    print("seed | pruner | epochs | saving | pruned (epochs trained) | best trial | best valid err [95% CI] | "
          "held-out err of the best, replayed [95% CI] | wall s", flush=True)
    root = temp_dir("pruning")
    reference: list[Sweep] = []
    runs: dict[str, list[Sweep]] = {spec: [] for spec in variants}
    for seed in args.seeds:
        for spec, pruner in {"none": {"name": "none"}, **variants}.items():
            result = sweep(pruner, seed, args, space, root, spec)
            (reference if spec == "none" else runs[spec]).append(result)
            saving = 1 - result.epochs / reference[-1].epochs
            print(f"{seed} | {spec} | {result.epochs} | {saving:.0%} | {len(result.pruned_at)} {result.pruned_at} | "
                  f"{result.best_trial} | {wilson_text(result.valid_errors, result.n_valid)} | "
                  f"{wilson_text(result.test_errors, result.n_test)} | {result.seconds:.0f}", flush=True)
    return reference, runs


def save(path: Path, seeds: list[int], reference: list[Sweep], runs: dict[str, list[Sweep]]) -> None:
    """The sweeps of these seeds, for `--combine`."""
    doc = {"seeds": seeds, "none": [asdict(s) for s in reference],
           "pruners": {spec: [asdict(s) for s in sweeps] for spec, sweeps in runs.items()}}
    path.write_text(json.dumps(doc))


def combine(paths: list[Path]) -> tuple[list[int], list[Sweep], dict[str, list[Sweep]]]:
    """The sweeps of several `--save` files: each seed once, the same pruners in each."""
    seeds: list[int] = []
    reference: list[Sweep] = []
    runs: dict[str, list[Sweep]] = {}
    for path in paths:
        doc = json.loads(path.read_text())
        if set(seeds) & set(doc["seeds"]):
            raise SystemExit(f"{path}: seeds {sorted(set(seeds) & set(doc['seeds']))} are already in an earlier file")
        if runs and set(doc["pruners"]) != set(runs):
            raise SystemExit(f"{path}: pruners {sorted(doc['pruners'])}, but the earlier files have {sorted(runs)}")
        seeds += doc["seeds"]
        reference += [Sweep(**s) for s in doc["none"]]
        for spec, sweeps in doc["pruners"].items():
            runs.setdefault(spec, []).extend(Sweep(**s) for s in sweeps)
    return seeds, reference, runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pruners", nargs="+", default=PRUNERS, help="each is compared with no pruning")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sampler and training seeds")
    parser.add_argument("--experiment", default="digits", help="a shipped experiment (default: digits)")
    parser.add_argument("--n-trials", type=int, help="default: the experiment's budget.n_trials")
    parser.add_argument("--img-size", type=int, help="default: the experiment's model.img_size")
    parser.add_argument("--limit", type=int, default=None, help="digits images used (default: the experiment's)")
    parser.add_argument("--space", type=Path, help="a sweep file instead of the experiment's (smoke runs)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 for one seed a process)")
    parser.add_argument("--save", type=Path, help="also write the sweeps' results to this JSON file")
    parser.add_argument("--combine", type=Path, nargs="+", help="judge the results of these --save files")
    args = parser.parse_args(argv)
    base = shipped_experiment(args.experiment)[0]
    args.n_trials = args.n_trials or base["budget"]["n_trials"]
    args.img_size = args.img_size or base["model"]["img_size"]
    args.limit = args.limit or base["data"].get("limit")
    if args.combine:
        seeds, reference, runs = combine(args.combine)
        print(f"# pruning: combined {' '.join(map(str, args.combine))}: seeds {' '.join(map(str, seeds))}")
    else:
        seeds = args.seeds
        reference, runs = measure(args)
        if args.save:
            save(args.save, seeds, reference, runs)
    verdicts = judge(runs, reference)
    ref = wilson_text(sum(r.test_errors for r in reference), sum(r.n_test for r in reference))
    print(f"none: held-out error of the best trials, pooled over {len(seeds)} seeds: {ref}")
    for name, v in verdicts.items():
        print(f"{name}: median saving {v['saving']:.0%} (target >= {TARGET_SAVING:.0%}); held-out error pooled "
              f"{wilson_text(v['errors'], v['n'])}, {'inside' if v['inside'] else 'OUTSIDE'} the unpruned "
              f"interval; target {'met' if v['met'] else 'not met'}")
    best = winner(verdicts)
    print(f"winner: {best}" if best else "winner: none (no pruner met the target)")


if __name__ == "__main__":
    main()
