"""How a sweep names its winner above the seed noise: the `selection:` settings, fastai's
`fine_tune` defaults as a baseline config of the space, and the resolution of a validation set.

Pure: pydantic and arithmetic only (no optuna, torch or mlflow), so `config`, `report` and the
sweep all read it. The Optuna side (queuing repeats and the baseline) is `sweep.confirm`.

Intensification, after SMAC: a trial whose error beats the incumbent's mean is re-run on
further training seeds, each run a trial of its own; the incumbent is the config with the
lowest mean error over its seeds. Every config's first run uses the experiment's `seed`, its
repeats `seed + 1`, `seed + 2`, ..., so two configs always share seeds and a paired test can
pair their runs item by item and seed by seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

from pydantic import Field

from pet_sweep.errors import ConfigError
from pet_sweep.params import TrialParams
from pet_sweep.space import Anchored, Choice, Range, SearchSpace, Strict

# fastai 2.8's `Learner.fine_tune(epochs, base_lr=2e-3, freeze_epochs=1, lr_mult=100)`: one frozen epoch
# at base_lr, then base_lr is halved and the unfrozen phase trains at slice(base_lr/2/lr_mult, base_lr/2).
FINE_TUNE_BASE_LR = 2e-3
FINE_TUNE_FREEZE_EPOCHS = 1
FINE_TUNE_LR_MULT = 100

POWER = 0.8  # the detectable difference: found 4 times in 5 by a two-sided test at ALPHA 0.05
_Z = NormalDist().inv_cdf(0.975) + NormalDist().inv_cdf(POWER)  # 1.96 + 0.84


class SelectionConfig(Strict):
    """`selection:` of an experiment: how many training seeds confirm a leader, how many leaders
    are confirmed at most, and whether fastai's `fine_tune` defaults run as the baseline."""

    seeds: int = Field(1, ge=1)          # training seeds a confirmed config runs on (1: no repeats)
    confirm_top: int = Field(0, ge=0)    # configs confirmed on all seeds at most (each costs seeds - 1 trials)
    baseline: bool = False               # run fastai's fine_tune defaults on the same seeds (costs `seeds` trials)

    @property
    def repeats(self) -> int:
        """Trials one confirmation adds: the config's runs on the seeds after its first."""
        return self.seeds - 1

    def reserved(self) -> int:
        """Trials of the budget the baseline and the confirmations take at most."""
        return (self.seeds if self.baseline else 0) + self.confirm_top * self.repeats

    def fitted(self, n_trials: int) -> "SelectionConfig":
        """This selection cut down until it leaves a trial of `n_trials` to search, for a command line's
        `--n-trials` below the file's (a resume's last few trials, `--n-trials 0`): fewer confirmations
        first, then no baseline, then one seed. Unchanged where it fits."""
        seeds, top, base = self.seeds, self.confirm_top, self.baseline

        def reserved() -> int:
            return (seeds if base else 0) + top * (seeds - 1)
        while top and reserved() >= n_trials:
            top -= 1
        if base and reserved() >= n_trials:
            base = False
        if not top and not base:
            seeds = 1
        if (seeds, top, base) == (self.seeds, self.confirm_top, self.baseline):
            return self
        return self.model_copy(update={"seeds": seeds, "confirm_top": top, "baseline": base})

    def budget_text(self, n_trials: int) -> str:
        """What the run's header says about the budget the repeats spend."""
        parts = []
        if self.baseline:
            parts.append(f"the baseline (fastai's fine_tune defaults) takes {_trials(self.seeds)}")
        if self.confirm_top and self.repeats:
            parts.append(f"confirming up to {self.confirm_top} leader(s) on {self.seeds} seeds takes up to "
                         f"{_trials(self.confirm_top * self.repeats)} more")
        if not parts:
            return "one seed per config, no baseline (selection: seeds 1, baseline false)"
        reserved = min(self.reserved(), n_trials)
        return (f"{'; '.join(parts)}: up to {reserved} of the {_trials(n_trials)}, "
                f"at least {n_trials - reserved} left to search")


