"""The fine-tune recipe of fastbook chapter 5: the only module that drives fastai training.

    learn = vision_learner(dls, arch, pretrained=..., metrics=error_rate)
    [fp16 on CUDA: learn.to_fp16(); bf16 on a CPU that has it: amp.CpuMixedPrecision]
    [optional lr_find: suggestions and plot logged, weights restored]
    learn.freeze();   learn.fit_one_cycle(freeze_epochs, base_lr)        # head only
    learn.unfreeze(); learn.fit_one_cycle(epochs, lr_max=slice(lo, hi))  # discriminative LRs

`fine_tune` below is exactly that, readable top to bottom.
"""

from __future__ import annotations

import functools
import gc
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

# fastai adds fit_one_cycle, lr_find, to_fp16 and no_bar to Learner in these modules
import fastai.callback.fp16  # noqa: F401
import fastai.callback.progress  # noqa: F401
import fastai.callback.schedule  # noqa: F401
import torch
from fastai.callback.channelslast import ChannelsLast
from fastai.metrics import error_rate
from fastai.torch_core import set_seed
from fastai.vision.learner import model_meta, vision_learner

from pet_sweep.config import ModelConfig
from pet_sweep.errors import PetSweepError
from pet_sweep.params import TrialParams
from pet_sweep.space import ARCHITECTURES
from pet_sweep.sweep.records import EpochListener, EpochRecord
from pet_sweep.train import amp, costs
from pet_sweep.train.callbacks import EpochHistory, StopOnDivergence
from pet_sweep.train.checkpoint import CheckpointPlan, EpochCheckpoints
from pet_sweep.train.data import local_path


@dataclass
class FineTuneResult:
    """What one fine-tune produced."""

    history: list[EpochRecord]
    precision: str  # the precision that really ran (`precision_for`)
    device: str
    seconds: float
    valid_preds: list[int] = field(default_factory=list)
    valid_targets: list[int] = field(default_factory=list)
    group_lrs: dict[str, list[float]] = field(default_factory=dict)
    learner: Any = None  # kept only when asked (for export)
    costs: dict[str, float] = field(default_factory=dict)  # `costs.measure`, by records.COST_ATTRS name
    cost_seconds: float = 0.0  # what measuring the costs took (inside `seconds`)

    @property
    def error_rate(self) -> float:
        return self.history[-1].error_rate if self.history else float("nan")


def resolve_arch(name: str, weights: str | None = None) -> Any:
    """Architecture name -> what `vision_learner` takes (a torchvision/fastai function, or a timm name).

    With `weights` (a local checkpoint of the full model: a torchvision ResNet's, or an
    xresnet's own state dict), the returned function builds the model and loads that
    file: pretrained weights with no hub.
    """
    if name.startswith("xresnet"):
        from fastai.vision.models import xresnet  # heavy: only the family asked for

        arch = getattr(xresnet, name)
    elif name in ARCHITECTURES:
        import torchvision.models  # heavy: only the family asked for

        arch = getattr(torchvision.models, name)
    else:
        return name  # fastai hands unknown names to timm
    if weights is None:
        return arch
    return _local_weights_arch(arch, str(local_path(weights)))


def bare_model(arch: Any) -> torch.nn.Module:
    """The full model of an architecture function, randomly initialised (no download)."""
    # fastai's xresnets take `pretrained`, torchvision's ResNets `weights`
    return arch(pretrained=False) if arch.__module__.startswith("fastai") else arch(weights=None)


@functools.lru_cache(maxsize=None)
def _local_weights_arch(arch: Any, path: str) -> Any:
    def build(pretrained: bool = True, **_: Any) -> torch.nn.Module:
        model = bare_model(arch)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise PetSweepError(f"model.weights: checkpoint not found: {path}") from None
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise PetSweepError(f"model.weights: {path} does not fit {arch.__name__}: {str(err)[:300]}") from None
        return model

    build.__name__ = f"{arch.__name__}_local"
    # model_meta is fastai's registry of how to cut, split and normalise an
    # architecture; the local-weights builder is the same model as `arch`.
    model_meta[build] = {k: v for k, v in model_meta.get(arch, {}).items() if k != "weights"}
    return build


@functools.lru_cache(maxsize=None)
def _notice(message: str) -> None:
    """Print a notice once per process."""
    print(f"pet-sweep: {message}", file=sys.stderr)


def precision_for(requested: str, device: Any) -> str:
    """The precision that really runs: fp16/bf16 on CUDA; on a CPU, bf16 where torch's check
    says this CPU runs it (`amp.cpu_bf16_supported`), fp32 otherwise (`auto`: `amp.CPU_AUTO`)."""
    kind = torch.device(device).type if device is not None else "cpu"
    if kind == "cuda":
        return "fp16" if requested == "auto" else requested
    bf16_here = kind == "cpu" and amp.cpu_bf16_supported()
    if requested == "auto":
        return amp.CPU_AUTO if bf16_here else "fp32"
    if requested == "bf16" and bf16_here:
        return "bf16"
    if requested == "bf16":
        _notice("bf16 needs a CUDA GPU or a CPU with bf16 kernels (torch has none for this one: it would "
                "run many times slower, bench.precision_cpu); training runs in fp32")
    elif requested == "fp16":
        _notice("fp16 needs a CUDA GPU; training runs in fp32 on this machine")
    return "fp32"


