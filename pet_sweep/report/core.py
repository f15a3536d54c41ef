"""Pure analysis of a sweep: overfitting verdicts, study tables, honest uncertainty.

fastbook reads `plot_loss` by eye: training loss keeps falling, validation loss
flattens or rises, yet the error rate can still improve ("overconfident, not less
accurate"); the epoch count is chosen where the metric stops improving. This
module makes that reading for every trial (`analyse_history`) and across the
study (`build_report`), and says how sure it is: every error rate comes with its
Wilson 95 % interval, and the best trial is compared with its rivals by an exact
McNemar test on the same validation items.

No I/O and no fastai/mlflow/optuna-storage imports: inputs are plain
`TrialRecord`s (built by `report_io` from the Optuna storage), outputs are
dataclasses, pandas tables and text (terminal, Markdown, HTML strings).
"""

from __future__ import annotations

import base64
import html as html_lib
import math
from dataclasses import dataclass, field, replace
from statistics import NormalDist
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from pet_sweep.errors import StudyError
from pet_sweep.params import inert_params, lr_text
from pet_sweep.space import ARCHITECTURES, PARAMS

Z95 = NormalDist().inv_cdf(0.975)  # 1.959964...
ALPHA = 0.05          # "beyond noise": Holm-adjusted p < ALPHA; "no better than chance": chance p >= ALPHA
TREND_EPOCHS = 3      # slopes are fitted over this many last epochs
LOSS_RISE = 0.05      # valid loss "rising": last value > its minimum by more than 5 %
UNFIT_SHARE = 0.5     # "underfit" needs the train loss still above this share of its first epoch's
# fANOVA (Optuna's importance evaluator) fits a random forest to the completed trials and splits
# the error's variance among the parameters. Measured on a synthetic five-parameter objective
# (lr_hi matters most, epochs less, the rest is noise; 8 random studies per size): the true top
# parameter came first in 0/8 studies of 3 trials, 1/8 of 5, 5/8 of 8 and 8/8 of 10, and leaving one
# trial out changed the top in 79 %, 55 %, 38 % and 30 % of cases (10 % at 15 trials). Below 10
# the ranking is noise, so the report says so instead of ranking.
MIN_IMPORTANCE_TRIALS = 10

STILL_IMPROVING = "still improving"
OVERCONFIDENT = "overconfident"
OVERFITTING = "overfitting"
CONVERGED = "converged"
UNDERFIT = "underfit"
DIVERGED = "diverged"
UNFINISHED = ("RUNNING", "WAITING")
VERDICTS = (STILL_IMPROVING, OVERCONFIDENT, OVERFITTING, CONVERGED, UNDERFIT, DIVERGED)

# What each verdict means for the next sweep (terminal, Markdown and HTML share it).
ADVICE: dict[str, str] = {
    STILL_IMPROVING: "error rate was still falling at the last epoch: more epochs could help",
    OVERCONFIDENT: "validation loss rises while the error rate holds or falls: the model grows "
                   "overconfident, not less accurate; the epoch count is about right",
    OVERFITTING: "error rate rose from its best: train fewer epochs (stop where it stopped improving)",
    CONVERGED: "error rate and validation loss have flattened: the epoch count is about right",
    UNDERFIT: "training loss stays high, above validation loss, and the error rate has stalled: "
              "raise the learning rate or the epoch count",
    DIVERGED: "the loss blew up or the model never learned: lower the learning rate",
}


# -- uncertainty -------------------------------------------------------------


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
    from scipy.stats import binomtest  # pure arithmetic; imported here to keep the module's import light

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
        gap = f"{self.best_error:.2%} vs {self.other_error:.2%}"
        raw = self._p("", *self.p_range)
        if self.adjusted is not None:
            raw += f", Holm-adjusted {self._p('', *self.adjusted)}"
        if self.paired:
            how = (f"exact McNemar {raw} on {self.n_items} shared items; "
                   f"{self.only_best_wrong} vs {self.only_other_wrong} items only one of them gets wrong")
        else:
            how = f"no shared predictions; exact McNemar over every pairing the totals allow: {raw} on {self.n_items} items"
        return f"{gap}: {self.verdict} ({how})"


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


# -- one trial ---------------------------------------------------------------


def _field(record: Any, name: str) -> Any:
    return record[name] if isinstance(record, Mapping) else getattr(record, name)


