"""The sampler and the pruner an experiment names (`sampler:`, `pruner:`)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from pet_sweep.config import Experiment
from pet_sweep.space import Choice
from pet_sweep.sweep.pruners import SchedulePruner
from pet_sweep.sweep.records import experimental_relied_on


def trial_seed(seed: int, number: int) -> int:
    """The seed of trial `number`'s draws: the same trial of the same study draws the same."""
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """Optuna's sampler, seeded afresh for each trial from the seed and the trial's number.

    Trial numbers are handed out by the storage, one per trial across every worker and
    machine. So two machines that open a new study at the same moment do not draw the
    same parameters (as one seeded sampler per process would), a resume does not repeat
    the first run's draws, and a study stays reproducible: what a trial draws depends
    only on the seed, its number and the trials before it.
    """

    def __init__(self, make: Callable[[int | None], optuna.samplers.BaseSampler], seed: int | None) -> None:
        self._make, self._seed = make, seed
        self._inner = make(seed)

    def __str__(self) -> str:
        return f"{type(self._inner).__name__} (seeded per trial from {self._seed})"

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if self._seed is not None:
            self._inner = self._make(trial_seed(self._seed, trial.number))
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, Any]) -> dict[str, Any]:
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: Any) -> Any:
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


def categorical_keys(exp: Experiment) -> list[str]:
    """The space's parameters Optuna sees as categorical (a choice of more than one value)."""
    return [name for name, spec in exp.space.params.items() if isinstance(spec, Choice) and len(spec.choices) > 1]


def sampler_note(exp: Experiment) -> str:
    """What the header says of the sampler: its name, and for cmaes the keys it does not model."""
    cfg = exp.config.sampler
    note = cfg.name
    if cfg.name == "cmaes" and categorical_keys(exp):
        note += (f" (CMA-ES takes no categorical parameter: {', '.join(categorical_keys(exp))} drawn "
                 "at random for each trial, the numeric ones sampled jointly)")
    return note


def make_sampler(exp: Experiment) -> optuna.samplers.BaseSampler:
    cfg = exp.config.sampler
    if cfg.name == "gp":
        return TrialSeededSampler(lambda seed: _quiet(optuna.samplers.GPSampler, seed=seed,
                                                      n_startup_trials=cfg.n_startup_trials), cfg.seed)
    if cfg.name == "cmaes":
        # its own warning per categorical trial is replaced by the header's line (`sampler_note`)
        return TrialSeededSampler(lambda seed: optuna.samplers.CmaEsSampler(
            seed=seed, n_startup_trials=cfg.n_startup_trials, warn_independent_sampling=False,
            independent_sampler=optuna.samplers.RandomSampler(seed=seed)), cfg.seed)
    if cfg.name == "random":
        return TrialSeededSampler(lambda seed: optuna.samplers.RandomSampler(seed=seed), cfg.seed)
    if cfg.name == "nsga2":
        return TrialSeededSampler(lambda seed: optuna.samplers.NSGAIISampler(seed=seed), cfg.seed)
    return TrialSeededSampler(lambda seed: optuna.samplers.TPESampler(seed=seed, n_startup_trials=cfg.n_startup_trials),
                              cfg.seed)


def _quiet(make: Callable[..., optuna.samplers.BaseSampler], **kwargs: Any) -> optuna.samplers.BaseSampler:
    """A sampler Optuna marks experimental (GPSampler), chosen knowingly in the config: no warning per trial."""
    with experimental_relied_on():
        return make(**kwargs)


def make_pruner(exp: Experiment) -> optuna.pruners.BasePruner:
    cfg = exp.config.pruner
    if cfg.name == "schedule":
        return SchedulePruner(n_startup_trials=cfg.n_startup_trials, n_warmup_steps=cfg.n_warmup_steps,
                              percentile=cfg.percentile, min_fraction=cfg.min_fraction)
    if cfg.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.n_startup_trials, n_warmup_steps=cfg.n_warmup_steps)
    if cfg.name == "percentile":
        return optuna.pruners.PercentilePruner(cfg.percentile, n_startup_trials=cfg.n_startup_trials,
                                               n_warmup_steps=cfg.n_warmup_steps)
    if cfg.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=cfg.min_resource, reduction_factor=cfg.reduction_factor)
    if cfg.name == "wilcoxon":
        with experimental_relied_on():  # chosen knowingly in the config: no warning per study opened
            return optuna.pruners.WilcoxonPruner(p_threshold=cfg.p_threshold, n_startup_steps=cfg.n_warmup_steps)
    return optuna.pruners.NopPruner()
