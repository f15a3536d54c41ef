"""Memory between trials: a worker's resident memory after N trials vs after trial 2.

Runs one in-process sweep of tiny digits trials (the learner, optimizer and CUDA
cache are released after every trial by `recipe.release`) and prints the RSS
(and CUDA memory, on a GPU) after each trial. The goal: RSS after trial 20 within
10 % of RSS after trial 2.

    python bench/memory.py                 # 20 trials, 300 digits at 16 px, CPU threads: 1
    python bench/memory.py --trials 40 --img-size 32 --limit 1000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import psutil
import yaml


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--img-size", type=int, default=16)
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from pet_sweep.config import load_experiment
    from pet_sweep.sweep.loop import run_sweep
    from pet_sweep.sweep.storage import quiet_optuna

    quiet_optuna()
    process = psutil.Process()
    rows: list[tuple[int, float, float]] = []

    def record(line: str) -> None:
        cuda = torch.cuda.memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
        rows.append((len(rows) + 1, process.memory_info().rss / 2**20, cuda))
        n, rss, cuda_mib = rows[-1]
        print(f"after trial {n:>3}: RSS {rss:8.1f} MiB   CUDA allocated {cuda_mib:8.1f} MiB   | {' '.join(line.split()[:3])}",
              flush=True)

    with tempfile.TemporaryDirectory(prefix="pet-sweep-bench-") as tmp:
        root = Path(tmp)
        (root / "sweeps").mkdir()
        # different architectures, epochs and learning rates, as a real sweep has
        (root / "sweeps" / "bench.yaml").write_text(yaml.safe_dump({
            "arch": {"choices": ["resnet18", "xresnet18"]}, "base_lr": {"low": 1e-3, "high": 1e-2, "log": True},
            "lr_hi": {"low": 1e-3, "high": 1e-2, "log": True}, "lr_mult": 10,
            "freeze_epochs": {"low": 0, "high": 1}, "epochs": 1}))
        (root / "experiments.yaml").write_text(yaml.safe_dump({"experiments": {"bench": {
            "data": {"source": "digits", "limit": args.limit, "valid_pct": 0.2, "split_seed": 1},
            "model": {"img_size": args.img_size, "batch_size": 32, "pretrained": False},
            "sweep": "sweeps/bench.yaml", "budget": {"n_trials": args.trials},
            "sampler": {"name": "random", "seed": 0},
            "storage": "sqlite:///optuna.db", "tracking": {"uri": "sqlite:///mlflow.db"}}}}))
        run_sweep(load_experiment(root / "experiments.yaml"), echo=record)

    if len(rows) < 2:
        print("fewer than 2 trials ran", file=sys.stderr)
        return 1
    base, last = rows[1][1], rows[-1][1]
    growth = (last - base) / base * 100
    print(f"\nRSS after trial 2: {base:.1f} MiB; after trial {len(rows)}: {last:.1f} MiB; "
          f"growth {growth:+.1f} % (goal: within 10 %)")
    return 0 if abs(growth) <= 10 else 1


if __name__ == "__main__":
    sys.exit(main())