def _slope(values: np.ndarray) -> float:
    """Least-squares change per epoch of the last TREND_EPOCHS values (0 for one value)."""
    tail = values[-TREND_EPOCHS:]
    if len(tail) < 2 or not np.all(np.isfinite(tail)):
        return 0.0 if len(tail) < 2 else math.nan
    return float(np.polyfit(np.arange(len(tail)), tail, 1)[0])


def unfreeze_epoch(history: Sequence[Any]) -> int | None:
    """1-based number of the first unfrozen epoch, when a frozen phase came before it."""
    phases = [_field(r, "phase") for r in history]
    frozen = phases.count("frozen")
    return frozen + 1 if 0 < frozen < len(phases) else None


@dataclass(frozen=True)
class TrialAnalysis:
    """The `plot_loss` reading of one trial. Epoch numbers are 1-based, across both phases."""

    n_epochs: int
    n_frozen: int
    final_error: float
    best_error: float
    best_epoch: int
    epochs_past_best: int
    final_gap: float          # valid loss - train loss at the last epoch
    gap_trend: float          # its change per epoch over the last epochs (> 0: widening)
    valid_loss_slope: float   # change of valid loss per epoch over the last epochs
    error_slope: float
    verdict: str
    reason: str
    recommended_total_epochs: int | None  # frozen + unfrozen; None: change the LR, not the length

    @property
    def recommended_epochs(self) -> int | None:
        """The recipe's `epochs` parameter (unfrozen epochs) for the recommended total."""
        if self.recommended_total_epochs is None:
            return None
        return max(1, self.recommended_total_epochs - self.n_frozen)


def analyse_history(history: Sequence[Any], *, n_valid: int | None = None, n_classes: int | None = None,
                    min_change: float | None = None) -> TrialAnalysis:
    """Read one trial's per-epoch history (dicts or records with epoch, phase, train_loss,
    valid_loss, error_rate) and give its verdict and a recommended epoch count.

    A change in error rate counts only when it exceeds `min_change` (default: one
    and a half validation items, so one image flipping is not a trend). With
    `n_classes` and `n_valid`, a best error rate no better than guessing by a
    one-sided exact binomial test (`chance_p_value` >= ALPHA) is "diverged".
    """
    if not history:
        raise ValueError("an empty history has nothing to analyse")
    train = np.array([float(_field(r, "train_loss")) for r in history])
    valid = np.array([float(_field(r, "valid_loss")) for r in history])
    error = np.array([float(_field(r, "error_rate")) for r in history])
    n = len(history)
    n_frozen = sum(1 for r in history if _field(r, "phase") == "frozen")
    noise = min_change if min_change is not None else (1.5 / n_valid if n_valid else 0.0)
    finite_err = np.where(np.isfinite(error), error, np.inf)
    best_idx = int(np.argmin(finite_err))
    best = float(finite_err[best_idx])
    final = float(error[-1])
    gap = valid - train
    settled = next((i for i in range(n) if finite_err[i] <= best + noise), best_idx)
    stats = dict(n_epochs=n, n_frozen=n_frozen, final_error=final, best_error=best, best_epoch=best_idx + 1,
                 epochs_past_best=n - 1 - best_idx, final_gap=float(gap[-1]), gap_trend=_slope(gap),
                 valid_loss_slope=_slope(valid), error_slope=_slope(error))
    longer = n + max(1, math.ceil(n / 2))

    def verdict(name: str, reason: str, epochs: int | None) -> TrialAnalysis:
        return TrialAnalysis(**stats, verdict=name, reason=reason, recommended_total_epochs=epochs)

    chance = 1 - 1 / n_classes if n_classes else None
    if not (np.all(np.isfinite(train)) and np.all(np.isfinite(valid)) and np.all(np.isfinite(error))):
        return verdict(DIVERGED, "a loss or the error rate became non-finite", None)
    if n >= 2 and train[-1] > train[0] * (1 + LOSS_RISE * 2):  # a 10 % rise, not one-cycle jitter
        return verdict(DIVERGED, f"training loss rose from {train[0]:.3g} to {train[-1]:.3g}", None)
    if chance is not None and n_valid and n_classes:
        # H0: the model guesses; only a best error count improbably low under it counts as learning
        p_chance = chance_p_value(errors_of(best, n_valid), n_valid, n_classes)
        if p_chance >= ALPHA:
            return verdict(DIVERGED, f"error rate {best:.2%} is no better than chance ({chance:.2%} with "
                                     f"{n_classes} classes; one-sided binomial p={p_chance:.2g} on {n_valid} items)",
                           None)
    elif chance is not None and best >= chance - noise:  # no item count: the rate alone
        return verdict(DIVERGED, f"error rate {best:.2%} is at chance level ({chance:.2%})", None)
    if final > best + noise and best_idx < n - 1:
        return verdict(OVERFITTING, f"error rate rose from {best:.2%} at epoch {best_idx + 1} to "
                                    f"{final:.2%} at epoch {n}", settled + 1)
    # a new best at the last epoch counts as improvement only beyond noise: by more than
    # `noise` over the best before it, or on a falling trend over the last epochs
    new_best_last = n == 1 or final < float(np.min(finite_err[:-1]))
    trend_drop = -stats["error_slope"] * (min(n, TREND_EPOCHS) - 1)
    improving = n == 1 or (new_best_last and (float(np.min(finite_err[:-1])) - final > noise or trend_drop > noise))
    valid_rising = n >= 2 and valid[-1] > float(np.min(valid)) * (1 + LOSS_RISE) and stats["valid_loss_slope"] > 0
    if valid_rising:
        return verdict(OVERCONFIDENT, f"validation loss rose from {np.min(valid):.3g} to {valid[-1]:.3g} "
                                      f"while the error rate {'fell' if new_best_last else 'held'} "
                                      f"({final:.2%})", settled + 1)
    if improving:
        return verdict(STILL_IMPROVING, f"the error rate was still falling at the last epoch ({final:.2%}, down "
                                        f"{trend_drop * 100:.2f} points over the last {min(n, TREND_EPOCHS)} epochs)"
                                        if n > 1 else "one epoch: no trend yet", longer)
    # train loss above valid loss alone is common on healthy runs: fastai's head has dropout
    # and the train loss is averaged over an epoch of a falling curve. Underfit also means
    # the model has not fit its training data: the loss is still above half its first epoch's.
    if gap[-1] < 0 and n >= 2 and train[-1] > UNFIT_SHARE * train[0]:
        return verdict(UNDERFIT, f"training loss {train[-1]:.3g} is above validation loss {valid[-1]:.3g} "
                                 f"and above half its first epoch's ({train[0]:.3g}), and the error rate has "
                                 "stopped improving", longer)
    return verdict(CONVERGED, f"error rate within noise of its best ({best:.2%}) since epoch {settled + 1}",
                   settled + 1)


