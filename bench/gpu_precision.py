"""Mixed precision on a CUDA GPU: training images/s for ResNet-18/34/50 at 224 px, fp32 vs fp16
vs bf16, channels_last on and off, several batch sizes; then the GPU's busy share during a real
pet-sweep trial on digits upscaled to 224 px (is data loading the bottleneck?).

Synthetic batches live on the GPU, so the throughput part measures the model alone; the trial
part uses pet-sweep's own DataLoaders. No network is needed. Prints a table; exits quietly on a
machine without CUDA.

    python -m bench.gpu_precision [--archs resnet18 resnet34 resnet50] [--batch-sizes 64 128 256]

`--device cpu` with a small `--size` runs every step of the script on the CPU in seconds (the
test suite does, so the script works the first time a GPU is there); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import threading
import time

import torch

from bench.common import default_digits, machine, median, temp_dir, write_experiment


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def images_per_second(arch: str, batch: int, precision: str, channels_last: bool, steps: int,
                      device: str = "cuda", size: int = 224) -> float:
    import torchvision

    model = getattr(torchvision.models, arch)(weights=None, num_classes=37).to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 37, (batch,), device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(device, enabled=precision == "fp16")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)

    def step() -> None:
        ctx = torch.autocast(device, dtype=dtype) if dtype else contextlib.nullcontext()
        with ctx:
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    for _ in range(min(5, steps)):  # warm-up: cuDNN picks its kernels
        step()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return steps * batch / (time.perf_counter() - started)


def gpu_utilization() -> int | None:
    """The GPU's busy percentage over the last sample period (NVML), or None when unreadable.

    torch reads it through pynvml, which a CUDA wheel does not always bring along;
    nvidia-smi, which every driver installs, reads the same counter.
    """
    if not torch.cuda.is_available():
        return None
    try:
        return int(torch.cuda.utilization())
    except Exception:  # pynvml missing or NVML unavailable
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                              "-i", str(torch.cuda.current_device())],
                             capture_output=True, text=True, timeout=5, check=True).stdout
        return int(out.split()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def busy_share_of_a_trial(arch: str, batch: int, device: str = "cuda", size: int = 224,
                          limit: int | None = None) -> tuple[float, float]:
    """Fraction of a real trial's wall time the GPU was busy (NVML utilisation samples; nan
    without a counter), and the trial's seconds. `limit`: images of digits to use (all: None)."""
    from pet_sweep.config import load_experiment
    from pet_sweep.params import TrialParams
    from pet_sweep.train.data import build_data
    from pet_sweep.train.recipe import fine_tune

    base = default_digits()
    experiment = {**base, "model": {**base["model"], "img_size": size, "batch_size": batch, "precision": "fp16"},
                  "data": {**base["data"], "num_workers": 8 if device == "cuda" else 0, "limit": limit}}
    path = write_experiment(temp_dir("gpu"), experiment, {"arch": arch, "base_lr": 1e-3, "lr_hi": 1e-3,
                                                         "lr_mult": 10, "freeze_epochs": 1, "epochs": 1})
    exp = load_experiment(path)
    data = build_data(exp, device=torch.device(device))
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            value = gpu_utilization()
            if value is not None:
                samples.append(value)
            time.sleep(0.1)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    started = time.perf_counter()
    fine_tune(data.dls, TrialParams(arch, 1e-3, 1e-4, 1e-3, 1, 1), exp.config.model, seed=0)
    seconds = time.perf_counter() - started
    stop.set()
    thread.join()
    return (sum(samples) / len(samples) / 100 if samples else float("nan")), seconds  # nan: no counter


def significant(value: float) -> str:
    """Three significant digits at least: a loaded CPU's 0.4 images/s is not printed as 0."""
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["resnet18", "resnet34", "resnet50"],
                        help="torchvision models; the last one also runs the busy-share trial")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[64, 128, 256])
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per cell")
    parser.add_argument("--trial-batch", type=int, default=128, help="batch size of the busy-share trial")
    parser.add_argument("--size", type=int, default=224, help="image size (px)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: check the script itself on a small --size; the figures mean nothing")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here: nothing to measure")
        return
    torch.backends.cudnn.benchmark = True
    print(f"# mixed precision on {args.device}, {machine()}, torch {torch.__version__}")
    print("arch | batch | channels_last | fp32 img/s | fp16 img/s | bf16 img/s | fp16/fp32 | bf16/fp32")
    speedups: dict[str, list[float]] = {}
    for arch in args.archs:
        for batch in args.batch_sizes:
            for cl in (False, True):
                rates = {p: images_per_second(arch, batch, p, cl, args.steps, args.device, args.size)
                         for p in ("fp32", "fp16", "bf16")}
                speedups.setdefault(arch, []).append(rates["fp16"] / rates["fp32"])
                cells = [rates["fp32"], rates["fp16"], rates["bf16"], rates["fp16"] / rates["fp32"],
                         rates["bf16"] / rates["fp32"]]
                print(f"{arch} | {batch} | {cl} | " + " | ".join(map(significant, cells)), flush=True)
                if args.device == "cuda":
                    torch.cuda.empty_cache()
    for arch, values in speedups.items():
        print(f"{arch}: median fp16/fp32 speed-up {median(values):.2f}x (target for resnet50: >= 2x)")
    arch = args.archs[-1]
    # on the CPU check, a slice of digits: the point is that the trial runs, not how fast
    busy, seconds = busy_share_of_a_trial(arch, args.trial_batch, args.device, args.size,
                                          limit=None if args.device == "cuda" else 4 * args.trial_batch)
    print(f"{arch} fp16 trial on digits at {args.size} px (2 epochs, {seconds:.0f}s): GPU busy {busy:.0%} "
          "of the wall time (target >= 90 %)")


if __name__ == "__main__":
    main()