def check_selection(sel: SelectionConfig, n_trials: int, *, file: str, experiment: str) -> None:
    """`confirm_top` configs confirmed at most: no more than the trials of the budget, and with the
    baseline and the repeats they need, at least one trial left to search."""
    if sel.confirm_top > n_trials:
        raise ConfigError(f"confirm_top must be <= budget.n_trials, but got {sel.confirm_top} > {n_trials}",
                          file=file, experiment=experiment, key="selection.confirm_top")
    if sel.reserved() >= n_trials and (sel.baseline or sel.confirm_top):
        raise ConfigError(f"the baseline and the confirmations take up to {sel.reserved()} trials, which leaves none of "
                          f"budget.n_trials {n_trials} to search: raise n_trials or lower selection.seeds "
                          f"({sel.seeds}) or selection.confirm_top ({sel.confirm_top})",
                          file=file, experiment=experiment, key="selection.seeds")


def _trials(n: int) -> str:
    return f"{n} trial" if n == 1 else f"{n} trials"


def training_seeds(first: int, seeds: int) -> list[int]:
    """The seeds a confirmed config runs on: the experiment's, then the next ones."""
    return [first + i for i in range(seeds)]


def _inside(spec: Any, value: float) -> float:
    """`value` brought inside a range or a choice of the space (the nearest allowed value)."""
    if isinstance(spec, Range):
        return min(max(value, spec.low), spec.high)
    if isinstance(spec, Choice):
        return min(spec.choices, key=lambda c: abs(float(c) - value))
    return value