# -- the study ---------------------------------------------------------------


@dataclass(frozen=True)
class TrialRecord:
    """What the report needs of one Optuna trial (built by `report_io`)."""

    number: int
    state: str                              # COMPLETE, PRUNED, FAIL, RUNNING, WAITING
    params: Mapping[str, Any]               # the full TrialParams dict
    history: tuple[Mapping[str, Any], ...] = ()
    value: float | None = None
    preds: tuple[int, ...] = ()
    targets: tuple[int, ...] = ()
    precision: str = ""
    reason: str = ""
    seconds: float = 0.0
    run_id: str | None = None
    batch_size: int | None = None           # what it ran with (an out-of-memory retry halves it)


@dataclass(frozen=True)
class HeldOut:
    """A replay of one trial (`pet-sweep train`) and its error on the held-out test split."""

    trial: int | None
    test_error: float | None
    n_test: int
    valid_error: float | None
    run_id: str
    held_out: bool | None = None  # its test split's fingerprint matched the sweep's; None: not checked


@dataclass(frozen=True)
class StudyReport:
    """Everything the report shows; rendered by `summary_text`, `markdown` and `html`."""

    experiment: str
    study_name: str
    trials: pd.DataFrame                    # one row per trial
    analyses: dict[int, TrialAnalysis]
    best: TrialRecord
    n_valid: int | None
    comparisons: list[Comparison]           # Holm-corrected together
    tables: dict[str, pd.DataFrame]         # error rate by arch, freeze_epochs, epochs, LR
    importances: dict[str, float]
    heldout: HeldOut | None
    next_steps: list[str]
    counts: dict[str, int]                  # trials per state
    verdict_counts: dict[str, int]
    records: dict[int, TrialRecord] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    test_split: bool = True                 # the experiment holds items out of every trial (data.test_pct > 0)
    importance_note: str = ""               # why there is no ranking, or what it leaves out
    n_candidates: int = 0                   # completed trials the best was selected from

    @property
    def best_analysis(self) -> TrialAnalysis | None:
        return self.analyses.get(self.best.number)

    def top(self, k: int = 4) -> list[int]:
        """Numbers of the k best completed trials, best first."""
        done = self.trials[self.trials["state"] == "COMPLETE"].sort_values(["error_rate", "number"])
        return [int(x) for x in done["number"].head(k)]


