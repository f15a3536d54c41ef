"""A median pruner that compares one-cycle schedules like with like.

Optuna's `MedianPruner` compares a trial's error at step t with the other trials'
errors at the same step t. With `fit_one_cycle`, epoch t of an 8-epoch schedule is
still at a high learning rate while epoch t of a 3-epoch schedule has finished
annealing, so step-by-step comparison prunes long schedules for being long.
`SchedulePruner` compares a trial at the same *phase* (frozen or unfrozen) and the
same *fraction* of that phase's schedule: the middle of a long cycle with the middle
of a short one, the end with the end.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState


def schedule_of(trial: FrozenTrial) -> tuple[int, int] | None:
    """(freeze_epochs, epochs) of a trial, from pet-sweep's `params` user attr or its Optuna params."""
    params: dict[str, Any] = trial.user_attrs.get("params") or trial.params
    if "freeze_epochs" not in params or "epochs" not in params:
        return None
    return int(params["freeze_epochs"]), int(params["epochs"])


def position(step: int, schedule: tuple[int, int]) -> tuple[str, float]:
    """Phase and fraction of that phase done after global epoch `step` (0-based)."""
    frozen, unfrozen = schedule
    if step < frozen:
        return "frozen", (step + 1) / frozen
    return "unfrozen", (step - frozen + 1) / unfrozen


def curve_at(phase: str, fraction: float, schedule: tuple[int, int], curve: list[float]) -> float | None:
    """The value of `curve` (one value per global epoch) at `fraction` of `phase` of `schedule`,
    interpolated linearly between the epochs on either side, so that a peer is compared neither
    further into its annealing nor earlier than the judged trial. None where the peer has no
    such phase, or has no epoch of that phase at or before `fraction`, or its curve is shorter."""
    frozen, unfrozen = schedule
    length = frozen if phase == "frozen" else unfrozen
    offset = 0 if phase == "frozen" else frozen
    exact = fraction * length  # epochs of the phase done at `fraction`
    if length == 0 or exact < 1 - 1e-9:
        return None
    below = min(length, math.floor(exact + 1e-9))
    above = min(length, below + 1)
    if offset + above - 1 >= len(curve):
        return None
    low, high = curve[offset + below - 1], curve[offset + above - 1]
    return low + (high - low) * min(1.0, exact - below)


def best_so_far(values: list[float], maximize: bool) -> list[float]:
    """Running best of a curve, NaNs skipped (NaN until a finite value has been seen)."""
    out, best = [], math.nan
    for value in values:
        if not math.isnan(value):
            best = value if math.isnan(best) else (max(best, value) if maximize else min(best, value))
        out.append(best)
    return out


def _curve(trial: FrozenTrial, maximize: bool) -> list[float]:
    """Best-so-far after each global epoch 0, 1, ... as far as the trial reported without a gap."""
    values, step = [], 0
    while step in trial.intermediate_values:
        values.append(float(trial.intermediate_values[step]))
        step += 1
    return best_so_far(values, maximize)


class SchedulePruner(optuna.pruners.BasePruner):
    """Prune a trial whose best value so far is worse than the given percentile of completed
    trials' best values at the same point of their schedule (the median by default, like
    Optuna's `MedianPruner`, which also compares the trial's best so far).

    Peers are COMPLETE trials only: a pruned trial's curve stops, so counting it would make
    the peer set change with the fraction compared. A peer's value at a fraction is
    interpolated between its epochs on either side. NaN values of peers are ignored; a
    trial whose current value is NaN is pruned. The study's direction is respected.

    Args:
        n_startup_trials: no pruning until this many trials have completed.
        n_warmup_steps: no pruning before this global epoch.
        n_min_trials: peers needed at the compared point before a decision is made.
        percentile: a trial is kept only while its best value is at least as good as this
            percentile of its peers' (50: the median; 25: it must be in the best quarter, as
            Optuna's `PercentilePruner(25)`).
        min_fraction: no pruning before this fraction of a phase's schedule. Trained from
            scratch, a model's validation error stays near chance while the one-cycle
            learning rate is high and drops only as it anneals, so before about half of the
            schedule the error says little about where a trial will end.
    """

    def __init__(self, n_startup_trials: int = 3, n_warmup_steps: int = 1, n_min_trials: int = 2,
                 percentile: float = 50.0, min_fraction: float = 0.0) -> None:
        # one check per argument, worded as Optuna's own pruners word theirs
        if n_startup_trials < 0:
            raise ValueError(f"Number of startup trials cannot be negative, but got {n_startup_trials=}.")
        if n_warmup_steps < 0:
            raise ValueError(f"Number of warmup steps cannot be negative, but got {n_warmup_steps=}.")
        if n_min_trials < 1:
            raise ValueError(f"Number of trials for comparison must be at least 1, but got {n_min_trials=}.")
        if not 0 < percentile < 100:
            raise ValueError(f"Percentile must be between 0 and 100 exclusive, but got {percentile=}.")
        if not 0 <= min_fraction < 1:
            raise ValueError(f"Minimum fraction must be in [0, 1), but got {min_fraction=}.")
        self.n_startup_trials, self.n_warmup_steps, self.n_min_trials = n_startup_trials, n_warmup_steps, n_min_trials
        self.percentile, self.min_fraction = percentile, min_fraction

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        schedule = schedule_of(trial)
        if step is None or schedule is None or step < self.n_warmup_steps or step >= sum(schedule) - 1:
            return False  # nothing to save by pruning at the last epoch
        if math.isnan(trial.intermediate_values[step]):
            return True
        completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if len(completed) < self.n_startup_trials:
            return False
        phase, fraction = position(step, schedule)
        if fraction < self.min_fraction:
            return False
        maximize = study.direction == StudyDirection.MAXIMIZE
        value = best_so_far([float(v) for k, v in sorted(trial.intermediate_values.items()) if k <= step],
                            maximize)[-1]
        peers = []
        for other in completed:
            other_schedule = schedule_of(other)
            at = None if other_schedule is None else curve_at(phase, fraction, other_schedule,
                                                               _curve(other, maximize))
            if at is not None and not math.isnan(at):
                peers.append(at)
        if len(peers) < self.n_min_trials:
            return False
        # numpy's linear interpolation, as Optuna's PercentilePruner (50 is the median)
        if maximize:
            return value < float(np.percentile(peers, 100 - self.percentile))
        return value > float(np.percentile(peers, self.percentile))
