"""Honest uncertainty: Wilson intervals, exact McNemar tests and Holm's correction.

Every error rate the report prints comes with its Wilson 95 % interval, and the
best trial is compared with its rivals by an exact McNemar test on the same
validation items (or, with error totals only, by the range of p every pairing
allows). Pure arithmetic on counts: no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from statistics import NormalDist
from typing import Sequence

import numpy as np

Z95 = NormalDist().inv_cdf(0.975)  # 1.959964...
ALPHA = 0.05          # "beyond noise": Holm-adjusted p < ALPHA; "no better than chance": chance p >= ALPHA


def plural(n: int, noun: str) -> str:
    """``1 trial``, ``3 trials``: a count with its noun."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def wilson(errors: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for `errors` wrong out of `n` (95 % by default)."""
    if n <= 0:
        raise ValueError(f"`n > 0` must hold, but got n={n}")
    if not 0 <= errors <= n:
        raise ValueError(f"`0 <= errors <= n` must hold, but got (errors={errors}, n={n})")
    p = errors / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # exact bounds at the ends (floating point would leave 1e-17 instead of 0)
    return (0.0 if errors == 0 else max(0.0, centre - half)), (1.0 if errors == n else min(1.0, centre + half))


def mcnemar_exact(only_a_wrong: int, only_b_wrong: int) -> float:
    """Two-sided exact McNemar p-value: a binomial test on the discordant items."""
    n = only_a_wrong + only_b_wrong
    if n == 0:
        return 1.0
    k = min(only_a_wrong, only_b_wrong)
    term = tail = 1  # C(n, 0); each next term from the last: exact Python ints, linear in k
    for i in range(k):
        term = term * (n - i) // (i + 1)
        tail += term
    return min(1.0, 2 * tail / 2 ** n)


