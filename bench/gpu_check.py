"""Everything a GPU machine should check, in one go and at most 8 minutes: the GPU tests, mixed
precision's images/s with the GPU's busy share, a 4-trial pets-shaped sweep with 2 workers on
one GPU, and the input pipeline's images/s. Writes one summary section to docs/benchmarks.md.

    python -m bench.gpu_check [--doc docs/benchmarks.md]

1. `pytest -m gpu` (this checkout's GPU tests).
2. resnet50 at 224 px, fp32 vs fp16 vs bf16, training images/s on synthetic batches
   (`bench.gpu_precision.images_per_second`), the GPU's utilisation sampled while each trains.
3. A generated folder of Pets-sized JPEGs (500x375, labels from `<class>_<n>.jpg` as
   Pets'), swept as `pets` is (Resize 460 per item, augment to 224 per batch) with
   `pet-sweep run --workers 2 --n-trials 4`, weights random (no network).
4. The training DataLoader of that folder alone: images per second into the device.

`--device cpu` with small sizes runs every step on the CPU (tests/test_gpu_check.py does), so
that the script cannot fail on a GPU for a reason a CPU would have shown; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml

from bench.common import ROOT, machine, median, temp_dir
from bench.gpu_precision import gpu_utilization, images_per_second

BUDGET_S = 480  # the whole check: 8 minutes


class BusySampler:
    """The GPU's utilisation sampled every 0.1 s while the `with` block runs (nan: no counter)."""

    def __enter__(self) -> "BusySampler":
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            value = gpu_utilization()
            if value is not None:
                self.samples.append(value)
            time.sleep(0.1)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def share(self) -> float:
        return sum(self.samples) / len(self.samples) / 100 if self.samples else float("nan")


def gpu_tests(args: argparse.Namespace, timeout: float) -> str:
    """`pytest -m gpu`: its summary line, or why it did not finish."""
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-n", "0", *args.tests]
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"did not finish in {timeout:.0f}s"
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return f"exit {done.returncode}: {lines[-1] if lines else done.stderr[-300:]}"


def precision_rows(args: argparse.Namespace) -> Iterator[tuple[str, float, float]]:
    """(precision, images/s, GPU busy share) of resnet50 training on synthetic batches."""
    for precision in ("fp32", "fp16", "bf16"):
        with BusySampler() as busy:
            rate = images_per_second(args.arch, args.batch, precision, False, args.steps, args.device, args.size)
        yield precision, rate, busy.share


def write_jpegs(folder: Path, classes: int, per_class: int, size: tuple[int, int]) -> Path:
    """Pets-sized JPEGs named as Pets' (`<class>_<n>.jpg`): smooth noise tinted per class."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    for c in range(classes):
        tint = torch.rand(3, 1, 1, generator=gen)
        for n in range(per_class):
            small = torch.rand(3, size[1] // 16 + 1, size[0] // 16 + 1, generator=gen)
            image = torch.nn.functional.interpolate(small[None], size=(size[1], size[0]), mode="bilinear")[0]
            pixels = ((0.5 * image + 0.5 * tint) * 255).clamp(0, 255).byte().permute(1, 2, 0).numpy()
            Image.fromarray(pixels).save(folder / f"breed{c}_{n}.jpg", quality=90)
    return folder


def pets_shaped(folder: Path, images: Path, args: argparse.Namespace) -> Path:
    """An experiments.yaml shaped like the shipped `pets` on the generated folder."""
    shipped = yaml.safe_load((ROOT / "experiments.yaml").read_text())["experiments"]["pets"]
    data = {**shipped["data"], "source": "folder", "path": str(images), "label": "regex",
            "pattern": r"^(.+)_\d+\.jpg$", "item_size": args.item_size, "num_workers": args.loader_workers}
    model = {**shipped["model"], "img_size": args.size, "batch_size": args.batch, "pretrained": False,
             "precision": "auto"}
    (folder / "space.yaml").write_text(yaml.safe_dump({"arch": {"choices": ["resnet18", "resnet34"]},
                                                       "base_lr": {"low": 1e-3, "high": 1e-2, "log": True},
                                                       "lr_hi": 1e-3, "lr_mult": 10, "freeze_epochs": 0,
                                                       "epochs": 1}))
    exp = {"data": data, "model": model, "sweep": "space.yaml", "budget": {"n_trials": args.trials},
           "sampler": {"name": "random", "seed": 0}, "storage": "sqlite:///optuna.db",
           "tracking": {"uri": "sqlite:///mlflow.db"}, "seed": 0}
    path = folder / "experiments.yaml"
    path.write_text(yaml.safe_dump({"default": "pets-shaped", "experiments": {"pets-shaped": exp}}))
    return path


def sweep(path: Path, args: argparse.Namespace, timeout: float) -> str:
    cmd = [sys.executable, "-m", "pet_sweep", "run", "--config", str(path), "--workers", str(args.workers),
           "--n-trials", str(args.trials), "--quiet"]
    started = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=path.parent, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired:
        return f"did not finish in {timeout:.0f}s"
    tail = (done.stdout + done.stderr).strip().splitlines()[-1:] or [""]
    return f"exit {done.returncode} in {time.perf_counter() - started:.0f}s: {tail[0][:200]}"


def pipeline_rate(path: Path, device: str) -> float:
    """Images per second out of the folder's training DataLoader onto the device, one pass."""
    from pet_sweep.config import load_experiment
    from pet_sweep.train.data import build_data

    dls = build_data(load_experiment(path), device=torch.device(device)).dls
    started, n = time.perf_counter(), 0
    for x, _ in dls.train:
        n += len(x)
    if device == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - started)


