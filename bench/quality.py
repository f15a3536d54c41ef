"""Sweep quality on the embedded data: the `digits` sweep (from scratch), exactly as
`pet-sweep run digits` runs it, once per split seed; its best trial exported and replayed with `pet-sweep train`
on the held-out test split; a scikit-learn SVC on the same splits for comparison.

Targets (2 CPU cores): each sweep <= 10 min; best validation error <= 0.8 %, median over the
split seeds; held-out test error of the replayed best trials <= 1.0 %, pooled over the
seeds' test items (one seed's 180 items are too few: 2 errors is already 1.1 %). Several
split seeds, so that a space tuned to one split cannot pass.

    python -m bench.quality [--split-seeds 42 1 2] [--n-trials N]
    python -m bench.quality --split-seeds 42 --n-trials 1 --limit 300 --img-size 16   # smoke run
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from bench.common import ROOT, header, median, replay_best, temp_dir, wilson_text

TARGET_VALID, TARGET_TEST, TARGET_MINUTES = 0.008, 0.010, 10.0


def svc_errors(valid_names: list[str], train_names: list[str]) -> int:
    """Mistakes of an RBF SVC on the raw 8x8 pixels, trained on pet-sweep's training split."""
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    digits = load_digits()
    index = lambda name: int(name.split("_")[1].split(".")[0])  # noqa: E731  <label>_<n>.png
    train = [index(n) for n in train_names]
    valid = [index(n) for n in valid_names]
    model = SVC(gamma=0.001, C=10).fit(digits.data[train], digits.target[train])
    return int((model.predict(digits.data[valid]) != digits.target[valid]).sum())


def experiments_for(folder: Path, split_seed: int, args: argparse.Namespace) -> Path:
    """The shipped experiments.yaml and sweeps/ in `folder`, digits' split seed set (and, for a
    smoke run, its data, image size or space shrunk)."""
    shutil.copytree(ROOT / "sweeps", folder / "sweeps")
    doc = yaml.safe_load((ROOT / "experiments.yaml").read_text())
    digits = doc["experiments"]["digits"]
    digits["data"]["split_seed"] = split_seed
    if args.limit:
        digits["data"]["limit"] = args.limit
    if args.img_size:
        digits["model"]["img_size"] = args.img_size
    if args.space:
        shutil.copy(args.space, folder / "sweeps" / "digits.yaml")
    path = folder / "experiments.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def one_seed(split_seed: int, args: argparse.Namespace) -> dict[str, Any]:
    from pet_sweep.config import load_experiment
    from pet_sweep.report.stats import errors_of
    from pet_sweep.sweep.storage import open_study
    from pet_sweep.train.data import build_data

    folder = temp_dir(f"quality-{split_seed}")
    experiments_for(folder, split_seed, args)
    command = [sys.executable, "-m", "pet_sweep", "run", "digits"]
    if args.n_trials:
        command += ["--n-trials", str(args.n_trials)]
    started = time.perf_counter()
    out = subprocess.run(command, cwd=folder, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if out.returncode != 0:
        sys.exit(out.stdout + out.stderr)
    for line in out.stdout.splitlines():
        if line.startswith("trial "):
            print(f"  [{split_seed}] {line}", flush=True)
    exp = load_experiment(folder / "experiments.yaml", "digits")
    study = open_study(exp, create=False)
    best = study.best_trial
    n_valid = len(best.user_attrs["valid_targets"])
    replay = replay_best(exp, folder)
    splits = build_data(exp).splits  # the sweep's own split of the items, for the SVC
    return {"trials": len(study.trials), "best": best.number, "params": best.user_attrs["params"],
            "valid_rate": best.value, "valid": errors_of(best.value, n_valid), "n_valid": n_valid,
            "test": errors_of(replay.test_error, replay.n_test) if replay.test_error is not None else 0,
            "n_test": replay.n_test, "replayed_valid": replay.valid_error,
            "svc": svc_errors([p.name for p in splits.valid], [p.name for p in splits.train]),
            "minutes": seconds / 60}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split-seeds", type=int, nargs="+", default=[42, 1, 2])
    parser.add_argument("--n-trials", type=int, help="default: the experiment's budget")
    parser.add_argument("--limit", type=int, help="smoke runs: digits images used (default: all)")
    parser.add_argument("--img-size", type=int, help="smoke runs: image size (default: the experiment's)")
    parser.add_argument("--space", type=Path, help="smoke runs: a sweep file instead of sweeps/digits.yaml")
    args = parser.parse_args(argv)
    shrunk = " (SHRUNK for a smoke run: not the default sweep)" if args.limit or args.img_size or args.space else ""
    print(header(f"sweep quality: `pet-sweep run digits` (the default) per split seed "
                 f"{' '.join(map(str, args.split_seeds))}{shrunk}"))
    rows = {}
    for seed in args.split_seeds:
        rows[seed] = row = one_seed(seed, args)
        print(f"split_seed {seed}: {row['trials']} trials in {row['minutes']:.1f} min; best trial {row['best']} "
              f"{row['params']}", flush=True)
        print(f"  best validation error {wilson_text(row['valid'], row['n_valid'])}; replayed with `train`: "
              f"validation {row['replayed_valid']:.4f}, held-out test {wilson_text(row['test'], row['n_test'])}; "
              f"SVC (RBF, raw pixels) validation {wilson_text(row['svc'], row['n_valid'])}", flush=True)
    valid = median([r["valid_rate"] for r in rows.values()])
    errors, n = sum(r["test"] for r in rows.values()), sum(r["n_test"] for r in rows.values())
    slowest = max(r["minutes"] for r in rows.values())
    print(f"best validation error, median over {len(rows)} split seeds: {valid:.4f} "
          f"(target <= {TARGET_VALID:.1%}): {'met' if valid <= TARGET_VALID else 'not met'}")
    print(f"held-out test error of the replayed best trials, pooled: {wilson_text(errors, n)} "
          f"(target <= {TARGET_TEST:.1%}): {'met' if n and errors / n <= TARGET_TEST else 'not met'}")
    minutes = ", ".join(f"{r['minutes']:.1f}" for r in rows.values())
    print(f"wall time per sweep: {minutes} min "
          f"(target <= {TARGET_MINUTES:.0f} min each): {'met' if slowest <= TARGET_MINUTES else 'not met'}")


if __name__ == "__main__":
    main()
