"""Warm start (`sampler: {warm_start: [...], top: K}`): the K best configs of earlier studies
run as this study's first trials, each checked against this study's space.

A source is a study name in this experiment's storage, or the name of another experiment of
the same experiments file (its own storage and study). A value outside this space's range is
clipped to it (and said); a categorical value this space does not offer is refused (exit 2,
naming the key), since no nearest choice exists. Parameters this space does not search are
left out, and those the earlier trial lacks are sampled as usual.

Order of the first trials: these are queued when the sweep starts, so they run first; a
`selection.baseline` trial, where the sweep has one, is queued by `sweep.confirm` at the first
claim and runs after them; then the sampler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import optuna
from optuna.trial import TrialState

from pet_sweep.config import Experiment, load_experiment
from pet_sweep.errors import ConfigError
from pet_sweep.space import PARAMS, Anchored, Choice, Range, SearchSpace
from pet_sweep.sweep.records import error_of

WARM_ATTR = "warm_start"  # a trial's user attr: where its config came from; the study's: what was queued
KEY = "sampler.warm_start"


@dataclass(frozen=True)
class WarmConfig:
    """One config to queue: its params as Optuna sees them, where it came from, what was clipped."""

    params: dict[str, Any]
    source: str
    clipped: tuple[str, ...] = ()


def searched(space: SearchSpace) -> dict[str, Choice | Range | tuple[float, float, bool]]:
    """The parameters Optuna suggests in this space, by the name Optuna stores them under
    (an anchored learning rate as `<name>_factor`, its factor's range)."""
    out: dict[str, Any] = {}
    for name, spec in space.params.items():
        if isinstance(spec, (Choice, Range)):
            out[name] = spec
        elif isinstance(spec, Anchored):
            out[f"{name}_factor"] = Range(low=spec.factor[0], high=spec.factor[1], log=spec.log)
    return out


def _fit(name: str, value: Any, spec: Choice | Range, exp: Experiment, source: str) -> tuple[Any, bool]:
    """`value` made valid for `spec`: (the value, whether it was clipped); a foreign choice is refused."""
    if isinstance(spec, Choice):
        if value not in spec.choices:
            raise ConfigError(f"{source} has {name}={value!r}, which this space does not offer (choices: "
                              f"{spec.choices}); warm-start from a study of a compatible space, or add the choice",
                              file=exp.where, experiment=exp.name, key=f"{KEY}.{name}")
        return value, False
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(f"{source} has {name}={value!r}, not a number as this space's range "
                          f"[{spec.low:g}, {spec.high:g}] needs", file=exp.where, experiment=exp.name, key=f"{KEY}.{name}")
    fitted = min(max(float(value), spec.low), spec.high)
    if spec.step is not None:
        fitted = spec.low + round((fitted - spec.low) / spec.step) * spec.step
    if PARAMS.get(name, (float,))[0] is int:
        fitted = int(round(fitted))
    return fitted, not math.isclose(fitted, float(value))


def _source_study(exp: Experiment, source: str) -> optuna.Study:
    """The earlier study `source` names: another experiment of the same file, else a study in this storage."""
    storage, study_name = exp.storage_url, source
    if exp.config_path is not None and source != exp.name:
        try:
            other = load_experiment(exp.config_path, source)
        except ConfigError:
            other = None  # not an experiment of this file: a study name
        if other is not None:
            storage, study_name = other.storage_url, other.study_name
    try:
        return optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        raise ConfigError(f"no study or experiment named {source!r} (looked for study {study_name!r} in the "
                          f"storage and for an experiment in {exp.where})", file=exp.where, experiment=exp.name,
                          key=KEY) from None


def plan_warm_start(exp: Experiment) -> list[WarmConfig]:
    """The configs to queue, best first within each source, checked against this space (no study is changed)."""
    cfg, space = exp.config.sampler, searched(exp.space)
    planned: list[WarmConfig] = []
    seen: set[tuple[tuple[str, Any], ...]] = set()
    for source in cfg.warm_start:
        done = [t for t in _source_study(exp, source).get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if error_of(t) is not None]
        if not done:
            raise ConfigError(f"study {source!r} has no complete trial to start from", file=exp.where,
                              experiment=exp.name, key=KEY)
        for trial in sorted(done, key=lambda t: (error_of(t), t.number))[:cfg.top]:
            where = f"trial {trial.number} of {source!r}"
            params, clipped = {}, []
            for name, value in trial.params.items():
                if name in space:
                    params[name], was_clipped = _fit(name, value, space[name], exp, where)
                    if was_clipped:
                        clipped.append(f"{name} {value:.4g} -> {params[name]:.4g}")
            key = tuple(sorted(params.items()))
            if params and key not in seen:
                seen.add(key)
                planned.append(WarmConfig(params, where, tuple(clipped)))
    return planned


def enqueue_warm_start(study: optuna.Study, planned: list[WarmConfig], echo: Callable[[str], None]) -> int:
    """Queue the planned configs as the study's next trials, once per study (a resume or a
    second worker finds them queued already). Run under the budget's claim lock. The count queued."""
    if not planned or WARM_ATTR in study.user_attrs:
        return 0
    for warm in planned:
        study.enqueue_trial(warm.params, user_attrs={WARM_ATTR: warm.source})
    study.set_user_attr(WARM_ATTR, [w.source for w in planned])
    clipped = [f"{w.source}: {', '.join(w.clipped)}" for w in planned if w.clipped]
    echo(f"warm start   {len(planned)} configs queued as the first trials: {', '.join(w.source for w in planned)}"
         + (f"; clipped to this space: {'; '.join(clipped)}" if clipped else ""))
    return len(planned)
