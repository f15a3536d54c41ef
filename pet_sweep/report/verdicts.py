"""fastbook's `plot_loss` reading, made for every trial: one verdict and an epoch count.

fastbook reads the loss curves by eye: training loss keeps falling, validation
loss flattens or rises, yet the error rate can still improve ("overconfident, not
less accurate"); the epoch count is chosen where the metric stops improving.
`analyse_history` makes that reading for one trial's per-epoch history.

Epochs are named by the number each record carries (`EpochRecord.epoch`: counted
from 0 across the frozen and unfrozen phases, MLflow's step); counts of epochs
(`n_epochs`, the recommended `epochs`) are counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from pet_sweep.report.stats import ALPHA, chance_p_value, errors_of

TREND_EPOCHS = 3      # slopes are fitted over this many last epochs
LOSS_RISE = 0.05      # valid loss "rising": last value > its minimum by more than 5 %
UNFIT_SHARE = 0.5     # "underfit" needs the train loss still above this share of its first epoch's
ERROR_BLOWUP = 0.25   # "diverged": the last error rate above the first epoch's by more than 25 points

STILL_IMPROVING = "still improving"
OVERCONFIDENT = "overconfident"
OVERFITTING = "overfitting"
CONVERGED = "converged"
UNDERFIT = "underfit"
DIVERGED = "diverged"            # blew up: a non-finite loss, or a loss or error rate rising far above its start
NEVER_LEARNED = "never learned"  # stayed near chance from start to end: nothing blew up
VERDICTS = (STILL_IMPROVING, OVERCONFIDENT, OVERFITTING, CONVERGED, UNDERFIT, DIVERGED, NEVER_LEARNED)
FAILED_TO_LEARN = (DIVERGED, NEVER_LEARNED)  # no epoch count or recommendation is read off these

# What each verdict means for the next sweep (terminal, Markdown and HTML share it).
ADVICE: dict[str, str] = {
    STILL_IMPROVING: "error rate was still falling at the last epoch: more epochs could help",
    OVERCONFIDENT: "validation loss rises while the error rate holds or falls: the model grows "
                   "overconfident, not less accurate; the epoch count is about right",
    OVERFITTING: "error rate rose from its best: train fewer epochs (stop where it stopped improving)",
    CONVERGED: "error rate and validation loss have flattened: the epoch count is about right",
    UNDERFIT: "training loss stays high, above validation loss, and the error rate has stalled: "
              "raise the learning rate or the epoch count",
    DIVERGED: "the loss blew up (non-finite, or rising far above its start): the learning rate was too high "
              "for this trial",
    NEVER_LEARNED: "the error rate stayed near chance (nothing blew up): the model learned nothing; the learning "
                   "rate (too low or too high), too few epochs or the data can be why",
}


def value_of(record: Any, name: str) -> Any:
    """One field of an epoch record: a dict (as stored in the study) or an `EpochRecord`."""
    return record[name] if isinstance(record, Mapping) else getattr(record, name)


def epoch_numbers(history: Sequence[Any]) -> list[int]:
    """The epochs' numbers as each record carries them: from 0 across both phases, MLflow's step."""
    return [int(value_of(r, "epoch")) for r in history]


def _slope(values: np.ndarray) -> float:
    """Least-squares change per epoch of the last TREND_EPOCHS values (0 for one value)."""
    tail = values[-TREND_EPOCHS:]
    if len(tail) < 2 or not np.all(np.isfinite(tail)):
        return 0.0 if len(tail) < 2 else math.nan
    return float(np.polyfit(np.arange(len(tail)), tail, 1)[0])


@dataclass(frozen=True)
class TrialAnalysis:
    """The `plot_loss` reading of one trial. `best_epoch` and `last_epoch` are epoch numbers as
    recorded (from 0, across both phases); `n_epochs` and the recommendations are counts."""

    n_epochs: int
    n_frozen: int
    final_error: float
    best_error: float
    best_epoch: int
    last_epoch: int
    epochs_past_best: int
    final_gap: float          # valid loss - train loss at the last epoch
    gap_trend: float          # its change per epoch over the last epochs (> 0: widening)
    valid_loss_slope: float   # change of valid loss per epoch over the last epochs
    error_slope: float
    verdict: str
    reason: str
    recommended_total_epochs: int | None  # frozen + unfrozen; None: change the LR, not the length

    @property
    def recommended_epochs(self) -> int | None:
        """The recipe's `epochs` parameter (unfrozen epochs) for the recommended total."""
        if self.recommended_total_epochs is None:
            return None
        return max(1, self.recommended_total_epochs - self.n_frozen)