def _n_items(record: TrialRecord) -> int | None:
    return len(record.targets) or None


def trials_frame(records: Sequence[TrialRecord], analyses: Mapping[int, TrialAnalysis],
                 n_valid: int | None = None) -> pd.DataFrame:
    """One row per trial: parameters, outcome, interval and the overfitting reading."""
    rows = []
    for r in records:
        p, a, n = r.params, analyses.get(r.number), _n_items(r) or n_valid
        history = r.history
        error = r.value if r.value is not None else (float(history[-1]["error_rate"]) if history else None)
        lo = hi = None
        if error is not None and math.isfinite(error) and n:
            lo, hi = wilson(errors_of(error, n), n)
        rows.append({
            "number": r.number, "state": r.state, "arch": p.get("arch"),
            "depth": ARCHITECTURES.get(str(p.get("arch")), None),
            "base_lr": None if "base_lr" in inert_params(p) else p.get("base_lr"), "lr_lo": p.get("lr_lo"), "lr_hi": p.get("lr_hi"),
            "freeze_epochs": p.get("freeze_epochs"), "epochs": p.get("epochs"),
            "error_rate": error, "ci_low": lo, "ci_high": hi, "n_valid": n,
            "best_error": a.best_error if a else None, "best_epoch": a.best_epoch if a else None,
            "epochs_run": len(history), "past_best": a.epochs_past_best if a else None,
            "final_gap": a.final_gap if a else None, "gap_trend": a.gap_trend if a else None,
            "valid_loss_slope": a.valid_loss_slope if a else None,
            "verdict": a.verdict if a else ("running" if r.state in UNFINISHED and history else ""),
            "rec_epochs": a.recommended_epochs if a and r.state == "COMPLETE" else None,
            "seconds": r.seconds, "precision": r.precision, "reason": r.reason, "batch_size": r.batch_size,
        })
    return pd.DataFrame(rows)


def lr_bins(values: pd.Series) -> pd.Series:
    """Half-decade bins of a learning rate (1e-3–3.2e-3, 3.2e-3–1e-2, ...)."""
    logs = np.log10(values.astype(float))
    lo, hi = math.floor(logs.min() * 2) / 2, math.ceil(logs.max() * 2) / 2
    edges = np.arange(lo, max(hi, lo + 0.5) + 0.25, 0.5)
    labels = [f"{10 ** a:.1e}–{10 ** b:.1e}" for a, b in zip(edges[:-1], edges[1:])]
    return pd.cut(logs, edges, labels=labels, include_lowest=True)


def group_table(frame: pd.DataFrame, by: str | pd.Series, name: str | None = None) -> pd.DataFrame:
    """Error rate of completed trials grouped by a setting; every trial counted."""
    key = by if isinstance(by, str) else name or str(by.name)
    data = frame.assign(**{key: by}) if not isinstance(by, str) else frame
    done = data[data["state"] == "COMPLETE"]
    table = data.groupby(key, observed=True).agg(trials=("number", "size"))
    if not done.empty:
        stats = done.groupby(key, observed=True).agg(
            completed=("number", "size"), best_error=("error_rate", "min"),
            median_error=("error_rate", "median"), mean_error=("error_rate", "mean"))
        best_trial = done.loc[done.groupby(key, observed=True)["error_rate"].idxmin()].set_index(key)["number"]
        table = table.join(stats).join(best_trial.rename("best_trial"))
    return table.reset_index().sort_values(key).reset_index(drop=True)


