"""Search spaces: what a sweep may vary, and the pure mapping trial -> TrialParams.

A space file (``sweeps/*.yaml``) gives each recipe parameter as one of

* a fixed value:            ``epochs: 4``
* a choice:                 ``arch: {choices: [resnet18, resnet34]}``
* an int or float range:    ``epochs: {low: 2, high: 8}``,
                            ``base_lr: {low: 1.0e-4, high: 1.0e-2, log: true}``

The unfrozen phase trains with ``lr_max=slice(lr_lo, lr_hi)``. Give either
``lr_lo`` (whose range must lie below ``lr_hi``'s, so ``lr_lo <= lr_hi`` always
holds) or ``lr_mult`` (``lr_lo = lr_hi / lr_mult``, fastai's ``fine_tune``
convention, which lets both ends move together).

This module does no I/O and imports neither fastai nor mlflow: `config` reads
the YAML, and `suggest` works with any Optuna trial, including
``optuna.trial.FixedTrial`` in tests.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pet_sweep.errors import ConfigError

# Architectures by name -> depth. torchvision's ResNets are what fastbook uses;
# fastai's xresnets train well from scratch. Other names are looked up in timm.
ARCHITECTURES: dict[str, int] = {
    "resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101, "resnet152": 152,
    "xresnet18": 18, "xresnet34": 34, "xresnet50": 50, "xresnet101": 101, "xresnet152": 152,
}

# name -> (python type, smallest allowed value); a float whose minimum is 0 must be > 0
PARAMS: dict[str, tuple[type, float]] = {
    "arch": (str, 0),
    "base_lr": (float, 0),
    "lr_lo": (float, 0),
    "lr_hi": (float, 0),
    "lr_mult": (float, 1),
    "freeze_epochs": (int, 0),
    "epochs": (int, 1),
}
REQUIRED = ("arch", "base_lr", "lr_hi", "freeze_epochs", "epochs")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Choice(_Strict):
    choices: list[Union[int, float, str]] = Field(min_length=1)


class Range(_Strict):
    low: float
    high: float
    log: bool = False
    step: float | None = None


ParamSpec = Union[int, float, str, Choice, Range]


class SearchSpace(_Strict):
    """A validated search space. Build it with `parse_space`."""

    params: dict[str, ParamSpec]
    description: str = ""

    def bounds(self, name: str) -> tuple[Any, Any]:
        """Smallest and largest value a parameter can take."""
        spec = self.params[name]
        if isinstance(spec, Range):
            return spec.low, spec.high
        if isinstance(spec, Choice):
            return min(spec.choices), max(spec.choices)
        return spec, spec


@dataclass(frozen=True)
class TrialParams:
    """Everything that varies between trials: what the recipe receives."""

    arch: str
    base_lr: float
    lr_lo: float
    lr_hi: float
    freeze_epochs: int
    epochs: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def total_epochs(self) -> int:
        return self.freeze_epochs + self.epochs


def known_architecture(name: str) -> bool:
    """True for a torchvision/fastai ResNet name, or a timm model name when timm is installed."""
    if name in ARCHITECTURES:
        return True
    try:
        import timm  # optional; only asked about names we do not know
    except ImportError:
        return False
    return name in timm.list_models()


def _check_value(name: str, value: Any, key: str) -> Any:
    kind, minimum = PARAMS[name]
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"must be a string, but got {value!r}", key=key)
        if not known_architecture(value):
            raise ConfigError(
                f"unknown architecture {value!r}; valid choices: {', '.join(ARCHITECTURES)}"
                " (or a timm model name, with timm installed)", key=key)
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"must be a number, but got {value!r}", key=key)
    try:
        number = float(value)  # PyYAML reads 1e-3 (no dot) as a string
    except ValueError:
        raise ConfigError(f"must be a number, but got {value!r}", key=key) from None
    if kind is int:
        if number != int(number):
            raise ConfigError(f"must be a whole number, but got {value!r}", key=key)
        number = int(number)
    if not math.isfinite(number) or number < minimum or (minimum == 0 and kind is float and number == 0):
        rule = f">= {minimum}" if (kind is int or minimum) else "> 0"
        raise ConfigError(f"must be {rule}, but got {value!r}", key=key)
    return number


def _parse_param(name: str, raw: Any) -> ParamSpec:
    key = name
    if isinstance(raw, dict):
        try:
            spec = Choice(**raw) if "choices" in raw else Range(**raw)
        except ValidationError as err:
            first = err.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            raise ConfigError(f"{first['msg']} (got {first.get('input')!r}); a parameter is a"
                              " value, {choices: [...]} or {low: .., high: .., log: ..}",
                              key=f"{key}.{loc}" if loc else key) from None
        if isinstance(spec, Choice):
            values = [_check_value(name, v, f"{key}.choices[{i}]") for i, v in enumerate(spec.choices)]
            return Choice(choices=values)
        if PARAMS[name][0] is str:
            raise ConfigError("an architecture is chosen with {choices: [...]}, not a range", key=key)
        low = _check_value(name, raw["low"], f"{key}.low")
        high = _check_value(name, raw["high"], f"{key}.high")
        if low > high:
            raise ConfigError(f"`low <= high` must hold, but got (low={low!r}, high={high!r})", key=key)
        if spec.log and spec.step is not None:
            raise ConfigError("`step` and `log: true` cannot be used together", key=key)
        if spec.step is not None and spec.step <= 0:
            raise ConfigError(f"`step` must be > 0, but got {spec.step!r}", key=f"{key}.step")
        return Range(low=low, high=high, log=spec.log, step=spec.step)
    return _check_value(name, raw, key)


def parse_space(raw: Any) -> SearchSpace:
    """Validate the mapping read from a space file; raise `ConfigError` naming the key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a search space must be a mapping of parameter names, but got {type(raw).__name__}")
    raw = dict(raw)
    description = raw.pop("description", "")
    unknown = sorted(set(raw) - set(PARAMS))
    if unknown:
        raise ConfigError(f"unknown parameter {unknown[0]!r}; valid parameters: {', '.join(PARAMS)}",
                          key=unknown[0])
    missing = [p for p in REQUIRED if p not in raw]
    if missing:
        raise ConfigError(f"missing parameter(s) {', '.join(missing)}", key=missing[0])
    if ("lr_lo" in raw) == ("lr_mult" in raw):
        raise ConfigError("give exactly one of `lr_lo` (the slice's low end) or `lr_mult`"
                          " (lr_lo = lr_hi / lr_mult)", key="lr_lo")
    space = SearchSpace(params={name: _parse_param(name, value) for name, value in raw.items()},
                        description=str(description or ""))
    if "lr_lo" in space.params:
        lo_max, hi_min = space.bounds("lr_lo")[1], space.bounds("lr_hi")[0]
        if lo_max > hi_min:
            raise ConfigError(
                f"`lr_lo <= lr_hi` must always hold, but lr_lo can reach {lo_max!r} while lr_hi can be"
                f" as low as {hi_min!r}; keep the ranges apart or search `lr_mult` instead", key="lr_lo")
    return space


