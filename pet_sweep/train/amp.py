"""bf16 mixed precision on a CPU: fastai's `MixedPrecision` in the shape pet-sweep needs.

fastai's `MixedPrecision` hard-codes `autocast('cuda')` and a `GradScaler('cuda')`, so
`learn.to_bf16()` on a CPU trains in fp32. `CpuMixedPrecision` runs the forward pass and
the loss under `torch.autocast("cpu", dtype=torch.bfloat16)`, as fastai does on a GPU.
bf16 keeps fp32's exponent range, so no gradient scaler is needed (fastai turns its own
off for bf16 too). The weights stay fp32: autocast only casts what an op computes in, so
a model trained this way is an ordinary fp32 model.

Whether a CPU may run it is torch's own check (`cpu_bf16_supported`). Where it says no,
torch still runs bf16, through reference kernels: xresnet18/34 at 32 and 64 px trained 3x to
22x slower than fp32 (median 15x) on an AVX2 CPU (bench.precision_cpu, docs/benchmarks.md),
so pet-sweep refuses it there (`recipe.precision_for` trains in fp32 and says so).
"""

from __future__ import annotations

from typing import Any

import torch
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from fastai.torch_core import to_float

# What `precision: auto` picks on a CPU that can run bf16. fp32, from the evidence so far:
# - on this project's AVX2 machine (no native bf16) bf16 trains about 40x slower
#   (bench.precision_cpu, docs/benchmarks.md, "bf16 on a CPU"), and torch's check says no,
#   so auto never reaches bf16 there;
# - the one measurement on a CPU with avx512_bf16 (issue 28: xresnet18's training step at
#   0.69x fp32's time, 5 interleaved repeats on a loaded machine) timed the step alone and
#   not the error; no run of bench.precision_cpu there has shown that the validation and
#   held-out errors hold. Set this to "bf16" once that run shows both.
CPU_AUTO = "fp32"


def cpu_bf16_supported() -> bool:
    """Whether torch runs bf16 on this CPU with oneDNN's bf16 kernels (AVX512-BF16, AMX, or
    AVX512 cores oneDNN emulates them on), rather than slow reference kernels.

    torch has no public name for it: `torch.ops.mkldnn._is_mkldnn_bf16_supported` is the check
    torch's own bf16 CPU tests skip on (tests/test_amp.py pins that it exists)."""
    if not torch.backends.mkldnn.is_available():
        return False
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class CpuMixedPrecision(Callback):
    """Forward pass and loss under CPU bf16 autocast, in both training and validation;
    predictions handed on as fp32 (as fastai's `MixedPrecision` does)."""

    order = MixedPrecision.order  # before the callbacks that read the predictions

    def __init__(self) -> None:
        self.autocast: Any = None
        self.entered = False

    def before_fit(self) -> None:
        self.autocast = torch.autocast("cpu", dtype=torch.bfloat16)

    def before_batch(self) -> None:
        self.autocast.__enter__()
        self.entered = True

    def after_pred(self) -> None:
        self.learn.pred = to_float(self.pred)

    def after_loss(self) -> None:
        self.leave()

    def after_batch(self) -> None:
        self.leave()  # a batch cancelled before its loss (fastai skips after_loss then)

    def after_fit(self) -> None:
        self.leave()
        self.autocast = None

    def leave(self) -> None:
        """Leave autocast if a batch entered it. Autocast is a per-thread switch: left on by a
        batch that raised, everything the process computed next would run in bf16."""
        if self.entered:
            self.entered = False
            self.autocast.__exit__(None, None, None)


def leave_autocast(learn: Any) -> None:
    """After a fit that raised: switch off the CPU autocast its batch may have left on."""
    for cb in learn.cbs:
        if isinstance(cb, CpuMixedPrecision):
            cb.leave()
