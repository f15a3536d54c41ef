"""fastai callbacks that keep a trial's own history across both phases.

fastai restarts ``learn.epoch`` at 0 and `Recorder` clears its values at every
``fit``, so after freeze + unfreeze ``learn.recorder.values`` holds only the last
phase. `EpochHistory` numbers epochs globally (0 .. freeze_epochs + epochs - 1)
and hands each finished epoch to its listeners: the Optuna reporter (pruning),
the MLflow logger and the progress display. optuna-integration's
``FastAIV2PruningCallback`` reports ``step=self.epoch``, which repeats in the
second phase (Optuna ignores repeated steps), so pet-sweep does not use it.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
from fastai.callback.core import Callback
from fastai.callback.schedule import ParamScheduler
from fastai.learner import Recorder

from pet_sweep.errors import TrainingDiverged
from pet_sweep.sweep.records import EpochListener, EpochRecord


class EpochHistory(Callback):
    """Record every epoch with a global index and notify listeners.

    Runs right after `Recorder` has written the epoch's values. A listener may
    raise (``optuna.TrialPruned``) to stop training.
    """

    order = Recorder.order + 1

    def __init__(self, listeners: list[EpochListener] | tuple[EpochListener, ...] = ()) -> None:
        self.records: list[EpochRecord] = []
        self.listeners = list(listeners)
        self.phase = "frozen"
        self._started = 0.0
        # class predicted for each validation item in the last validation pass
        # (the report's paired test compares trials on the same items)
        self.valid_preds: list[int] = []
        self.valid_targets: list[int] = []
        # per validation batch, kept as tensors: converting each batch would make a GPU
        # wait for every batch instead of once per validation pass
        self._preds: list[Any] = []
        self._targets: list[Any] = []
        # lr_max of each parameter group per phase: what `slice(lo, hi)` became
        self.group_lrs: dict[str, list[float]] = {}

    def restore(self, records: list[EpochRecord], group_lrs: dict[str, list[float]]) -> None:
        """A resumed trial's epochs so far and its phases' peak learning rates (`train.checkpoint`)."""
        self.records, self.group_lrs = list(records), {k: list(v) for k, v in group_lrs.items()}

    def start_phase(self, phase: str) -> None:
        """The next epochs belong to `phase` ("unfrozen" after `learn.unfreeze()`)."""
        self.phase = phase

    def before_fit(self) -> None:
        # fit_one_cycle hands its per-group lr_max to a ParamScheduler; the schedule
        # peaks at lr_max (pct_start is on this grid for fastai's defaults).
        sched = next((cb.scheds.get("lr") for cb in self.learn.cbs if isinstance(cb, ParamScheduler)), None)
        if sched is not None:
            peaks = np.max([np.atleast_1d(sched(pos)) for pos in np.linspace(0, 1, 401)], axis=0)
            self.group_lrs[self.phase] = [float(v) for v in peaks]

    def before_epoch(self) -> None:
        self._started = time.perf_counter()
        self._ran = False  # an epoch that `fit(start_epoch=N)` skips never trains (a resumed trial)

    def before_train(self) -> None:
        self._ran = True

    def before_validate(self) -> None:
        self._preds, self._targets = [], []

    def after_batch(self) -> None:
        if not self.training and len(self.learn.yb):
            self._preds.append(self.learn.pred.detach().argmax(dim=-1))
            self._targets.append(self.learn.yb[0].detach())

    def after_validate(self) -> None:
        if self._preds:
            self.valid_preds = torch.cat(self._preds).tolist()
            self.valid_targets = torch.cat(self._targets).tolist()
        self._preds, self._targets = [], []

    def after_epoch(self) -> None:
        if not getattr(self, "_ran", True):
            return
        names = list(self.learn.recorder.metric_names[1:])  # drop "epoch"
        values = dict(zip(names, self.learn.recorder.values[-1]))
        record = EpochRecord(
            epoch=len(self.records), phase=self.phase,
            train_loss=float(values.get("train_loss", math.nan)),
            valid_loss=float(values.get("valid_loss", math.nan)),
            error_rate=float(values.get("error_rate", math.nan)),
            seconds=time.perf_counter() - self._started,
        )
        self.records.append(record)
        for listener in self.listeners:
            listener(record)


# A trial is stopped once its smoothed training loss exceeds this multiple of its first
# batch's loss. A fresh head starts near chance (ln 10 = 2.3 on digits): 10x that is a model
# confidently wrong. Measured on digits over 2 epochs (the shortest, steepest warm-up):
# one-cycle's warm-up lifted it at most 1.4x inside the digits space (2.7x at lr 0.1, beyond
# it), while learning rates of 10-100 reached 3e3-2e5x and stayed finite. fastai's LR finder
# stops at 4x the *best* loss, a stricter rule that a normal warm-up from a low point can trip.
DIVERGED_RISE = 10.0


class StopOnDivergence(Callback):
    """Stop a trial whose training loss turns NaN or infinite, or blows up, saying where.

    Unlike fastai's `TerminateOnNaNCallback` (which cancels the fit silently and
    lets the next phase start), this raises `TrainingDiverged` so the trial ends
    with its reason recorded. A loss can also rise to 1e4 and stay finite: the trial
    would train to its end at chance level, so fastai's smoothed loss
    (``learn.smooth_loss``, an exponential average with beta 0.98 that one noisy batch
    barely moves) above `rise` times the trial's first batch stops it too. The loss is
    read on the first batch, every `every` batches and at the end of each training
    epoch, not after every batch: reading a CUDA tensor makes the CPU wait for the GPU.
    Once the loss is NaN the weights are too, so it stays NaN until the next check.
    """

    order = EpochHistory.order + 1

    def __init__(self, history: EpochHistory, every: int = 16, rise: float = DIVERGED_RISE) -> None:
        self.history, self.every, self.rise = history, every, rise
        self.start: float | None = None  # the smoothed loss after the trial's first batch
        self.batches = 0  # training batches so far, both phases

    def restore(self, start: float | None, batches: int) -> None:
        """A resumed trial's reference loss and batch count (`train.checkpoint`)."""
        self.start, self.batches = start, batches

    def after_batch(self) -> None:
        if self.training:
            self.batches += 1
            if self.start is None or (self.learn.iter + 1) % self.every == 0:
                self._check()

    def after_train(self) -> None:
        self._check()

    def _check(self) -> None:
        loss = getattr(self.learn, "loss", None)
        if loss is None:
            return
        value = float(loss.detach())
        epoch, phase = len(self.history.records), self.history.phase
        if not math.isfinite(value):
            raise TrainingDiverged(f"training loss became {value} at epoch {epoch} ({phase} phase, by batch "
                                   f"{self.learn.iter}); the learning rate is likely too high")
        smooth = float(getattr(self.learn, "smooth_loss", value))  # fastai's Recorder has it on the CPU already
        if self.start is None:
            self.start = smooth
        elif smooth > self.rise * self.start:
            raise TrainingDiverged(
                f"diverged: loss rose from {self.start:.3g} to {smooth:.3g} by batch {self.batches} (epoch {epoch}, "
                f"{phase} phase; the smoothed training loss passed {self.rise:g}x its start); "
                "the learning rate is likely too high")