@dataclass(frozen=True)
class _Curves:
    """One trial's curves as arrays, and where its error rate was best."""

    epochs: list[int]         # the recorded epoch numbers
    train: np.ndarray
    valid: np.ndarray
    error: np.ndarray
    noise: float              # the smallest change in error rate that counts
    best_idx: int
    settled: int              # index of the first epoch within noise of the best

    @classmethod
    def of(cls, history: Sequence[Any], noise: float) -> _Curves:
        error = np.array([float(value_of(r, "error_rate")) for r in history])
        finite = np.where(np.isfinite(error), error, np.inf)
        best_idx = int(np.argmin(finite))
        settled = next((i for i in range(len(error)) if finite[i] <= finite[best_idx] + noise), best_idx)
        return cls(epoch_numbers(history),
                   np.array([float(value_of(r, "train_loss")) for r in history]),
                   np.array([float(value_of(r, "valid_loss")) for r in history]), error, noise, best_idx, settled)

    @property
    def n(self) -> int:
        return len(self.error)

    @property
    def best(self) -> float:
        return float(np.where(np.isfinite(self.error), self.error, np.inf)[self.best_idx])

    @property
    def final(self) -> float:
        return float(self.error[-1])


def _diverged(c: _Curves) -> str | None:
    """Why the trial blew up (a non-finite loss, a loss or error rate rising far above its start); None if not."""
    if not (np.all(np.isfinite(c.train)) and np.all(np.isfinite(c.valid)) and np.all(np.isfinite(c.error))):
        return "a loss or the error rate became non-finite"
    if c.n >= 2 and c.train[-1] > c.train[0] * (1 + LOSS_RISE * 2):  # a 10 % rise, not one-cycle jitter
        return f"training loss rose from {c.train[0]:.3g} to {c.train[-1]:.3g}"
    if c.n >= 2 and c.final > c.error[0] + max(ERROR_BLOWUP, c.noise):
        return f"error rate rose from {c.error[0]:.2%} at epoch {c.epochs[0]} to {c.final:.2%} at epoch {c.epochs[-1]}"
    return None


def _never_learned(c: _Curves, n_valid: int | None, n_classes: int | None) -> str | None:
    """Why the trial never learned (its best error rate no better than chance); None when it learned."""
    if not n_classes:
        return None
    chance = 1 - 1 / n_classes
    if n_valid:
        # H0: the model guesses; only a best error count improbably low under it counts as learning
        p_chance = chance_p_value(errors_of(c.best, n_valid), n_valid, n_classes)
        if p_chance >= ALPHA:
            return (f"error rate {c.best:.2%} is no better than chance ({chance:.2%} with {n_classes} classes; "
                    f"one-sided binomial p={p_chance:.2g} on {n_valid} items)")
    elif c.best >= chance - c.noise:  # no item count: the rate alone
        return f"error rate {c.best:.2%} is at chance level ({chance:.2%})"
    return None


