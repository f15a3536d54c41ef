"""Search spaces: what a sweep may vary, and the pure mapping trial -> TrialParams.

A space file (``sweeps/*.yaml``) gives each recipe parameter as one of

* a fixed value:            ``epochs: 4``
* a choice:                 ``arch: {choices: [resnet18, resnet34]}``
* an int or float range:    ``epochs: {low: 2, high: 8}``,
                            ``base_lr: {low: 1.0e-4, high: 1.0e-2, log: true}``
* a learning rate anchored on an LR-finder suggestion:
                            ``base_lr: {anchor: frozen.valley, factor: [0.3, 3], log: true}``

An anchored learning rate is ``anchor x factor``: Optuna searches the factor (param
``<name>_factor``, a static distribution, which TPE needs), and the anchor is the suggestion
(``minimum``, ``steep``, ``valley`` or ``slide``) of fastai's ``lr_find`` for the trial's
architecture in the ``frozen`` phase (fresh head) or the ``unfrozen`` one (after the frozen
epochs). `pet_sweep.train.lrfind` runs the finder once per architecture and phase and hands the
results in as `Anchors`.

The unfrozen phase trains with ``lr_max=slice(lr_lo, lr_hi)``. Give either ``lr_lo`` (whose range
must lie below ``lr_hi``'s, so ``lr_lo <= lr_hi`` always holds) or ``lr_mult`` (``lr_lo = lr_hi /
lr_mult``, fastai's ``fine_tune`` convention, which lets both ends move together).

This module does no I/O and imports neither fastai nor mlflow: `config` reads the YAML, and
`suggest` works with any Optuna trial, including ``optuna.trial.FixedTrial`` in tests.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pet_sweep.errors import ConfigError, validation_reason
from pet_sweep.params import FROZEN_ONLY, TrialParams, inert_params

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

# The LR finder's phases and fastai's suggestion functions an anchor may name.
PHASES = ("frozen", "unfrozen")
SUGGESTIONS = ("minimum", "steep", "valley", "slide")
ANCHORABLE = ("base_lr", "lr_lo", "lr_hi")
ANCHORS = tuple(f"{phase}.{method}" for phase in PHASES for method in SUGGESTIONS)

# LR-finder results: architecture -> phase -> suggestion -> learning rate.
Anchors = Mapping[str, Mapping[str, Mapping[str, float]]]


class Strict(BaseModel):
    """What a user writes: unknown keys refused (extra="forbid"), frozen once read."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _read_for(info: ValidationInfo) -> str | None:
    """The parameter an entry is read for (``model_validate(raw, context={"param": name})``, which checks
    its values by the parameter's rules); None for one built in code, from values already checked."""
    return (info.context or {}).get("param")


class Choice(Strict):
    choices: list[Union[int, float, str]] = Field(min_length=1)

    @field_validator("choices")
    @classmethod
    def _valid_choices(cls, choices: list[Any], info: ValidationInfo) -> list[Any]:
        name = _read_for(info)
        return choices if name is None else [_check_value(name, v, f"{name}.choices[{i}]")
                                             for i, v in enumerate(choices)]


class Range(Strict):
    low: float
    high: float
    log: StrictBool = False
    step: float | None = None

    @field_validator("low", "high", mode="before")
    @classmethod
    def _valid_bound(cls, value: Any, info: ValidationInfo) -> Any:
        name = _read_for(info)
        return value if name is None else _check_value(name, value, f"{name}.{info.field_name}")

    @field_validator("step")
    @classmethod
    def _positive_step(cls, step: float | None) -> float | None:
        if step is not None and step <= 0:
            raise ValueError(f"`step` must be > 0, but got {step!r}")
        return step

    @model_validator(mode="after")
    def _consistent(self) -> "Range":
        if self.low > self.high:
            raise ValueError(f"`low <= high` must hold, but got (low={self.low!r}, high={self.high!r})")
        if self.log and self.step is not None:
            raise ValueError("`step` and `log: true` cannot be used together")
        return self


class Anchored(Strict):
    """A learning rate relative to an LR-finder suggestion: ``anchor x factor``.

    A single factor fixes the multiple.
    """

    anchor: str  # "<phase>.<suggestion>", one of ANCHORS
    factor: tuple[float, float] = Field(
        description="an anchored learning rate needs `factor: [low, high]` (the LR is anchor x factor)")
    log: StrictBool = False

    @field_validator("anchor")
    @classmethod
    def _known_anchor(cls, anchor: str) -> str:
        if anchor not in ANCHORS:
            raise ValueError(f"unknown anchor {anchor!r}; valid anchors: {', '.join(ANCHORS)}")
        return anchor

    @field_validator("factor", mode="before")
    @classmethod
    def _factor_range(cls, factor: Any, info: ValidationInfo) -> tuple[float, float]:
        factors = factor if isinstance(factor, (list, tuple)) else [factor, factor]
        if len(factors) != 2:
            raise ValueError(f"must be [low, high] or one number, but got {factor!r}")
        name = _read_for(info)
        low, high = factors if name is None else (_check_value(name, v, f"{name}.factor[{i}]")
                                                  for i, v in enumerate(factors))
        if low > high:
            raise ValueError(f"`0 < low <= high` must hold, but got (low={low!r}, high={high!r})")
        return low, high

    @property
    def phase(self) -> str:
        return self.anchor.split(".")[0]

    @property
    def method(self) -> str:
        return self.anchor.split(".")[1]


