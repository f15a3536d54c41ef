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


def step_at(phase: str, fraction: float, schedule: tuple[int, int]) -> int | None:
    """The global epoch of `schedule` closest to `fraction` of `phase` (None if it has no such phase)."""
    frozen, unfrozen = schedule
    length = frozen if phase == "frozen" else unfrozen
    if length == 0:
        return None
    within = min(length, max(1, math.floor(fraction * length + 0.5))) - 1
    return within if phase == "frozen" else frozen + within


class SchedulePruner(optuna.pruners.BasePruner):
    """Prune a trial whose error is above the given percentile of finished trials at the same
    point of their schedule (the median by default, like Optuna's `MedianPruner`).

    Args:
        n_startup_trials: no pruning until this many trials have finished.
        n_warmup_steps: no pruning before this global epoch.
        n_min_trials: peers needed at the compared point before a decision is made.
        percentile: a trial is kept only while its error is at or below this percentile of
            its peers' (50: the median; 25: it must be in the best quarter, as Optuna's
            `PercentilePruner(25)`).
        min_fraction: no pruning before this fraction of a phase's schedule. Trained from
            scratch, a model's validation error stays near chance while the one-cycle
            learning rate is high and drops only as it anneals, so before about half of the
            schedule the error says little about where a trial will end.
    """

    def __init__(self, n_startup_trials: int = 3, n_warmup_steps: int = 1, n_min_trials: int = 2,
                 percentile: float = 50.0, min_fraction: float = 0.0) -> None:
        if (n_startup_trials < 0 or n_warmup_steps < 0 or n_min_trials < 1 or not 0 < percentile < 100
                or not 0 <= min_fraction < 1):
            raise ValueError(f"n_startup_trials >= 0, n_warmup_steps >= 0, n_min_trials >= 1, "
                             f"0 < percentile < 100 and 0 <= min_fraction < 1 must hold, but got "
                             f"({n_startup_trials}, {n_warmup_steps}, {n_min_trials}, {percentile}, {min_fraction})")
        self.n_startup_trials, self.n_warmup_steps, self.n_min_trials = n_startup_trials, n_warmup_steps, n_min_trials
        self.percentile, self.min_fraction = percentile, min_fraction

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        schedule = schedule_of(trial)
        if step is None or schedule is None or step < self.n_warmup_steps or step >= sum(schedule) - 1:
            return False  # nothing to save by pruning at the last epoch
        value = trial.intermediate_values[step]
        if math.isnan(value):
            return True
        finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        if len(finished) < self.n_startup_trials:
            return False
        phase, fraction = position(step, schedule)
        if fraction < self.min_fraction:
            return False
        peers = []
        for other in finished:
            other_schedule = schedule_of(other)
            at = None if other_schedule is None else step_at(phase, fraction, other_schedule)
            if at is not None and at in other.intermediate_values:
                peers.append(other.intermediate_values[at])
        if len(peers) < self.n_min_trials:
            return False
        # numpy's linear interpolation, as Optuna's PercentilePruner (50 is the median)
        return value > float(np.percentile(peers, self.percentile))
