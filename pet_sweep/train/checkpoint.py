"""Epoch checkpoints: what a trial needs to go on where it stopped, and going on from one.

After an epoch, `EpochCheckpoints` writes one file per trial (the latest only, replaced
atomically): the model's and the optimizer's state (fastai's `Optimizer.state_dict`, as
`learn.save(with_opt=True)` writes them), the phase and the global epoch, the RNG states
(torch, CUDA, numpy, random, and each DataLoader's own `random.Random`), the mixed-precision
scaler, the smoothed loss and `StopOnDivergence`'s reference, and the trial's `EpochHistory`.

A resumed trial runs `fit_one_cycle(n, ..., start_epoch=s)` in the checkpoint's phase:
fastai skips the first `s` epochs (`SkipToEpoch`) and its `TrainEvalCallback` puts the
schedule at `s / n`, so the learning rates of the epochs it runs are the uninterrupted
run's. The state is loaded in `before_fit` (after `freeze`/`unfreeze`, which clear the
optimizer's state) and the RNG states in the first epoch that trains, so the batches,
augmentations and dropout masks are the uninterrupted run's too.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from fastai.callback.core import Callback
from fastai.learner import SkipToEpoch
from fastai.torch_core import get_model

from pet_sweep.sweep.records import EpochRecord
from pet_sweep.train.callbacks import EpochHistory, StopOnDivergence

FORMAT = 1  # the checkpoint file's layout; a file of another layout is not resumed from


@dataclass(frozen=True)
class ResumePoint:
    """A loaded checkpoint: trial `trial` had finished `epochs` epochs (global numbering)."""

    trial: int
    epochs: int
    phase: str                     # the phase of the next epoch: "frozen" or "unfrozen"
    start: int                     # the next epoch's index within its phase (`start_epoch`)
    history: list[EpochRecord]
    epoch_lrs: list[list[float]]   # per epoch: the last group's lr at its first and last batch
    group_lrs: dict[str, list[float]]
    state: dict[str, Any] = field(repr=False)  # tensors: model, opt, rng, scaler, smooth loss


@dataclass
class CheckpointPlan:
    """What a trial saves, and where it goes on from (`sweep.resume.plan`)."""

    path: Path | None                 # this trial's checkpoint file; None: it saves none
    trial: int = -1                   # its number
    every: int = 1                    # after every this many epochs
    min_seconds: float = 0.0          # but not sooner than this after the last save
    max_share: float = 1.0            # nor while the last save took more than this share of the time since
    resume: ResumePoint | None = None
    on_saved: Callable[[int, float], None] | None = None  # (epochs saved, seconds the save took)
    on_epoch: Callable[[list[list[float]]], None] | None = None  # after each epoch trained: `epoch_lrs` so far


def next_epoch(epochs_done: int, freeze_epochs: int) -> tuple[str, int]:
    """(phase, index within that phase) of the epoch after `epochs_done` global epochs."""
    if epochs_done < freeze_epochs:
        return "frozen", epochs_done
    return "unfrozen", epochs_done - freeze_epochs


def _rng_state(learn: Any) -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
            "random": random.getstate(),
            "loaders": [dl.rng.getstate() for dl in learn.dls.loaders]}


def _set_rng_state(learn: Any, rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    kind, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(_tuples(rng["random"]))
    for dl, state in zip(learn.dls.loaders, rng["loaders"]):
        dl.rng.setstate(_tuples(state))


def _tuples(state: Any) -> Any:
    """random.getstate() nests tuples; a loaded file may give lists."""
    return tuple(_tuples(s) for s in state) if isinstance(state, (list, tuple)) else state


def _plain(value: Any) -> Any:
    """fastai's optimizer hypers hold numpy floats (`fit_one_cycle`'s lr_max array): plain floats
    load with torch's weights_only unpickler, fastcore's `L` as a list, fastai's tensor subclasses as tensors."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, list) or type(value).__name__ == "L":  # fastcore's L: a list
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor) and type(value) is not torch.Tensor:  # fastai's TensorBase
        return value.as_subclass(torch.Tensor)
    return value.item() if isinstance(value, np.generic) else value


def save(path: Path, trial: int, learn: Any, history: EpochHistory, divergence: StopOnDivergence,
         epoch_lrs: list[list[float]]) -> None:
    """Write trial `trial`'s checkpoint after its last recorded epoch, replacing the one before."""
    recorder = learn.recorder.smooth_loss
    scaler = getattr(learn, "scaler", None)
    meta = {"format": FORMAT, "trial": trial, "epochs": len(history.records), "phase": history.phase,
            "history": [asdict(r) for r in history.records], "epoch_lrs": epoch_lrs,
            "group_lrs": history.group_lrs, "divergence": [divergence.start, divergence.batches],
            "smooth_count": int(recorder.count)}
    state = _plain({"meta": json.dumps(meta), "model": get_model(learn.model).state_dict(),
                    "opt": learn.opt.state_dict(), "rng": _rng_state(learn),
                    "smooth_val": torch.as_tensor(recorder.val).detach().cpu(),
                    "scaler": scaler.state_dict() if scaler is not None else {}})
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    with open(partial, "wb") as file:
        torch.save(state, file)
        file.flush()
        # on disk before it counts: a checkpoint still in the page cache is lost with its node, and
        # the flush is the save's real cost (unflushed, it stalls the next SQLite commit instead)
        os.fsync(file.fileno())
    os.replace(partial, path)  # atomic: a reader sees the old checkpoint or the new one, whole