ParamSpec = Union[int, float, str, Choice, Range, Anchored]


class SearchSpace(Strict):
    """A validated search space. Build it with `parse_space`."""

    params: dict[str, ParamSpec]
    description: str = ""

    def bounds(self, name: str, arch: str | None = None, anchors: Anchors | None = None) -> tuple[Any, Any]:
        """Smallest and largest value a parameter can take.

        An anchored learning rate has bounds only once the finder has run: pass
        the trial's `arch` and the `anchors`.
        """
        spec = self.params[name]
        if isinstance(spec, Anchored):
            if arch is None or anchors is None:
                raise ConfigError(f"`{name}` is anchored on {spec.anchor}; its range is known only once the"
                                  " LR finder has run", key=name)
            anchor = anchor_value(anchors, arch, spec.anchor, name)
            return anchor * spec.factor[0], anchor * spec.factor[1]
        if isinstance(spec, Range):
            return spec.low, spec.high
        if isinstance(spec, Choice):
            return min(spec.choices), max(spec.choices)
        return spec, spec

    @property
    def anchored(self) -> dict[str, Anchored]:
        """The anchored learning rates, by parameter name."""
        return {name: spec for name, spec in self.params.items() if isinstance(spec, Anchored)}

    @property
    def anchor_phases(self) -> list[str]:
        """The finder phases the anchors need, in recipe order."""
        return [phase for phase in PHASES if any(spec.phase == phase for spec in self.anchored.values())]

    @property
    def architectures(self) -> list[str]:
        """Every architecture a trial may use."""
        spec = self.params["arch"]
        return [str(c) for c in spec.choices] if isinstance(spec, Choice) else [str(spec)]


def always_inert(space: SearchSpace) -> list[str]:
    """Frozen-phase parameters the space gives although its freeze_epochs is 0 in every trial."""
    if "freeze_epochs" not in space.params or space.bounds("freeze_epochs")[1] > 0:
        return []
    return [name for name in FROZEN_ONLY if name in space.params]


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




def _entry_error(err: ValidationError, key: str, model: type[BaseModel]) -> ConfigError:
    """A parameter entry pydantic refused, as a ConfigError naming the key (``epochs.low``, ``arch.choices[1]``)."""
    first = err.errors()[0]
    loc = key + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"])
    field = model.model_fields.get(str(first["loc"][-1])) if first["loc"] else None
    reason = validation_reason(first, missing=getattr(field, "description", None))
    # a validator's own message says the rule; pydantic's say only what is wrong
    shape = ("an anchored learning rate takes anchor, factor, log" if model is Anchored else
             "a parameter is a value, {choices: [...]} or {low: .., high: .., log: ..}")
    return ConfigError(reason if first["type"] == "value_error" else f"{reason}; {shape}", key=loc)


def _parse_param(name: str, raw: Any) -> ParamSpec:
    """One entry of a space file: a fixed value, ``{choices: ..}``, ``{low: .., high: ..}`` or ``{anchor: ..}``."""
    if not isinstance(raw, dict):
        return _check_value(name, raw, name)
    model: type[Choice | Range | Anchored] = Anchored if "anchor" in raw else Choice if "choices" in raw else Range
    if model is Anchored and name not in ANCHORABLE:
        raise ConfigError(f"only the learning rates ({', '.join(ANCHORABLE)}) can be anchored on the LR finder",
                          key=f"{name}.anchor")
    if model is Range and PARAMS[name][0] is str:
        raise ConfigError("an architecture is chosen with {choices: [...]}, not a range", key=name)
    try:
        return model.model_validate(raw, context={"param": name})
    except ValidationError as err:
        raise _entry_error(err, name, model) from None


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
    missing = [p for p in REQUIRED if p not in raw and p not in FROZEN_ONLY]  # those: checked below
    if missing:
        raise ConfigError(f"missing parameter(s) {', '.join(missing)}", key=missing[0])
    if ("lr_lo" in raw) == ("lr_mult" in raw):
        raise ConfigError("give exactly one of `lr_lo` (the slice's low end) or `lr_mult`"
                          " (lr_lo = lr_hi / lr_mult)", key="lr_lo")
    space = SearchSpace(params={name: _parse_param(name, value) for name, value in raw.items()},
                        description=str(description or ""))
    # without a frozen phase (freeze_epochs 0 throughout, as in an exported trial) base_lr may be left out
    unused = [p for p in FROZEN_ONLY if p not in raw and space.bounds("freeze_epochs")[1] > 0]
    if unused:
        raise ConfigError(f"missing parameter(s) {', '.join(unused)} (the frozen phase's learning rate; "
                          "needed where freeze_epochs can be > 0)", key=unused[0])
    lo, hi = space.params.get("lr_lo"), space.params["lr_hi"]
    if lo is None:
        return space
    if isinstance(lo, Anchored) and isinstance(hi, Anchored) and lo.anchor == hi.anchor:
        # same anchor: the factors alone decide, whatever the finder says
        if lo.factor[1] > hi.factor[0]:
            raise ConfigError(
                f"`lr_lo <= lr_hi` must always hold, but both are anchored on {lo.anchor} and lr_lo's factor can"
                f" reach {lo.factor[1]!r} while lr_hi's can be as low as {hi.factor[0]!r}; keep the factor ranges"
                " apart or search `lr_mult` instead", key="lr_lo")
    elif not isinstance(lo, Anchored) and not isinstance(hi, Anchored):
        _check_lo_hi(*space.bounds("lr_lo"), *space.bounds("lr_hi"))
    # otherwise `check_anchors` checks it once the finder has run, before the first trial
    return space