def summary(args: argparse.Namespace, tests: str, rows: list[tuple[str, float, float]], swept: str,
            rate: float, seconds: float) -> str:
    fp32 = next(r for p, r, _ in rows if p == "fp32")
    lines = [f"## GPU check (bench.gpu_check), {dt.date.today().isoformat()}", "",
             f"{machine()}, torch {torch.__version__}, device {args.device}; the whole check took {seconds:.0f}s.",
             "", "    python -m bench.gpu_check " + " ".join(args.argv), "",
             f"- `pytest -m gpu`: {tests}",
             f"- {args.arch} at {args.size} px, batch {args.batch}, {args.steps} steps, synthetic batches:", "",
             "| precision | images/s | vs fp32 | GPU busy |", "| --- | --- | --- | --- |",
             *[f"| {p} | {r:.1f} | {r / fp32:.2f}x | {busy:.0%} |" for p, r, busy in rows], "",
             f"- {args.trials}-trial pets-shaped sweep, `--workers {args.workers}`, {args.classes}x{args.per_class} "
             f"generated 500x375 JPEGs: {swept}",
             f"- input pipeline (Resize {args.item_size} per item, augment to {args.size} per batch, "
             f"{args.loader_workers} DataLoader workers): {rate:.1f} images/s", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--item-size", type=int, default=460)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--per-class", type=int, default=64)
    parser.add_argument("--jpeg-size", type=int, nargs=2, default=[500, 375], metavar=("W", "H"))
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--loader-workers", type=int, default=4)
    parser.add_argument("--tests", nargs="*", default=[], help="test paths for `pytest -m gpu` (default: all)")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here: nothing to check (--device cpu checks the script)")
        return
    started = time.perf_counter()
    left = lambda: max(30.0, BUDGET_S - (time.perf_counter() - started))  # noqa: E731
    tests = gpu_tests(args, timeout=min(150.0, left()))
    print(f"pytest -m gpu: {tests}", flush=True)
    rows = list(precision_rows(args))
    for p, r, busy in rows:
        print(f"{args.arch} {p}: {r:.1f} images/s, GPU busy {busy:.0%}", flush=True)
    folder = temp_dir("gpu-check")
    images = write_jpegs(folder / "images", args.classes, args.per_class, tuple(args.jpeg_size))
    path = pets_shaped(folder, images, args)
    rate = pipeline_rate(path, args.device)
    print(f"input pipeline: {rate:.1f} images/s", flush=True)
    swept = sweep(path, args, timeout=left())
    print(f"sweep: {swept}", flush=True)
    text = summary(args, tests, rows, swept, rate, time.perf_counter() - started)
    with args.doc.open("a", encoding="utf-8") as doc:
        doc.write("\n" + text)
    print(f"summary appended to {args.doc} ({median([r for _, r, _ in rows]):.1f} images/s median)")


if __name__ == "__main__":
    main()
