"""bf16 on a CPU: does CPU autocast pay, and does the error hold? Digits at 32 and 64 px,
xresnet18 and xresnet34.

1. Training images per second in fp32 and in bf16 (`torch.autocast("cpu", dtype=torch.bfloat16)`,
   the autocast `train.amp.CpuMixedPrecision` runs): one model per precision, timed in turns
   (the order alternates each repeat), median of `--repeats`.
2. The validation and held-out error of one fixed config trained in both precisions through
   pet-sweep's recipe, per seed: the same data, split and seed, only the precision differs. The
   held-out items are predicted as `pet-sweep train` predicts them (in fp32, `without_training_callbacks`).

    python -m bench.precision_cpu [--sizes 32 64] [--archs xresnet18 xresnet34] [--seeds 0 1 2]

On a CPU torch has no bf16 kernels for (`amp.cpu_bf16_supported()` is False) pet-sweep trains
in fp32; this script runs bf16 there anyway (the callback given to the trial directly) and
says so, to measure what refusing it saves. Prints a table and the verdict for `precision: auto`.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from bench.common import default_digits, digits_space, experiment_in, machine, median, temp_dir

PRECISIONS = ("fp32", "bf16")


class Stepper:
    """One xresnet training on a fixed random batch, under CPU bf16 autocast or not."""

    def __init__(self, arch: str, size: int, batch: int, precision: str) -> None:
        from fastai.vision.models import xresnet

        gen = torch.Generator().manual_seed(0)
        self.model = getattr(xresnet, arch)(n_out=10)
        self.x = torch.randn(batch, 3, size, size, generator=gen)
        self.y = torch.randint(0, 10, (batch,), generator=gen)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.bf16 = precision == "bf16"

    def step(self) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            loss = torch.nn.functional.cross_entropy(self.model(self.x), self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def images_per_second(self, steps: int) -> float:
        started = time.perf_counter()
        for _ in range(steps):
            self.step()
        return steps * len(self.x) / (time.perf_counter() - started)


def throughput(arch: str, size: int, batch: int, steps: int, repeats: int) -> dict[str, float]:
    """Median images/s per precision, timed in turns after one warm-up step each."""
    steppers = {p: Stepper(arch, size, batch, p) for p in PRECISIONS}
    for s in steppers.values():
        s.step()
    rates: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    for r in range(repeats):
        for p in (PRECISIONS if r % 2 == 0 else PRECISIONS[::-1]):
            rates[p].append(steppers[p].images_per_second(steps))
    return {p: median(v) for p, v in rates.items()}


def experiment(size: int, batch: int, limit: int | None) -> Any:
    base = default_digits()
    spec = {**base, "model": {**base["model"], "img_size": size, "batch_size": batch, "precision": "fp32"},
            "data": {**base["data"], "limit": limit, "num_workers": 0}}
    return experiment_in(temp_dir("precision-cpu"), spec, digits_space())


def errors(data: Any, exp: Any, arch: str, precision: str, seed: int, epochs: int) -> tuple[float, float, float]:
    """(validation error, held-out error, seconds) of the fixed config in `precision`."""
    from pet_sweep.params import TrialParams
    from pet_sweep.replay import held_out_predictions, without_training_callbacks
    from pet_sweep.train import amp, recipe

    params = TrialParams(arch, base_lr=1e-2, lr_lo=1e-3, lr_hi=1e-2, freeze_epochs=0, epochs=epochs)
    native = precision == "bf16" and amp.cpu_bf16_supported()
    model = exp.config.model.model_copy(update={"precision": "bf16" if native else "fp32"})
    # where torch has no bf16 kernels, pet-sweep would refuse: the callback is given directly
    cbs = [amp.CpuMixedPrecision()] if precision == "bf16" and not native else []
    result = recipe.fine_tune(data.dls, params, model, seed=seed, keep_learner=True, cbs=cbs)
    try:
        without_training_callbacks(result.learner)
        preds, targets = held_out_predictions(result.learner, data.splits.test)
    finally:
        recipe.release(result.learner)
    held_out = sum(p != t for p, t in zip(preds, targets)) / len(targets)
    return result.error_rate, held_out, result.seconds


def error_rows(args: argparse.Namespace) -> list[tuple[str, int, dict[str, list[tuple[float, float, float]]]]]:
    from pet_sweep.train.data import build_data

    print("arch | px | seed | precision | valid error | held-out error | seconds", flush=True)
    rows = []
    for size in args.error_sizes:
        exp = experiment(size, args.batch, args.limit)
        data = build_data(exp)
        for arch in args.error_archs:
            found: dict[str, list[tuple[float, float, float]]] = {p: [] for p in PRECISIONS}
            for seed in args.seeds:
                for p in (PRECISIONS if seed % 2 == 0 else PRECISIONS[::-1]):
                    found[p].append(errors(data, exp, arch, p, seed, args.epochs))
                    valid, held, seconds = found[p][-1]
                    print(f"{arch} | {size} | {seed} | {p} | {valid:.3f} | {held:.3f} | {seconds:.0f}", flush=True)
            rows.append((arch, size, found))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[32, 64], help="image sizes of the throughput part")
    parser.add_argument("--archs", nargs="+", default=["xresnet18", "xresnet34"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="training steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--error-sizes", nargs="*", type=int, help="sizes of the error part (default: --sizes)")
    parser.add_argument("--error-archs", nargs="*", help="architectures of the error part (default: --archs)")
    parser.add_argument("--epochs", type=int, default=5, help="unfrozen epochs of the error part's config")
    parser.add_argument("--limit", type=int, help="images of digits to use in the error part (default: all)")
    args = parser.parse_args(argv)
    args.error_sizes = args.sizes if args.error_sizes is None else args.error_sizes
    args.error_archs = args.archs if args.error_archs is None else args.error_archs
    from pet_sweep.train import amp

    native = amp.cpu_bf16_supported()
    print(f"# bf16 on a CPU, {machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"torch's bf16 kernels for this CPU: {'yes' if native else 'no (bf16 emulated)'}")
    print("arch | px | batch | fp32 img/s | bf16 img/s | bf16 time / fp32 time", flush=True)
    ratios = []
    for arch in args.archs:
        for size in args.sizes:
            rates = throughput(arch, size, args.batch, args.steps, args.repeats)
            ratios.append(rates["fp32"] / rates["bf16"])
            print(f"{arch} | {size} | {args.batch} | {rates['fp32']:.1f} | {rates['bf16']:.2f} | {ratios[-1]:.2f}",
                  flush=True)
    rows = error_rows(args)
    print("arch | px | seeds | fp32 valid / held-out error (mean) | bf16 valid / held-out error (mean)")
    worst = 0.0
    for arch, size, found in rows:
        means = {p: [sum(v[i] for v in found[p]) / len(found[p]) for i in (0, 1)] for p in PRECISIONS}
        worst = max(worst, means["bf16"][1] - means["fp32"][1])
        print(f"{arch} | {size} | {len(args.seeds)} | {means['fp32'][0]:.3f} / {means['fp32'][1]:.3f} | "
              f"{means['bf16'][0]:.3f} / {means['bf16'][1]:.3f}")
    pays = bool(ratios) and max(ratios) < 0.9
    print(f"median bf16/fp32 time {median(ratios):.2f}x (worst {max(ratios):.2f}x); bf16's mean held-out error "
          f"at most {worst:+.3f} from fp32's. `precision: auto` on this CPU: "
          + ("bf16 would pay (every cell 10 % faster or more); check the errors above before setting amp.CPU_AUTO"
             if pays and native else "stays fp32"))


if __name__ == "__main__":
    main()
