"""Error against cost on the embedded digits: a two-objective sweep (objectives: [error_rate,
predict_ms]) over xresnet18/34 and the number of epochs, then the report's recommendation
(the cheapest trial within noise of the lowest error, `report.front`): how much cheaper it is
than the lowest-error trial, in predict_ms and train_seconds, and whether the two are within
noise by the report's Holm-corrected McNemar test.

    python -m bench.front [--n-trials 12] [--epochs 2 8] [--limit N] [--img-size 32]
    python -m bench.front --n-trials 8 --limit 600 --img-size 16 --epochs 1 4   # about 10 min on 2 cores
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from typing import Any

from bench.common import default_digits, header, temp_dir, wilson_text, write_experiment

COSTS = ("predict_ms", "train_seconds")


def experiment(args: argparse.Namespace) -> dict[str, Any]:
    """The shipped digits experiment, made two-objective, pruning off (Optuna prunes one objective only)."""
    exp = default_digits()
    exp["objectives"] = ["error_rate", "predict_ms"]
    exp["sampler"] = {"name": args.sampler, "seed": 0, "n_startup_trials": min(5, args.n_trials)}
    exp["pruner"] = {"name": "none"}
    exp["budget"] = {"n_trials": args.n_trials}
    if args.limit:
        exp["data"]["limit"] = args.limit
    if args.img_size:
        exp["model"]["img_size"] = args.img_size
    return exp


def space(args: argparse.Namespace) -> dict[str, Any]:
    """Depth and length only: the learning rates stay where the default sweep finds them good."""
    return {"arch": {"choices": ["xresnet18", "xresnet34"]}, "base_lr": 1.0e-2, "lr_hi": 1.0e-2, "lr_mult": 10,
            "freeze_epochs": 0, "epochs": {"low": args.epochs[0], "high": args.epochs[1]}}


def sweep(args: argparse.Namespace) -> tuple[Any, float]:
    """Run `pet-sweep run bench` in a temporary folder; the experiment and the minutes it took."""
    from pet_sweep.config import load_experiment

    folder = temp_dir("front")
    path = write_experiment(folder, experiment(args), space(args))
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "pet_sweep", "run", "bench"], cwd=folder, capture_output=True,
                         text=True)
    if out.returncode != 0:
        sys.exit(out.stdout + out.stderr)
    return load_experiment(path, "bench"), (time.perf_counter() - started) / 60


def _cost(record: Any, name: str) -> str:
    value = record.costs.get(name)
    return "-" if value is None else f"{value:.3g}"


def _ratio(best: Any, pick: Any, name: str) -> str:
    a, b = best.costs.get(name), pick.costs.get(name)
    if a is None or b is None:
        return f"{name}: not recorded"
    if b <= 0 or a <= 0:
        return f"{name} {b:.3g} vs {a:.3g}"
    return f"{name} {b:.3g} vs {a:.3g} ({a / b:.2f}x cheaper)" if a >= b else \
        f"{name} {b:.3g} vs {a:.3g} ({b / a:.2f}x dearer)"


def summary(exp: Any) -> list[str]:
    """One line per completed trial, then the recommendation against the lowest-error trial."""
    from pet_sweep.report.analysis import completed, lowest_error
    from pet_sweep.report.read import objectives_of, open_existing_study, recommendation_of, trial_records
    from pet_sweep.report.stats import errors_of

    study = open_existing_study(exp)
    objectives = objectives_of(study, exp)
    done = completed(trial_records(study, exp.config.model.batch_size, objectives), experiment=exp.name,
                     study_name=exp.study_name)
    lines = [f"objectives {', '.join(objectives)} ({len(study.directions)} directions); {len(done)} completed trials",
             "trial | arch | epochs | error (wrong/n) [95% CI] | predict_ms | train_seconds"]
    for r in sorted(done, key=lambda r: r.number):
        n = len(r.targets)
        lines.append(f"{r.number} | {r.params.get('arch')} | {r.params.get('epochs')} | "
                     f"{wilson_text(errors_of(r.value, n), n)} | {_cost(r, 'predict_ms')} | {_cost(r, 'train_seconds')}")
    rec = recommendation_of(exp, study)
    best = lowest_error(done)
    if rec is None:
        return lines + [f"lowest error: trial {best.number}; no costs recorded: nothing to compare"]
    lines.append(f"recommendation: {rec.text}")
    if rec.pick is None or rec.pick == best.number:
        return lines + [f"recommended = lowest-error trial {best.number}: 1.00x, nothing cheaper within noise"]
    pick = next(r for r in done if r.number == rec.pick)
    verdict = next(c for c in rec.comparisons if c.other_trial == pick.number)
    return lines + [f"recommended trial {pick.number} ({pick.params.get('arch')}, {pick.params.get('epochs')} epochs) "
                    f"vs lowest-error trial {best.number} ({best.params.get('arch')}, {best.params.get('epochs')} "
                    f"epochs): " + "; ".join(_ratio(best, pick, name) for name in COSTS)
                    + f"; {verdict.verdict} ({verdict.how()})"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, nargs=2, default=[2, 8], metavar=("LOW", "HIGH"))
    parser.add_argument("--sampler", choices=["tpe", "nsga2"], default="tpe")
    parser.add_argument("--limit", type=int, help="digits images used (default: all)")
    parser.add_argument("--img-size", type=int, help="image size (default: the experiment's, 32)")
    args = parser.parse_args(argv)
    shrunk = " (SHRUNK: not the full data or size)" if args.limit or args.img_size else ""
    print(header(f"error against cost: digits, objectives [error_rate, predict_ms], {args.n_trials} trials, "
                 f"xresnet18/34, epochs {args.epochs[0]}-{args.epochs[1]}, sampler {args.sampler}{shrunk}"))
    exp, minutes = sweep(args)
    print(f"sweep: {minutes:.1f} min")
    for line in summary(exp):
        print(line, flush=True)


if __name__ == "__main__":
    main()