def load(path: Path, freeze_epochs: int) -> ResumePoint | None:
    """The checkpoint at `path`, or None if there is none (or it is of another layout)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return None
    meta = json.loads(state["meta"])
    if meta.get("format") != FORMAT:
        return None
    phase, start = next_epoch(meta["epochs"], freeze_epochs)
    return ResumePoint(trial=meta["trial"], epochs=meta["epochs"], phase=phase, start=start,
                       history=[EpochRecord(**r) for r in meta["history"]], epoch_lrs=meta["epoch_lrs"],
                       group_lrs=meta["group_lrs"], state={**state, "meta": meta})


class EpochCheckpoints(Callback):
    """Save the trial after its epochs (as `plan` says), and go on from `plan.resume`.

    Runs after `SkipToEpoch` (so its `before_epoch` sees only the epochs that train) and
    after `EpochHistory` (so the epoch just ended is in the history it saves).
    """

    order = SkipToEpoch.order + 1

    def __init__(self, plan: CheckpointPlan, history: EpochHistory, divergence: StopOnDivergence,
                 total_epochs: int) -> None:
        self.plan, self.history, self.divergence = plan, history, divergence
        self.total_epochs = total_epochs
        self.epoch_lrs: list[list[float]] = []
        self._first_lr: float | None = None
        self._trained = False  # the epoch now ending trained (`fit(start_epoch=N)` skips the first N)
        self._saved_epochs, self._saved_at = 0, time.monotonic()
        self._cost = 0.0  # what the last save took
        self._pending = plan.resume  # loaded at the fit of its phase
        self._rng: dict[str, Any] | None = None  # set once the state is loaded, restored at the next epoch
        if plan.resume is not None:
            history.restore(plan.resume.history, plan.resume.group_lrs)
            self.epoch_lrs = [list(v) for v in plan.resume.epoch_lrs]
            self._saved_epochs = plan.resume.epochs

    def before_fit(self) -> None:
        point = self._pending
        if point is None or self.history.phase != point.phase:
            return
        self._pending = None
        state = point.state
        get_model(self.learn.model).load_state_dict(state["model"])
        if point.start > 0:  # mid-phase: the optimizer goes on; at a phase's start `freeze`/`unfreeze` cleared it
            self.learn.opt.load_state_dict(state["opt"])
            recorder = self.learn.recorder.smooth_loss
            recorder.count, recorder.val = state["meta"]["smooth_count"], state["smooth_val"].to(recorder.val.device)
        scaler = getattr(self.learn, "scaler", None)
        if scaler is not None and state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        self.divergence.restore(*state["meta"]["divergence"])
        self._rng = state["rng"]

    def before_epoch(self) -> None:  # only epochs that train: SkipToEpoch raised before this for the others
        if self._rng is not None:
            _set_rng_state(self.learn, self._rng)
            self._rng = None
        self._first_lr = None

    def after_batch(self) -> None:
        if self.training and self._first_lr is None:
            self._first_lr = float(self.learn.opt.hypers[-1]["lr"])

    def after_train(self) -> None:
        self._trained = True
        self.epoch_lrs.append([self._first_lr if self._first_lr is not None else float("nan"),
                               float(self.learn.opt.hypers[-1]["lr"])])

    def after_epoch(self) -> None:
        done = len(self.history.records)
        trained, self._trained = self._trained, False
        if trained and self.plan.on_epoch is not None:
            self.plan.on_epoch([list(v) for v in self.epoch_lrs])
        if self.plan.path is None or done == self._saved_epochs or done >= self.total_epochs:
            return  # no checkpoints; a skipped epoch; or the trial's last epoch (it completes now)
        if self.plan.every == 0 or done - self._saved_epochs < self.plan.every:
            return
        since = time.monotonic() - self._saved_at
        if since < self.plan.min_seconds or self._cost > self.plan.max_share * since:
            return
        started = time.perf_counter()
        save(self.plan.path, self.plan.trial, self.learn, self.history, self.divergence, self.epoch_lrs)
        self._cost = time.perf_counter() - started
        self._saved_epochs, self._saved_at = done, time.monotonic()
        if self.plan.on_saved is not None:
            self.plan.on_saved(done, self._cost)
