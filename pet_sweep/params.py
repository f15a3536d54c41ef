"""What a trial's recipe receives: `TrialParams`, and which of them acted in a trial.

Pure: no I/O, no fastai, no mlflow. `space.suggest` builds TrialParams from an Optuna
trial; `params_from_dict` from a mapping (an exported config, a trial's user attributes).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

from pet_sweep.errors import ConfigError

# Parameters that do nothing without a frozen phase (freeze_epochs 0): not sampled, not recorded.
FROZEN_ONLY = ("base_lr",)


@dataclass(frozen=True)
class TrialParams:
    """Everything that varies between trials: what the recipe receives."""

    arch: str
    base_lr: float | None  # the frozen phase's LR; None when there is none (freeze_epochs 0)
    lr_lo: float
    lr_hi: float
    freeze_epochs: int
    epochs: int

    def __post_init__(self) -> None:
        if self.freeze_epochs > 0 and self.base_lr is None:
            raise ValueError(f"a frozen phase needs base_lr, but got (base_lr=None, freeze_epochs={self.freeze_epochs})")

    def as_dict(self) -> dict[str, Any]:
        """The parameters that act on the trial: base_lr only where a frozen phase uses it."""
        inert = inert_params(asdict(self))
        return {k: v for k, v in asdict(self).items() if k not in inert and v is not None}

    @property
    def total_epochs(self) -> int:
        return self.freeze_epochs + self.epochs


def inert_params(values: Mapping[str, Any]) -> set[str]:
    """Names (with Optuna's ``<name>_factor`` of an anchored one) that had no effect on a trial with these values."""
    if values.get("freeze_epochs") is None or int(values["freeze_epochs"]) > 0:
        return set()
    return {f"{name}{tail}" for name in FROZEN_ONLY for tail in ("", "_factor")}


def lr_text(values: Mapping[str, Any], sep: str = " ") -> str:
    """``base_lr=1.00e-02 lr=slice(1.00e-04, 1.00e-03)``; base_lr left out where the trial had no frozen phase."""
    base = None if "base_lr" in inert_params(values) else values.get("base_lr")
    head = f"base_lr={float(base):.2e}{sep}" if base is not None else ""
    return f"{head}lr=slice({float(values.get('lr_lo', 0)):.2e}, {float(values.get('lr_hi', 0)):.2e})"


def params_from_dict(values: dict[str, Any]) -> TrialParams:
    """Rebuild TrialParams from a mapping (an exported config, a trial's user attrs).

    base_lr is needed only with a frozen phase; without one it is dropped (it did nothing).
    """
    try:
        freeze_epochs = int(values["freeze_epochs"])
        base_lr = None if freeze_epochs == 0 else float(values["base_lr"])
        return TrialParams(arch=str(values["arch"]), base_lr=base_lr,
                           lr_lo=float(values["lr_lo"]), lr_hi=float(values["lr_hi"]),
                           freeze_epochs=freeze_epochs, epochs=int(values["epochs"]))
    except KeyError as err:
        why = " (the frozen phase's learning rate; needed when freeze_epochs > 0)" if err.args[0] in FROZEN_ONLY else ""
        raise ConfigError(f"missing recipe parameter {err.args[0]!r}{why}", key=f"params.{err.args[0]}") from None