def apply_precision(learn: Any, model: ModelConfig) -> str:
    """Switch on mixed precision where it can run, and channels_last where asked;
    return the precision that really runs."""
    wanted = precision_for(model.precision, learn.dls.device)
    if wanted == "fp16":
        learn.to_fp16()
    elif wanted == "bf16" and torch.device(learn.dls.device).type == "cuda":
        learn.to_bf16()
    elif wanted == "bf16":
        learn.add_cb(amp.CpuMixedPrecision())  # fastai's `to_bf16` autocasts on CUDA only
    if model.channels_last:
        learn.add_cb(ChannelsLast())  # the model in NHWC memory format before every fit
    return wanted


def create_learner(dls: Any, arch: str, model: ModelConfig, path: Path) -> Any:
    """`vision_learner` with pet-sweep's settings; a missing weight file becomes a clear error."""
    pretrained = model.pretrained or model.weights is not None
    try:
        return vision_learner(dls, resolve_arch(arch, model.weights), pretrained=pretrained,
                              metrics=error_rate, path=path)
    except OSError as err:  # urllib's URLError is an OSError: weights not cached and no network
        if not pretrained:
            raise
        raise PetSweepError(
            f"pretrained weights for {arch} are not in the torch cache and could not be downloaded ({err}); "
            "run once with network access, set TORCH_HOME to a cache that holds them, "
            "set `model.weights` to a local checkpoint, or `model.pretrained: false`") from None


def reseed(dls: Any, seed: int) -> None:
    """Seed torch/numpy/random and the DataLoaders' own shuffling RNG.

    fastai's DataLoader keeps a `random.Random` made when it was built, so without
    this a trial's batches would depend on what the process trained before it.
    """
    set_seed(seed, reproducible=True)
    for i, dl in enumerate(dls.loaders):
        dl.rng = random.Random(seed + i)


def fine_tune(dls: Any, params: TrialParams, model: ModelConfig, *, seed: int,
              listeners: Sequence[EpochListener] = (), keep_learner: bool = False,
              lr_find: Callable[[Any, TrialParams], None] | None = None,
              checkpoint: CheckpointPlan | None = None, cbs: Sequence[Any] = ()) -> FineTuneResult:
    """Run the chapter-5 recipe once. Listeners see every epoch (global numbering); `cbs`
    (a caller's fastai callbacks) join the Learner for both phases.

    `lr_find` (`lrfind.trial_finder`) runs on the fresh learner before training; it
    leaves the weights and random state as they were. `checkpoint` saves epoch
    checkpoints, and with a `resume` point goes on from one: the phases and epochs it
    had finished are skipped (`start_epoch`), the rest run as they would have.
    """
    started = time.perf_counter()
    peak = costs.PeakMemory(dls.device)
    peak.start()  # the trial's peak memory: its learner, training and all
    reseed(dls, seed)
    workdir = tempfile.TemporaryDirectory(prefix="pet-sweep-")
    learn = create_learner(dls, params.arch, model, Path(workdir.name))
    handed_over = False
    try:
        precision = apply_precision(learn, model)
        if lr_find is not None:  # before the history callbacks: the finder's mock epochs are not epochs
            lr_find(learn, params)
        history = EpochHistory(listeners)
        divergence = StopOnDivergence(history)
        learn.add_cbs([history, divergence, *cbs])
        resume = checkpoint.resume if checkpoint is not None else None
        phase, start = (resume.phase, resume.start) if resume is not None else ("frozen", 0)
        if checkpoint is not None:
            learn.add_cb(EpochCheckpoints(checkpoint, history, divergence, params.freeze_epochs + params.epochs))
        fitting = time.perf_counter()
        with learn.no_bar(), learn.no_logging():
            if params.freeze_epochs > 0 and phase == "frozen":
                learn.freeze()
                learn.fit_one_cycle(params.freeze_epochs, params.base_lr, start_epoch=start)
            history.start_phase("unfrozen")
            learn.unfreeze()
            learn.fit_one_cycle(params.epochs, lr_max=slice(params.lr_lo, params.lr_hi),
                                start_epoch=start if phase == "unfrozen" else 0)
        measuring = time.perf_counter()
        # measured here, while the learner exists (released below unless kept)
        measured = costs.measure(learn, precision, model.channels_last, measuring - fitting, peak)
        handed_over = keep_learner  # a failed fine-tune's learner is released below, kept or not
        return FineTuneResult(
            history=list(history.records), precision=precision, device=str(dls.device),
            seconds=time.perf_counter() - started, valid_preds=history.valid_preds,
            valid_targets=history.valid_targets, group_lrs=history.group_lrs, learner=learn if keep_learner else None,
            costs=measured, cost_seconds=time.perf_counter() - measuring)
    finally:
        peak.stop()  # again after a failure: ends the fallback sampler's thread
        amp.leave_autocast(learn)  # a batch that raised under CPU bf16 would leave it on
        if not handed_over:
            release(learn)
        workdir.cleanup()


def release(learn: Any) -> None:
    """Free a learner's model, optimizer and the CUDA cache between trials."""
    learn.remove_cbs(list(learn.cbs))
    learn.opt = None
    learn.model = None
    del learn
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

