"""Sweep quality on the embedded data: the default digits sweep, exactly as README command 1
runs it, against a scikit-learn SVC on the same validation split.

    python bench/quality.py [--n-trials N]      (default: the experiment's budget)
"""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import sys
import time

from bench.common import ROOT, machine, temp_dir


def wilson(errors: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p = errors / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def svc_error(valid_names: list[str], train_names: list[str]) -> tuple[int, int]:
    """RBF SVC on the raw 8x8 pixels, trained on pet-sweep's training split."""
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    digits = load_digits()
    index = lambda name: int(name.split("_")[1].split(".")[0])  # noqa: E731  <label>_<n>.png
    train = [index(n) for n in train_names]
    valid = [index(n) for n in valid_names]
    model = SVC(gamma=0.001, C=10).fit(digits.data[train], digits.target[train])
    wrong = int((model.predict(digits.data[valid]) != digits.target[valid]).sum())
    return wrong, len(valid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-trials", type=int)
    args = parser.parse_args()
    folder = temp_dir("quality")
    shutil.copy(ROOT / "experiments.yaml", folder)
    shutil.copytree(ROOT / "sweeps", folder / "sweeps")
    command = [sys.executable, "-m", "pet_sweep", "run", "digits"]
    if args.n_trials:
        command += ["--n-trials", str(args.n_trials)]
    started = time.perf_counter()
    out = subprocess.run(command, cwd=folder, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if out.returncode != 0:
        sys.exit(out.stdout + out.stderr)
    print(f"# sweep quality: `pet-sweep run digits` (the default), {machine()}")
    print("\n".join(line for line in out.stdout.splitlines() if line.startswith("trial ")))

    from pet_sweep.config import load_experiment
    from pet_sweep.data import digits_folder, image_files, split_items
    from pet_sweep.study import open_study

    exp = load_experiment(folder / "experiments.yaml", "digits")
    study = open_study(exp, create=False)
    best = study.best_trial
    preds, targets = best.user_attrs["valid_preds"], best.user_attrs["valid_targets"]
    wrong = sum(p != t for p, t in zip(preds, targets))
    lo, hi = wilson(wrong, len(targets))
    data = exp.config.data
    splits = split_items(image_files(digits_folder()), data.valid_pct, data.test_pct, data.split_seed)
    svc_wrong, n = svc_error([p.name for p in splits.valid], [p.name for p in splits.train])
    slo, shi = wilson(svc_wrong, n)
    print(f"pet-sweep best: trial {best.number} error {best.value:.4f} ({wrong}/{len(targets)}) "
          f"95% CI [{lo:.4f}, {hi:.4f}] params {best.user_attrs['params']}")
    print(f"SVC (RBF, raw pixels): error {svc_wrong / n:.4f} ({svc_wrong}/{n}) 95% CI [{slo:.4f}, {shi:.4f}]")
    print(f"wall time of the sweep: {seconds / 60:.1f} min for {len(study.trials)} trials "
          f"(targets: best error <= 1.0 %, <= 10 min)")


if __name__ == "__main__":
    main()
