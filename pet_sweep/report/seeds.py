"""Configs over their seeds: a config's mean error, its spread over training seeds, its median run;
the best config; and whether the sweep beat fastai's `fine_tune` defaults (the baseline).

A config is what a trial's parameters name; its runs are its trials on different training seeds
(`selection.CONFIG_ATTR`, `selection.SEED_ATTR`). Two configs are compared paired over the items
and the seeds they share: the predictions of their runs on each shared seed, item by item, in one
exact McNemar test. Pure: no I/O, no optuna, torch or mlflow.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from pet_sweep.report.stats import ALPHA, Comparison, compare_predictions, compare_rates, plural
from pet_sweep.selection import BASELINE_ATTR, BASELINE_ID, CONFIG_ATTR, SEED_ATTR


@dataclass(frozen=True)
class Run:
    """One completed run of a config: a trial on one training seed."""

    number: int
    config_id: str
    seed: int
    error: float
    baseline: bool = False
    preds: tuple[int, ...] = ()
    targets: tuple[int, ...] = ()


@dataclass(frozen=True)
class ConfigSummary:
    """A config over its completed runs, ordered by seed."""

    config_id: str
    runs: tuple[Run, ...]
    baseline: bool = False

    @property
    def errors(self) -> list[float]:
        return [r.error for r in self.runs]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.errors)

    @property
    def spread(self) -> float | None:
        """The standard deviation of its error over seeds; None with one seed."""
        return statistics.stdev(self.errors) if len(self.runs) > 1 else None

    @property
    def n_seeds(self) -> int:
        return len(self.runs)

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(r.seed for r in self.runs)

    @property
    def median_run(self) -> Run:
        """The run at the (lower) median of its errors: what `export` replays (ties: the lower seed)."""
        ranked = sorted(self.runs, key=lambda r: (r.error, r.seed))
        return ranked[(len(ranked) - 1) // 2]

    @property
    def name(self) -> str:
        return "the baseline (fastai's fine_tune defaults)" if self.baseline else f"config {self.config_id}"

    def text(self) -> str:
        """``12.2% ± 3.1% over 2 seeds (trials 3, 5)``: its mean, spread and runs."""
        spread = f" ± {self.spread:.1%} (sd)" if self.spread is not None else ""
        trials = ", ".join(str(r.number) for r in self.runs)
        return f"{self.mean:.2%}{spread} over {plural(self.n_seeds, 'seed')} (trial{'s' if self.n_seeds > 1 else ''} {trials})"


def summarise(runs: Iterable[Run]) -> list[ConfigSummary]:
    """Every config with its runs (one run per seed: a retried seed keeps its first completed run)."""
    by_config: dict[str, dict[int, Run]] = {}
    for run in sorted(runs, key=lambda r: r.number):
        by_config.setdefault(run.config_id, {}).setdefault(run.seed, run)
    return [ConfigSummary(cid, tuple(sorted(seeds.values(), key=lambda r: r.seed)),
                          baseline=any(r.baseline for r in seeds.values()))
            for cid, seeds in by_config.items()]


def best_config(configs: Sequence[ConfigSummary]) -> ConfigSummary | None:
    """The incumbent: of the searched configs (the baseline aside) run on the most seeds, the lowest mean
    (ties: the earlier config). A config seen on fewer seeds cannot displace one confirmed on more: its
    single lucky draw is what the repeats are there to test."""
    searched = [c for c in configs if not c.baseline]
    if not searched:
        return None
    most = max(c.n_seeds for c in searched)
    return min((c for c in searched if c.n_seeds == most), key=lambda c: (c.mean, c.runs[0].number))


def baseline_of(configs: Sequence[ConfigSummary]) -> ConfigSummary | None:
    return next((c for c in configs if c.baseline), None)


def seed_spread(configs: Sequence[ConfigSummary]) -> tuple[float, int] | None:
    """The pooled standard deviation over seeds of the configs with two seeds or more, and its runs."""
    several = [c for c in configs if c.n_seeds > 1]
    if not several:
        return None
    dof = sum(c.n_seeds - 1 for c in several)
    pooled = sum((c.n_seeds - 1) * c.spread ** 2 for c in several) / dof  # type: ignore[operator]
    return pooled ** 0.5, sum(c.n_seeds for c in several)


def compare_configs(label: str, a: ConfigSummary, b: ConfigSummary) -> Comparison | None:
    """`a` against `b`, paired over their shared seeds and items: one exact McNemar test on every
    (seed, item) pair. From error totals where predictions are missing; None with no shared seed."""
    shared = sorted(set(a.seeds) & set(b.seeds))
    if not shared:
        return None
    ra = {r.seed: r for r in a.runs}
    rb = {r.seed: r for r in b.runs}
    pairs = [(ra[s], rb[s]) for s in shared]
    if all(x.preds and x.targets == y.targets and len(x.preds) == len(y.preds) == len(x.targets)
           for x, y in pairs):
        preds_a = tuple(p for x, _ in pairs for p in x.preds)
        preds_b = tuple(p for _, y in pairs for p in y.preds)
        targets = tuple(t for x, _ in pairs for t in x.targets)
        return compare_predictions(label, (a.median_run.number, preds_a), (b.median_run.number, preds_b), targets)
    n = sum(len(x.targets) for x, _ in pairs)
    if not n:
        return None
    mean = lambda runs: sum(r.error * len(runs[0].targets) for r in runs) / n  # noqa: E731
    return compare_rates(label, (a.median_run.number, mean([x for x, _ in pairs])),
                         (b.median_run.number, mean([y for _, y in pairs])), n)


@dataclass(frozen=True)
class Selection:
    """What the report's first lines say: the best config and whether it beat the baseline."""

    best: ConfigSummary
    baseline: ConfigSummary | None
    versus: Comparison | None   # best against the baseline, over their shared seeds and items
    n_configs: int

    @property
    def worth_it(self) -> str:
        """The verdict: was the sweep worth it, against fastai's fine_tune defaults?"""
        if self.baseline is None:
            return "not asked: no baseline ran (selection.baseline: true runs fastai's fine_tune defaults)"
        if self.versus is None:
            if set(self.best.seeds) & set(self.baseline.seeds):
                return "cannot tell: the runs on the seeds they share recorded no validation items"
            return "cannot tell: the winner and the baseline share no seed"
        if self.versus.best_error < self.versus.other_error and self.versus.verdict == "beyond noise":
            return "yes: the sweep's winner beats fastai's fine_tune defaults beyond noise"
        if self.versus.best_error >= self.versus.other_error:
            return ("no: fastai's fine_tune defaults did as well or better than the sweep's winner "
                    "(the baseline is a reference, not a pick: run it with fastai's own `fine_tune`)")
        return "not shown: the winner is lower than fastai's fine_tune defaults, but within noise"

    def lines(self) -> list[tuple[str, str]]:
        lines = [("worth it?", self.worth_it)]
        lines.append(("best config", f"{self.best.name}: {self.best.text()}, the lowest mean of "
                                     f"{plural(self.n_configs, 'config')}"))
        if self.baseline is not None:
            lines.append(("baseline", f"{self.baseline.name}: {self.baseline.text()}"))
        if self.versus is not None:
            shared = len(set(self.best.seeds) & set(self.baseline.seeds)) if self.baseline else 0
            lines.append(("vs baseline", f"{self.versus.text()} (one planned test at p < {ALPHA:g}, "
                                         f"paired over {plural(shared, 'seed')} and the items)"))
        return lines