def _trend(c: _Curves, error_slope: float, valid_slope: float) -> tuple[str, str, int]:
    """The verdict of a trial that learned: its name, the reason, the recommended total epochs."""
    n, best, final, epochs = c.n, c.best, c.final, c.epochs
    at_best = c.settled + 1  # epochs up to the first one within noise of the best
    longer = n + max(1, math.ceil(n / 2))
    if final > best + c.noise and c.best_idx < n - 1:
        return OVERFITTING, (f"error rate rose from {best:.2%} at epoch {epochs[c.best_idx]} to "
                             f"{final:.2%} at epoch {epochs[-1]}"), at_best
    # a new best at the last epoch counts as improvement only beyond noise: by more than
    # `noise` over the best before it, or on a falling trend over the last epochs
    before = float(np.min(np.where(np.isfinite(c.error[:-1]), c.error[:-1], np.inf))) if n > 1 else math.inf
    new_best_last = n == 1 or final < before
    trend_drop = -error_slope * (min(n, TREND_EPOCHS) - 1)
    improving = n == 1 or (new_best_last and (before - final > c.noise or trend_drop > c.noise))
    if n >= 2 and c.valid[-1] > float(np.min(c.valid)) * (1 + LOSS_RISE) and valid_slope > 0:
        return OVERCONFIDENT, (f"validation loss rose from {np.min(c.valid):.3g} to {c.valid[-1]:.3g} "
                               f"while the error rate {'fell' if new_best_last else 'held'} ({final:.2%})"), at_best
    if improving:
        return STILL_IMPROVING, (f"the error rate was still falling at the last epoch ({final:.2%}, down "
                                 f"{trend_drop * 100:.2f} points over the last {min(n, TREND_EPOCHS)} epochs)"
                                 if n > 1 else "one epoch: no trend yet"), longer
    # train loss above valid loss alone is common on healthy runs: fastai's head has dropout
    # and the train loss is averaged over an epoch of a falling curve. Underfit also means
    # the model has not fit its training data: the loss is still above half its first epoch's.
    if c.valid[-1] < c.train[-1] and n >= 2 and c.train[-1] > UNFIT_SHARE * c.train[0]:
        return UNDERFIT, (f"training loss {c.train[-1]:.3g} is above validation loss {c.valid[-1]:.3g} "
                          f"and above half its first epoch's ({c.train[0]:.3g}), and the error rate has "
                          "stopped improving"), longer
    return CONVERGED, f"error rate within noise of its best ({best:.2%}) since epoch {epochs[c.settled]}", at_best


def analyse_history(history: Sequence[Any], *, n_valid: int | None = None, n_classes: int | None = None,
                    min_change: float | None = None) -> TrialAnalysis:
    """Read one trial's per-epoch history (dicts or records with epoch, phase, train_loss,
    valid_loss, error_rate) and give its verdict and a recommended epoch count.

    A change in error rate counts only when it exceeds `min_change` (default: one
    and a half validation items, so one image flipping is not a trend). With
    `n_classes` and `n_valid`, a best error rate no better than guessing by a
    one-sided exact binomial test (`chance_p_value` >= ALPHA) is "never learned"; a blow-up
    (a non-finite value, a loss or error rate rising far above its start) is "diverged".
    """
    if not history:
        raise ValueError("an empty history has nothing to analyse")
    c = _Curves.of(history, min_change if min_change is not None else (1.5 / n_valid if n_valid else 0.0))
    gap = c.valid - c.train
    error_slope, valid_slope = _slope(c.error), _slope(c.valid)
    blew_up = _diverged(c)
    stalled = None if blew_up else _never_learned(c, n_valid, n_classes)
    if blew_up or stalled:
        verdict, reason, total = (DIVERGED, blew_up, None) if blew_up else (NEVER_LEARNED, stalled, None)
    else:
        verdict, reason, total = _trend(c, error_slope, valid_slope)
    return TrialAnalysis(n_epochs=c.n, n_frozen=sum(1 for r in history if value_of(r, "phase") == "frozen"),
                         final_error=c.final, best_error=c.best, best_epoch=c.epochs[c.best_idx],
                         last_epoch=c.epochs[-1], epochs_past_best=c.n - 1 - c.best_idx, final_gap=float(gap[-1]),
                         gap_trend=_slope(gap), valid_loss_slope=valid_slope, error_slope=error_slope,
                         verdict=verdict, reason=reason, recommended_total_epochs=total)