def mcnemar_range(errors_a: int, errors_b: int, n: int) -> tuple[float, float]:
    """Smallest and largest exact McNemar p over every pairing two error totals on `n` items allow.

    Only-a-wrong minus only-b-wrong is fixed by the totals; the discordant count
    runs from |errors_a - errors_b| (every shared error shared) up to where the
    items run out (no item both get wrong, or none both get right). The p-value
    grows with the discordant count at a fixed difference, so the ends of that
    run are the ends of the range.
    """
    if not (0 <= errors_a <= n and 0 <= errors_b <= n):
        raise ValueError(f"`0 <= errors <= n` must hold, but got (errors_a={errors_a}, errors_b={errors_b}, n={n})")
    low, high = sorted((errors_a, errors_b))
    gap, most = high - low, min(low, n - high)  # `most`: items only the better one can get wrong
    return mcnemar_exact(0, gap), mcnemar_exact(most, most + gap)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in the order given (step-down, kept monotone, capped at 1).

    Reject where the adjusted p < ALPHA: the chance of any false "beyond noise"
    among the family then stays below ALPHA.
    """
    m = len(p_values)
    adjusted = [1.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda j: p_values[j])):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def chance_p_value(errors: int, n: int, n_classes: int) -> float:
    """One-sided exact binomial p of `errors` of `n` or fewer if the model guessed (error rate 1 - 1/n_classes).

    Small: better than chance. At or above ALPHA: no better than chance, by the numbers.
    """
    from scipy.stats import binomtest  # heavy: scipy.stats takes a second to import; only this test needs it

    return float(binomtest(errors, n, 1 - 1 / n_classes, alternative="less").pvalue)


def errors_of(error_rate: float, n: int) -> int:
    """Number of wrong items behind an error rate measured on `n` items."""
    return int(round(error_rate * n))


def format_rate(error_rate: float | None, n: int | None = None) -> str:
    """``1.39% (95% CI 0.60–3.21%, 5/359 wrong)``; the interval only when `n` is known."""
    if error_rate is None or not math.isfinite(error_rate):
        return "-"
    if not n:
        return f"{error_rate:.2%}"
    k = errors_of(error_rate, n)
    lo, hi = wilson(k, n)
    return f"{error_rate:.2%} (95% CI {lo:.2%}–{hi:.2%}, {k}/{n} wrong)"


@dataclass(frozen=True)
class Comparison:
    """Is the best trial really better than another, or within noise?

    Paired: one exact McNemar p on the shared items. From totals only: the range
    of p over every pairing the totals allow (`p_min` to `p_value`). `adjusted`
    is the same range after Holm–Bonferroni over all the report's comparisons
    (`with_holm`); the verdict reads it.
    """

    label: str                # "runner-up", "best resnet18", ...
    best_trial: int
    other_trial: int
    best_error: float
    other_error: float
    n_items: int
    only_best_wrong: int      # items the best trial gets wrong and the other gets right (totals: fewest possible)
    only_other_wrong: int
    p_value: float            # paired: the exact p; totals only: the largest p any pairing gives
    paired: bool
    p_min: float | None = None                    # totals only: the smallest p any pairing gives
    adjusted: tuple[float, float] | None = None   # (min, max) after Holm; None: no correction applied

    @property
    def p_range(self) -> tuple[float, float]:
        return (self.p_value if self.p_min is None else self.p_min), self.p_value

    @property
    def verdict(self) -> str:
        low, high = self.adjusted or self.p_range
        if high < ALPHA:
            return "beyond noise"
        return "within noise" if low >= ALPHA else "cannot tell"

    def with_holm(self, adjusted: tuple[float, float]) -> Comparison:
        return replace(self, adjusted=adjusted)

    def _p(self, which: str, low: float, high: float) -> str:
        return f"{which}p={high:.3g}" if low == high else f"{which}p={low:.3g}–{high:.3g}"

    def text(self) -> str:
        return f"{self.best_error:.2%} vs {self.other_error:.2%}: {self.verdict} ({self.how()})"

    def how(self) -> str:
        """The test and its p-values, in words."""
        raw = self._p("", *self.p_range)
        if self.adjusted is not None:
            raw += f", Holm-adjusted {self._p('', *self.adjusted)}"
        if self.paired:
            how = (f"exact McNemar {raw} on {self.n_items} shared items; "
                   f"{self.only_best_wrong} vs {self.only_other_wrong} items only one of them gets wrong")
        else:
            how = f"no shared predictions; exact McNemar over every pairing the totals allow: {raw} on {self.n_items} items"
        return how


def compare_predictions(label: str, best: tuple[int, Sequence[int]], other: tuple[int, Sequence[int]],
                        targets: Sequence[int]) -> Comparison:
    """Paired comparison of two trials' predictions on the same validation items."""
    (a_no, a), (b_no, b) = best, other
    if not (len(a) == len(b) == len(targets)) or not targets:
        raise ValueError(f"predictions must cover the same items, but got {len(a)}, {len(b)} and "
                         f"{len(targets)} targets")
    pa, pb, t = np.asarray(a), np.asarray(b), np.asarray(targets)
    wrong_a, wrong_b = pa != t, pb != t
    only_a, only_b = int(np.sum(wrong_a & ~wrong_b)), int(np.sum(wrong_b & ~wrong_a))
    n = len(t)
    return Comparison(label, a_no, b_no, float(wrong_a.mean()), float(wrong_b.mean()), n,
                      only_a, only_b, mcnemar_exact(only_a, only_b), paired=True)


def compare_rates(label: str, best: tuple[int, float], other: tuple[int, float], n: int) -> Comparison:
    """Comparison from error rates alone (no per-item predictions).

    McNemar needs the discordant items; the totals leave them open, so the
    p-value is known only as a range (`mcnemar_range`): "beyond noise" when even
    its largest is below ALPHA, "within noise" when even its smallest is not,
    "cannot tell" in between.
    """
    (a_no, a_err), (b_no, b_err) = best, other
    ka, kb = errors_of(a_err, n), errors_of(b_err, n)
    p_min, p_max = mcnemar_range(ka, kb, n)
    return Comparison(label, a_no, b_no, a_err, b_err, n, max(0, ka - kb), max(0, kb - ka),
                      p_max, paired=False, p_min=p_min)


def holm_corrected(comparisons: Sequence[Comparison]) -> list[Comparison]:
    """Holm–Bonferroni across one report's comparisons, each end of a p range corrected on its own.

    A trial compared twice (the runner-up that is also the best of its
    architecture) is one hypothesis, counted once.
    """
    first = {c.other_trial: c for c in reversed(comparisons)}  # one per rival trial
    rivals = list(first)
    lows = holm([first[r].p_range[0] for r in rivals])
    highs = holm([first[r].p_range[1] for r in rivals])
    by_rival = {r: (lo, hi) for r, lo, hi in zip(rivals, lows, highs)}
    return [c.with_holm(by_rival[c.other_trial]) for c in comparisons]