def _suggest_one(trial: Any, name: str, spec: ParamSpec) -> Any:
    if isinstance(spec, Choice):
        return trial.suggest_categorical(name, spec.choices)
    if isinstance(spec, Range):
        if PARAMS[name][0] is int:
            return trial.suggest_int(name, int(spec.low), int(spec.high), step=int(spec.step or 1), log=spec.log)
        return trial.suggest_float(name, spec.low, spec.high, step=spec.step, log=spec.log)
    return spec


def suggest(space: SearchSpace, trial: Any) -> TrialParams:
    """Map an Optuna trial (or `FixedTrial`) onto the recipe's parameters.

    Fixed values are not suggested, so Optuna sees only what really varies.
    """
    values = {name: _suggest_one(trial, name, spec) for name, spec in space.params.items()}
    lr_hi = float(values["lr_hi"])
    lr_lo = float(values["lr_lo"]) if "lr_lo" in values else lr_hi / float(values["lr_mult"])
    return TrialParams(arch=str(values["arch"]), base_lr=float(values["base_lr"]), lr_lo=lr_lo,
                       lr_hi=lr_hi, freeze_epochs=int(values["freeze_epochs"]), epochs=int(values["epochs"]))


def params_from_dict(values: dict[str, Any]) -> TrialParams:
    """Rebuild TrialParams from a mapping (an exported config, a trial's user attrs)."""
    try:
        return TrialParams(arch=str(values["arch"]), base_lr=float(values["base_lr"]),
                           lr_lo=float(values["lr_lo"]), lr_hi=float(values["lr_hi"]),
                           freeze_epochs=int(values["freeze_epochs"]), epochs=int(values["epochs"]))
    except KeyError as err:
        raise ConfigError(f"missing recipe parameter {err.args[0]!r}", key=f"params.{err.args[0]}") from None