def baseline_params(space: SearchSpace) -> tuple[TrialParams, list[str]]:
    """fastai's `fine_tune` defaults in the space's terms, and what differs from fastai's own call.

    The space's first architecture; freeze_epochs 1 at base_lr 2e-3; the unfrozen phase at
    slice(1e-5, 1e-3) (base_lr halved, lr_mult 100: what fastai really passes, whether the
    space names `lr_lo` or `lr_mult`); the middle of the space's epochs. The learning rates
    are fastai's even where the space's ranges do not reach them: the baseline is fastai's
    default, not a point of the search, and runs from its own user attributes.
    """
    notes = []
    arch = space.architectures[0]
    epochs_spec = space.params["epochs"]
    if isinstance(epochs_spec, Range):
        epochs = int(round((epochs_spec.low + epochs_spec.high) / 2))
    elif isinstance(epochs_spec, Choice):
        choices = sorted(int(c) for c in epochs_spec.choices)
        epochs = choices[(len(choices) - 1) // 2]
    else:
        epochs = int(epochs_spec)
    hi = FINE_TUNE_BASE_LR / 2
    lo = hi / FINE_TUNE_LR_MULT
    for name, value in (("base_lr", FINE_TUNE_BASE_LR), ("lr_hi", hi), ("lr_lo", lo),
                        ("lr_mult", float(FINE_TUNE_LR_MULT)), ("freeze_epochs", FINE_TUNE_FREEZE_EPOCHS)):
        spec = space.params.get(name)
        if spec is None or isinstance(spec, Anchored):
            continue
        if _inside(spec, value) != value:
            notes.append(f"{name}={value:g} lies outside the space's {name}")
    notes.append("the recipe's one-cycle schedules (fit_one_cycle's pct_start and div), not fine_tune's")
    return TrialParams(arch=arch, base_lr=FINE_TUNE_BASE_LR, lr_lo=lo, lr_hi=hi,
                       freeze_epochs=FINE_TUNE_FREEZE_EPOCHS, epochs=epochs), notes


@dataclass(frozen=True)
class Resolution:
    """The smallest difference in error rate a sweep's comparison detects (`resolution`)."""

    difference: float          # in error rate (0.157: 15.7 points)
    n_items: int
    error: float               # the error rate it is measured at (the baseline's)
    seeds: int                 # runs each config's mean is over
    spread: float | None       # standard deviation of one config's error over seeds; None: not known yet
    of: str = "the baseline's"  # whose error `error` is

    def text(self) -> str:
        seeds = (f", seed spread {self.spread:.1%} over {self.seeds} seeds" if self.spread is not None
                 else ", seed spread not measured yet")
        return (f"differences below {self.difference:.1%} in error rate are noise here "
                f"({self.n_items} validation items at {self.of} {self.error:.1%}{seeds}; "
                f"a difference this large is found {POWER:.0%} of the time at p < 0.05)")


def resolution(n_items: int, error: float, seeds: int = 1, spread: float | None = None,
               of: str = "the baseline's") -> Resolution:
    """The difference two configs' mean errors must have to be found beyond noise, 4 times in 5.

    Normal approximation of the paired test over items and seeds: each config's mean over
    `seeds` runs of `n_items` items varies by error*(1-error)/(n_items*seeds) from the items
    (two configs err on items independently: the discordant share is about 2*error*(1-error))
    and by spread**2/seeds from the training seed; a difference of two such means needs
    (z_0.975 + z_0.8) times its standard deviation.
    """
    if n_items <= 0:
        raise ValueError(f"`n_items > 0` must hold, but got {n_items}")
    p = min(max(error, 1.0 / n_items), 1 - 1.0 / n_items)  # an error of 0 still has item noise
    var = 2 * p * (1 - p) / (n_items * seeds) + (2 * spread ** 2 / seeds if spread else 0.0)
    return Resolution(_Z * math.sqrt(var), n_items, error, seeds, spread, of)


def items_needed(error: float, difference: float, seeds: int = 1) -> int:
    """Validation items the item part of `resolution` needs to detect `difference` at `error`."""
    if difference <= 0:
        raise ValueError(f"items_needed: the difference to detect must be above 0, got {difference!r}")
    p = min(max(error, 1e-3), 1 - 1e-3)
    return int(math.ceil(2 * p * (1 - p) * _Z ** 2 / (seeds * difference ** 2)))


def resolution_warning(res: Resolution, likely: float, valid_pct: float, n_seeds: int) -> str | None:
    """A warning when the differences the space likely makes (`likely`) are below the resolution, and
    what to change; None when they are not."""
    if likely >= res.difference or likely <= 0:
        return None  # no measured difference between configs: nothing to resolve, nothing to advise
    need = items_needed(res.error, likely, res.seeds)
    wanted = valid_pct * need / res.n_items
    more_items = (f"data.valid_pct {valid_pct:g} gives {res.n_items} items; about {need} are needed "
                  + (f"(valid_pct {wanted:.2g})" if wanted <= 0.5 else
                     f"(valid_pct {wanted:.2g}: more than the data can spare for validation)"))
    seeds = "" if res.spread is None else f", or raise selection.seeds (now {n_seeds})"
    return (f"the configs are likely to differ by about {likely:.1%}, below the {res.difference:.1%} this validation "
            f"set resolves: {more_items}{seeds}")


def kind_of(attrs: Any, number: int) -> str:
    """A trial's part in the selection, from its user attributes: "baseline", "repeat" (a run of an
    earlier trial's config on another seed) or "search"."""
    if attrs.get(BASELINE_ATTR):
        return "baseline"
    return "repeat" if str(attrs.get(CONFIG_ATTR, number)) != str(number) else "search"


# Trial user attributes of a sweep's selection (read by the report, `export` and `list`).
SEED_ATTR = "train_seed"      # the training seed the trial ran on; absent: the experiment's `seed`
CONFIG_ATTR = "config_id"     # the config a repeat re-runs (the number of its first trial); absent: its own number
BASELINE_ATTR = "baseline"    # True on the runs of fastai's fine_tune defaults
BASELINE_ID = "baseline"      # the config_id of those runs