def study_tables(frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Error rate by architecture depth, freeze epochs, epochs and learning rates."""
    arch = group_table(frame, "arch")
    arch.insert(1, "depth", [ARCHITECTURES.get(str(a)) for a in arch["arch"]])
    tables = {
        "architecture": arch.sort_values(["depth", "arch"], na_position="last").reset_index(drop=True),
        "freeze_epochs": group_table(frame, "freeze_epochs"),
        "epochs": group_table(frame, "epochs"),
    }
    for lr in ("base_lr", "lr_hi"):
        if frame[lr].notna().any() and frame[lr].nunique() > 1:
            tables[f"{lr} (binned)"] = group_table(frame, lr_bins(frame[lr]).rename(f"{lr} bin"), f"{lr} bin")
    return tables


def comparisons_for(best: TrialRecord, done: Sequence[TrialRecord]) -> list[Comparison]:
    """The best trial against the runner-up and against the best trial of each other architecture."""
    ranked = sorted((r for r in done if r.number != best.number), key=lambda r: (r.value, r.number))
    rivals: list[tuple[str, TrialRecord]] = []
    if ranked:
        rivals.append(("runner-up", ranked[0]))
    seen = {str(best.params.get("arch"))}
    for r in ranked:
        arch = str(r.params.get("arch"))
        if arch not in seen:
            seen.add(arch)
            rivals.append((f"best {arch}", r))
    out = []
    for label, other in rivals:
        if best.preds and other.preds and best.targets and best.targets == other.targets \
                and len(best.preds) == len(other.preds) == len(best.targets):
            out.append(compare_predictions(label, (best.number, best.preds), (other.number, other.preds),
                                           best.targets))
        elif _n_items(best):
            out.append(compare_rates(label, (best.number, float(best.value)), (other.number, float(other.value)),
                                     len(best.targets)))
    return holm_corrected(out)


def trial_cost(row: Mapping[str, Any], by_time: bool = True) -> tuple[float, str]:
    """What a trial cost: its wall time (`by_time`), else its epochs (frozen + unfrozen)."""
    if by_time:
        return float(row["seconds"]), f"{row['seconds']:.0f}s"
    epochs = float((row.get("freeze_epochs") or 0) + (row.get("epochs") or 0))
    return epochs, f"{epochs:.0f} epochs"


def _timed(row: Mapping[str, Any]) -> bool:
    seconds = row.get("seconds")
    return seconds is not None and math.isfinite(seconds) and seconds > 0


def tie_advice(best: int, rivals: Sequence[int], frame: pd.DataFrame) -> str:
    """Two configs within noise are a tie: point at the cheaper one, naming it, or say the best is it."""
    by_number = frame.set_index("number")
    rows = {n: by_number.loc[n].to_dict() for n in (best, *rivals)}
    by_time = all(_timed(row) for row in rows.values())  # never seconds against epochs
    costs = {n: trial_cost(row, by_time) for n, row in rows.items()}
    names = ", ".join(f"trial {n} ({costs[n][1]})" for n in rivals)
    head = f"the best trial ({costs[best][1]}) is within noise of {names}"
    # a tenth cheaper at least: wall times of equal configs differ by a few per cent
    cheaper = sorted((n for n in rivals if costs[n][0] < 0.9 * costs[best][0]), key=lambda n: costs[n][0])
    if cheaper:
        return (f"{head}: prefer the cheaper trial {cheaper[0]} (pet-sweep export --trial {cheaper[0]}), "
                "or validate on more items before choosing")
    if all(costs[best][0] <= costs[n][0] for n in rivals):
        return f"{head}: it is also the cheapest, so keep it; validate on more items to separate them"
    return f"{head}: none is clearly cheaper (by a tenth), so keep it; validate on more items to separate them"


def next_steps(report_best: TrialRecord, analysis: TrialAnalysis | None, comparisons: Sequence[Comparison],
               verdict_counts: Mapping[str, int], frame: pd.DataFrame,
               bounds: Mapping[str, tuple[float, float]], heldout: HeldOut | None,
               test_split: bool = True) -> list[str]:
    """What to try next, in plain words, most important first."""
    steps = []
    p = report_best.params
    if analysis is not None:
        rec = analysis.recommended_epochs
        if analysis.verdict in (STILL_IMPROVING, UNDERFIT):
            steps.append(f"best trial {analysis.verdict} at its last epoch: raise epochs "
                         f"(try epochs={rec} instead of {p.get('epochs')})")
        elif analysis.verdict == OVERFITTING:
            steps.append(f"best trial overfits after epoch {analysis.best_epoch}: train fewer epochs "
                         f"(epochs={rec}) or add augmentation")
        elif analysis.verdict == OVERCONFIDENT:
            steps.append(f"best trial is overconfident (valid loss up, error rate not): judge by the error rate; "
                         f"epochs={rec} reaches its best")
    for name, (low, high) in bounds.items():
        value = p.get(name)
        if value is None or low == high or name in inert_params(p):  # no advice on what did nothing
            continue
        span = math.log(high / low) if low > 0 and "lr" in name else high - low
        pos = (math.log(value / low) if low > 0 and "lr" in name else value - low) / span
        if pos >= 0.95:
            steps.append(f"best {name}={value:.3g} is at the top of its range [{low:.3g}, {high:.3g}]: widen it")
        elif pos <= 0.05 and low > PARAMS.get(name, (None, -math.inf))[1]:  # 0 frozen epochs cannot go lower
            steps.append(f"best {name}={value:.3g} is at the bottom of its range [{low:.3g}, {high:.3g}]: widen it")
    close = [c for c in comparisons if c.verdict == "within noise"]
    if close:
        # the runner-up can also be the best of another architecture: name each trial once
        steps.append(tie_advice(report_best.number, list(dict.fromkeys(c.other_trial for c in close)), frame))
    div = frame[frame["verdict"] == DIVERGED]  # pruned ones too: a diverging trial is pruned at once
    if not div.empty:
        base = f", base_lr {div['base_lr'].min():.2g}" if div["base_lr"].notna().any() else ""
        steps.append(f"{len(div)} trial(s) diverged (lowest lr_hi {div['lr_hi'].min():.2g}{base}): "
                     "lower the top of the LR ranges")
    if not test_split:
        steps.append("this experiment holds no items out (data.test_pct: 0), so the selected validation error is "
                     "the only, optimistic, estimate: set data.test_pct for a new study to measure one")
    elif heldout is None:
        steps.append("measure the best config on the held-out split: pet-sweep export, then pet-sweep train best.yaml")
    return steps


def completed(records: Sequence[TrialRecord], *, experiment: str, study_name: str) -> list[TrialRecord]:
    """The completed trials with a finite error rate; none is a `StudyError` saying what there is."""
    done = [r for r in records if r.state == "COMPLETE" and r.value is not None and math.isfinite(r.value)]
    if not done:
        states = pd.Series([r.state for r in records], dtype=object).value_counts().to_dict()
        found = ", ".join(f"{v} {k.lower()}" for k, v in states.items()) or "no trials"
        raise StudyError(f"study {study_name!r} has no completed trial yet ({found}); "
                         f"wait for one, or run `pet-sweep run {experiment}`")
    return done


def build_report(records: Sequence[TrialRecord], *, experiment: str, study_name: str,
                 importances: Mapping[str, float] | None = None, heldout: Sequence[HeldOut] = (),
                 bounds: Mapping[str, tuple[float, float]] | None = None,
                 n_classes: int | None = None, test_split: bool = True, importance_note: str = "",
                 always_inert: Sequence[str] = ()) -> StudyReport:
    """Analyse every trial with a history and compare the best with its rivals.

    `importances` from fewer than MIN_IMPORTANCE_TRIALS completed trials are dropped
    (`importance_note` says why); `always_inert`: parameters the space gives that no
    trial can use (`space.always_inert`).
    """
    done = completed(records, experiment=experiment, study_name=study_name)
    too_few = too_few_for_importances(len(done))
    if too_few:
        importances, importance_note = {}, too_few
    best = min(done, key=lambda r: (r.value, r.number))
    n_valid = _n_items(best)  # every trial is judged on the same validation items
    analyses = {}
    for r in records:
        if r.history and r.state not in UNFINISHED:  # a running trial's curve is not a verdict yet
            analyses[r.number] = analyse_history(r.history, n_valid=n_valid, n_classes=n_classes)
    frame = trials_frame(records, analyses, n_valid)
    comparisons = comparisons_for(best, done)
    counts = {k: int(v) for k, v in frame["state"].value_counts().items()}
    # verdicts of the trials that ran their course: a pruned trial was cut short on purpose, so
    # "still improving" or an epoch count read off its curve says nothing about its config
    complete = frame[frame["state"] == "COMPLETE"]
    verdict_counts = {v: int((complete["verdict"] == v).sum()) for v in VERDICTS if (complete["verdict"] == v).any()}
    mine = [h for h in heldout if h.trial == best.number]
    held = mine[-1] if mine else (heldout[-1] if heldout else None)
    steps = next_steps(best, analyses.get(best.number), comparisons, verdict_counts, frame, bounds or {}, held,
                       test_split)
    notes = []
    if counts.get("RUNNING"):
        notes.append(f"the study is still running ({counts['RUNNING']} trial(s) in progress); "
                     "this report is a snapshot")
    notes += [f"{name} does nothing in this space: freeze_epochs is 0 in every trial, so there is no frozen phase; "
              f"it is not sampled, and can be dropped from the space" for name in always_inert]
    return StudyReport(experiment=experiment, study_name=study_name, trials=frame, analyses=analyses, best=best,
                       n_valid=_n_items(best), comparisons=comparisons, tables=study_tables(frame),
                       importances=dict(importances or {}), heldout=held, next_steps=steps, counts=counts,
                       verdict_counts=verdict_counts, records={r.number: r for r in records}, notes=notes,
                       test_split=test_split, n_candidates=len(done), importance_note=importance_note)


def too_few_for_importances(n_complete: int) -> str:
    """Why importances are not ranked on `n_complete` completed trials; "" when there are enough."""
    if n_complete >= MIN_IMPORTANCE_TRIALS:
        return ""
    return (f"not ranked: {n_complete} completed trial{'s' if n_complete != 1 else ''}, fewer than the "
            f"{MIN_IMPORTANCE_TRIALS} an importance ranking needs to be more than noise")


# -- rendering (strings only) ------------------------------------------------


def describe_params(params: Mapping[str, Any]) -> str:
    return (f"{params.get('arch')}  {lr_text(params, sep='  ')}  "
            f"freeze_epochs={params.get('freeze_epochs')}  epochs={params.get('epochs')}")


def heldout_text(report: StudyReport) -> str:
    h = report.heldout
    if h is None and not report.test_split:
        return "none: this experiment holds no items out (data.test_pct: 0)"
    if h is None:
        return "not measured yet (pet-sweep export, then pet-sweep train best.yaml)"
    which = f"replay of trial {h.trial}" if h.trial is not None else "replay"
    if h.trial != report.best.number:
        which += f" (not the current best, trial {report.best.number})"
    if h.test_error is None:
        return f"no held-out split in this experiment (test_pct: 0); {which} validation error " \
               f"{format_rate(h.valid_error, report.n_valid)}"
    split = {True: "", False: " (not held out: it changed after the sweep)",
             None: " (held out unverified: no split fingerprint to check)"}[h.held_out]
    return f"{format_rate(h.test_error, h.n_test)} on the test split{split}, {which}, MLflow run {h.run_id}"


def summary_lines(report: StudyReport) -> list[tuple[str, str]]:
    """(label, text) pairs: the short summary the terminal, Markdown and HTML all start with."""
    b, a = report.best, report.best_analysis
    counts = ", ".join(f"{v} {k.lower()}" for k, v in sorted(report.counts.items()))
    lines = [("study", f"{report.study_name} ({report.experiment}): {len(report.trials)} trials ({counts})"),
             ("best", f"trial {b.number}: {describe_params(b.params)}"
                      + (f"  batch_size={b.batch_size}" if batch_sizes_vary(report) else "")),
             ("valid error", f"{format_rate(b.value, report.n_valid)}  (selected as the best of "
                             f"{report.n_candidates} trials on these {report.n_valid or '?'} items: optimistic)")]
    if a is not None:
        lines.append(("reading", f"{a.verdict}: {a.reason}; best at epoch {a.best_epoch} of {a.n_epochs}"))
    for c in report.comparisons:
        lines.append((f"vs {c.label}", f"trial {c.other_trial}: {c.text()}"))
    lines.append(("held-out", heldout_text(report)))
    n_complete = report.counts.get("COMPLETE", 0)
    lines.append(("verdicts", (", ".join(f"{k} {v}" for k, v in report.verdict_counts.items()) or "-")
                  + f" (of the {n_complete} completed trial{'s' if n_complete != 1 else ''})"))
    if report.importances:
        top = sorted(report.importances.items(), key=lambda kv: -kv[1])[:4]
        lines.append(("matters most", ", ".join(f"{k} {v:.2f}" for k, v in top)
                      + (f" ({report.importance_note})" if report.importance_note else "")))
    elif report.importance_note:
        lines.append(("matters most", report.importance_note))
    for i, step in enumerate(report.next_steps):
        lines.append(("next" if i == 0 else "", step))
    for note in report.notes:
        lines.append(("note", note))
    return lines


def summary_text(report: StudyReport) -> str:
    lines = summary_lines(report)
    width = max(len(label) for label, _ in lines) + 2
    return "\n".join(f"{label:<{width}}{text}" for label, text in lines)


RANK_COLUMNS = ["number", "state", "arch", "base_lr", "lr_lo", "lr_hi", "freeze_epochs", "epochs", "error_rate",
                "ci_low", "ci_high", "best_error", "best_epoch", "epochs_run", "final_gap", "verdict",
                "rec_epochs", "seconds"]


def batch_sizes_vary(report: StudyReport) -> bool:
    """Did some trial run at another batch size (an out-of-memory retry at half of it)?"""
    return report.trials["batch_size"].nunique(dropna=True) > 1


def ranked(report: StudyReport) -> pd.DataFrame:
    """All trials, completed ones first by error rate, then the others by number.

    A batch_size column joins them where trials ran at different batch sizes.
    """
    frame = report.trials.copy()
    frame["_done"] = frame["state"] != "COMPLETE"
    frame = frame.sort_values(["_done", "error_rate", "number"], na_position="last")
    columns = list(RANK_COLUMNS)
    if batch_sizes_vary(report):
        columns.insert(columns.index("epochs") + 1, "batch_size")
    return frame[columns].reset_index(drop=True)


def _cell(value: Any, column: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        if "error" in column or column.startswith("ci_"):
            return f"{value:.2%}"
        if "lr" in column:
            return f"{value:.2e}"
        return f"{value:.3g}"
    return str(value)


def _formatted(frame: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({c: [_cell(v, str(c)) for v in frame[c].tolist()] for c in frame.columns})


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub Markdown table (pandas' `to_markdown` needs `tabulate`; this does not)."""
    cells = _formatted(frame)
    head = "| " + " | ".join(str(c) for c in cells.columns) + " |"
    rule = "| " + " | ".join("---" for _ in cells.columns) + " |"
    body = ["| " + " | ".join(row) + " |" for row in cells.itertuples(index=False, name=None)]
    return "\n".join([head, rule, *body])


FIGURE_CAPTIONS: dict[str, str] = {
    "loss_curves": "Loss curves of the top trials (train and validation loss; dotted line: unfreeze)",
    "error_curves": "Error rate per epoch of the top trials",
    "error_vs_gap": "Final error rate against the generalisation gap, coloured by verdict",
    "param_importances": "Which settings matter (Optuna parameter importances, fANOVA)",
    "parallel_coordinate": "Every completed trial's settings and error rate (Optuna parallel coordinates)",
}


def _verdict_section(report: StudyReport) -> list[tuple[str, str]]:
    return [(v, ADVICE[v]) for v in report.verdict_counts]


def markdown(report: StudyReport, figures: Mapping[str, str]) -> str:
    """The Markdown summary; `figures` maps a figure name to its relative path."""
    out = [f"# pet-sweep report: {report.study_name}", "", "```", summary_text(report), "```", "", "## Trials, best first", "", markdown_table(ranked(report)), ""]
    out += ["## Verdicts", ""] + [f"- **{v}** ({report.verdict_counts[v]}): {text}" for v, text in
                                  _verdict_section(report)] + [""]
    for name, table in report.tables.items():
        out += [f"## Error rate by {name}", "", markdown_table(table), ""]
    if report.importances:
        out += ["## Parameter importances", ""] + [f"- {k}: {v:.3f}" for k, v in report.importances.items()] + [""]
    out += ["## Figures", ""]
    for name, path in figures.items():
        out += [f"![{FIGURE_CAPTIONS.get(name, name)}]({path})", ""]
    return "\n".join(out)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:3px 7px;
text-align:right}th{background:#f2f2f2}pre{background:#f7f7f7;padding:1em;overflow-x:auto;font-size:13px}
figure{margin:1.5em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:14px}"""


def _html_table(frame: pd.DataFrame) -> str:
    return _formatted(frame).to_html(index=False, border=0, escape=True)


def html(report: StudyReport, figures: Mapping[str, bytes]) -> str:
    """A self-contained HTML page: figures (PNG bytes) embedded as base64."""
    esc = html_lib.escape
    summary = summary_text(report)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>pet-sweep report: {esc(report.study_name)}"
             f"</title><style>{_CSS}</style></head><body>",
             f"<h1>pet-sweep report: {esc(report.study_name)}</h1>", f"<pre>{esc(summary)}</pre>",
             "<h2>Trials, best first</h2>", _html_table(ranked(report)), "<h2>Verdicts</h2><ul>"]
    parts += [f"<li><b>{esc(v)}</b> ({report.verdict_counts[v]}): {esc(t)}</li>" for v, t in _verdict_section(report)]
    parts.append("</ul>")
    for name, table in report.tables.items():
        parts += [f"<h2>Error rate by {esc(name)}</h2>", _html_table(table)]
    parts.append("<h2>Figures</h2>")
    for name, png in figures.items():
        data = base64.b64encode(png).decode("ascii")
        caption = esc(FIGURE_CAPTIONS.get(name, name))
        parts.append(f"<figure><img alt='{caption}' src='data:image/png;base64,{data}'>"
                     f"<figcaption>{caption}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)