def _check_lo_hi(lo_min: float, lo_max: float, hi_min: float, hi_max: float, where: str = "") -> None:
    if lo_max > hi_min:
        raise ConfigError(
            f"`lr_lo <= lr_hi` must always hold, but{where} lr_lo can reach {lo_max!r} while lr_hi can be"
            f" as low as {hi_min!r}; keep the ranges apart or search `lr_mult` instead", key="lr_lo")


def anchor_value(anchors: Anchors, arch: str, anchor: str, name: str) -> float:
    """The learning rate an anchor (``frozen.valley``) stands for with `arch`."""
    phase, method = anchor.split(".")
    try:
        return float(anchors[arch][phase][method])
    except KeyError:
        raise ConfigError(f"no LR-finder result {anchor} for architecture {arch!r}: anchored learning rates need"
                          " the finder to run before the trials", key=name) from None


def check_anchors(space: SearchSpace, anchors: Anchors) -> None:
    """With the finder's results known, check every architecture can satisfy `lr_lo <= lr_hi`."""
    if "lr_lo" not in space.params:
        return
    for arch in space.architectures:
        lo, hi = space.bounds("lr_lo", arch, anchors), space.bounds("lr_hi", arch, anchors)
        _check_lo_hi(*lo, *hi, where=f" with {arch} (anchors from its LR finder)")


def anchor_params(space: SearchSpace, params: TrialParams, anchors: Anchors) -> dict[str, Any]:
    """What a trial's anchored learning rates came from, for its MLflow params.

    ``base_lr_anchor: frozen.valley``, ``base_lr_anchor_lr`` (the finder's LR) and
    ``base_lr_factor``; the resulting LR itself is in `params`.
    """
    shown: dict[str, Any] = {}
    for name, spec in space.anchored.items():
        if getattr(params, name) is None:  # not used by this trial
            continue
        anchor = anchor_value(anchors, params.arch, spec.anchor, name)
        shown.update({f"{name}_anchor": spec.anchor, f"{name}_anchor_lr": anchor,
                      f"{name}_factor": getattr(params, name) / anchor})
    return shown


def _suggest_one(trial: Any, name: str, spec: ParamSpec) -> Any:
    if isinstance(spec, Choice):
        return trial.suggest_categorical(name, spec.choices)
    if isinstance(spec, Range):
        if PARAMS[name][0] is int:
            return trial.suggest_int(name, int(spec.low), int(spec.high), step=int(spec.step or 1), log=spec.log)
        return trial.suggest_float(name, spec.low, spec.high, step=spec.step, log=spec.log)
    return spec


def suggest(space: SearchSpace, trial: Any, anchors: Anchors | None = None) -> TrialParams:
    """Map an Optuna trial (or `FixedTrial`) onto the recipe's parameters.

    Fixed values are not suggested, so Optuna sees only what really varies. An
    anchored learning rate is suggested as its factor (``<name>_factor``) and
    multiplied by the finder's suggestion for the trial's architecture. base_lr
    is suggested only when the trial has a frozen phase (define-by-run: TPE
    samples a conditional parameter from the trials that have it).
    """
    later = FROZEN_ONLY  # after freeze_epochs, which decides whether they act
    values = {name: _suggest_one(trial, name, spec) for name, spec in space.params.items()
              if not isinstance(spec, Anchored) and name not in later}
    inert = inert_params(values)
    values.update({name: _suggest_one(trial, name, spec) for name, spec in space.params.items()
                   if not isinstance(spec, Anchored) and name in later and name not in inert})
    for name, spec in space.anchored.items():
        if name in inert:
            continue
        anchor = anchor_value(anchors or {}, str(values["arch"]), spec.anchor, name)
        values[name] = anchor * trial.suggest_float(f"{name}_factor", spec.factor[0], spec.factor[1], log=spec.log)
    lr_hi = float(values["lr_hi"])
    lr_lo = float(values["lr_lo"]) if "lr_lo" in values else lr_hi / float(values["lr_mult"])
    base_lr = values.get("base_lr")
    return TrialParams(arch=str(values["arch"]), base_lr=None if base_lr is None else float(base_lr), lr_lo=lr_lo,
                       lr_hi=lr_hi, freeze_epochs=int(values["freeze_epochs"]), epochs=int(values["epochs"]))