def selection_of(runs: Sequence[Run]) -> Selection | None:
    """The report's selection: None in a study with one run per config and no baseline (nothing to add)."""
    configs = summarise(runs)
    best = best_config(configs)
    baseline = baseline_of(configs)
    if best is None or (baseline is None and best.n_seeds == 1):
        return None
    versus = compare_configs("baseline", best, baseline) if baseline is not None else None
    return Selection(best, baseline, versus, sum(not c.baseline for c in configs))


def representatives(runs: Sequence[Run]) -> list[int]:
    """The trial numbers that stand for the searched configs in the trial-level analysis: the median run of
    each config, the baseline left out (it is a reference, never a pick)."""
    return [c.median_run.number for c in summarise(runs) if not c.baseline]


def run_of(number: int, attrs: Any, error: float, default_seed: int, preds: Sequence[int] = (),
           targets: Sequence[int] = ()) -> Run:
    """A completed trial as a `Run`, from its user attributes (a mapping)."""
    baseline = bool(attrs.get(BASELINE_ATTR, False))
    config = BASELINE_ID if baseline else str(attrs.get(CONFIG_ATTR, number))
    return Run(number, config, int(attrs.get(SEED_ATTR, default_seed)), float(error), baseline,
               tuple(preds), tuple(targets))
