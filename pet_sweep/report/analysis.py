"""The study: every trial analysed, the best one compared with its rivals, what to try next.

`build_report` turns plain `TrialRecord`s (read from the Optuna storage by
`report.read`) into a `StudyReport`: a table of trials with their intervals and
verdicts, tables of error rate by setting, Holm-corrected comparisons and next
steps in plain words. No I/O and no fastai/mlflow/optuna-storage imports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

import pet_sweep.report.front as front
import pet_sweep.report.verdicts as verdicts
from pet_sweep.errors import StudyError
from pet_sweep.params import inert_params
from pet_sweep.report.advice import converged_step, curve_agrees, learning_failures, tie_advice, trial_cost  # noqa: F401
from pet_sweep.report.costs import CostBook
from pet_sweep.report.front import Recommendation, recommend
from pet_sweep.report.seeds import Run, Selection, representatives, selection_of
from pet_sweep.report.stats import Comparison, errors_of, holm_corrected, plural, wilson
from pet_sweep.report.verdicts import TrialAnalysis
from pet_sweep.space import ARCHITECTURES, PARAMS

UNFINISHED = ("RUNNING", "WAITING")
# fANOVA (Optuna's importance evaluator) fits a random forest to the completed trials and splits
# the error's variance among the parameters. Measured on a synthetic five-parameter objective
# (lr_hi matters most, epochs less, the rest is noise; 8 random studies per size): the true top
# parameter came first in 0/8 studies of 3 trials, 1/8 of 5, 5/8 of 8 and 8/8 of 10, and leaving one
# trial out changed the top in 79 %, 55 %, 38 % and 30 % of cases (10 % at 15 trials). Below 10
# the ranking is noise, so the report says so instead of ranking.
MIN_IMPORTANCE_TRIALS = 10


@dataclass(frozen=True)
class TrialRecord:
    """What the report needs of one Optuna trial (built by `report.read`)."""

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
    costs: Mapping[str, float | None] = field(default_factory=dict)  # COST_ATTRS; None: not recorded
    values: tuple[float, ...] = ()          # every objective's value (error rate first)
    device: str = ""                        # where it ran ("cpu", "cuda:0"); "" before it was recorded
    run: Run | None = None                  # a completed trial as a run of its config on one seed (`report.seeds`)


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
    objectives: tuple[str, ...] = ("error_rate",)  # several: a multi-objective study
    recommendation: Recommendation | None = None   # None: no trial recorded a cost
    front: tuple[int, ...] = ()             # trials on the Pareto front (multi-objective studies)
    cost_book: CostBook | None = None       # the trials' cost keys and the study's timing session
    selection: Selection | None = None      # the best config over its seeds and the baseline; None: one seed, no baseline

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

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
            # the recipe's `epochs`: unfrozen epochs, like the "epochs" column (epochs_run counts both phases)
            "rec_unfrozen_epochs": a.recommended_epochs if a and r.state == "COMPLETE" else None,
            "seconds": r.seconds, "precision": r.precision, "reason": r.reason, "batch_size": r.batch_size,
            **{name: r.costs.get(name) for name in front.SHOWN_COSTS},
        })
    return pd.DataFrame(rows)


def with_heldout(frame: pd.DataFrame, heldout: Sequence[HeldOut]) -> pd.DataFrame:
    """The trials table with each replayed trial's held-out test error (its latest replay whose
    test split was held out, or not checked) and the test split's size; NaN for the others."""
    latest = {h.trial: h for h in heldout  # oldest first: the latest replay wins
              if h.trial is not None and h.test_error is not None and h.held_out is not False}
    return frame.assign(heldout_error=[latest[n].test_error if n in latest else math.nan for n in frame["number"]],
                        n_test=[latest[n].n_test if n in latest else math.nan for n in frame["number"]])


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


def rival_comparisons(best: TrialRecord, done: Sequence[TrialRecord]) -> list[Comparison]:
    """The best trial against the runner-up and against the best trial of each other architecture
    (uncorrected)."""
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
    # a trial that is both (the runner-up is the best of another architecture) is one test, one line
    labels: dict[int, list[str]] = {}
    others: dict[int, TrialRecord] = {}
    for label, other in rivals:
        labels.setdefault(other.number, []).append(label)
        others[other.number] = other
    return [c for c in (front.compare_records(" and ".join(labels[n]), best, others[n]) for n in labels) if c is not None]


def comparisons_for(best: TrialRecord, done: Sequence[TrialRecord]) -> list[Comparison]:
    """The rival comparisons, Holm-corrected among themselves (a study without costs)."""
    return holm_corrected(rival_comparisons(best, done))


def compare_and_recommend(best: TrialRecord, done: Sequence[TrialRecord], objectives: Sequence[str],
                          analyses: Mapping[int, TrialAnalysis],
                          book: CostBook | None = None) -> tuple[list[Comparison], Recommendation | None]:
    """The rival comparisons and the recommendation (`front.recommend`), their comparisons
    Holm-corrected together; no recommendation where no trial recorded a cost. A trial that
    diverged or never learned (no better than chance) is never recommended."""
    rivals = rival_comparisons(best, done)
    if not front.has_costs(done):
        return holm_corrected(rivals), None
    cost, why = front.cost_name(objectives)
    diverged = {r.number for r in done
                if r is not best and getattr(analyses.get(r.number), "verdict", "") in verdicts.FAILED_TO_LEARN}
    compared = front.cheaper_comparisons(best, done, cost, book)
    cheaper = [c for c in compared if c.other_trial not in diverged]
    left_out = len(compared) - len(cheaper)
    corrected = holm_corrected([*rivals, *cheaper])
    return corrected[:len(rivals)], recommend(best, done, cost, why, corrected[len(rivals):], left_out, book)


def analyse_all(records: Sequence[TrialRecord], n_valid: int | None,
                n_classes: int | None) -> dict[int, TrialAnalysis]:
    """The verdict of every trial with a history, but those still running (their curve is not a verdict yet)."""
    return {r.number: verdicts.analyse_history(r.history, n_valid=n_valid, n_classes=n_classes)
            for r in records if r.history and r.state not in UNFINISHED}


def recommendation_for(records: Sequence[TrialRecord], objectives: Sequence[str], *, experiment: str,
                       study_name: str, n_classes: int | None = None,
                       book: CostBook | None = None) -> Recommendation | None:
    """The report's recommendation alone (what `export --pick cheapest` takes)."""
    best, done, _ = picks(completed(records, experiment=experiment, study_name=study_name))
    return compare_and_recommend(best, done, objectives, analyse_all(records, _n_items(best), n_classes), book)[1]


def picks(done: Sequence[TrialRecord]) -> tuple[TrialRecord, list[TrialRecord], Selection | None]:
    """The best trial, the trials it is compared with and picked among, and the selection. A config run on
    several seeds stands as its median run, and the best is the best config's (lowest mean over the most
    seeds); the baseline is a reference, never a pick. Without seeds or a baseline: every completed trial."""
    runs = [r.run for r in done if r.run is not None]
    selection = selection_of(runs)
    if selection is None:
        return lowest_error(done), list(done), None
    kept = set(representatives(runs))
    by_number = {r.number: r for r in done}
    return by_number[selection.best.median_run.number], [r for r in done if r.number in kept], selection


def lowest_error(done: Sequence[TrialRecord]) -> TrialRecord:
    return min(done, key=lambda r: (r.value, r.number))


def next_steps(report_best: TrialRecord, analysis: TrialAnalysis | None, comparisons: Sequence[Comparison],
               verdict_counts: Mapping[str, int], frame: pd.DataFrame,
               bounds: Mapping[str, tuple[float, float]], heldout: HeldOut | None,
               test_split: bool = True, recommendation: Recommendation | None = None) -> list[str]:
    """What to try next, in plain words, most important first. With measured costs the
    recommendation names the cheaper trial to ship, instead of the tie advice by wall time."""
    steps = []
    p = report_best.params
    if analysis is not None:
        rec = analysis.recommended_epochs
        if analysis.verdict in (verdicts.STILL_IMPROVING, verdicts.UNDERFIT):
            steps.append(f"best trial {analysis.verdict} at its last epoch: raise epochs "
                         f"(try epochs={rec} instead of {p.get('epochs')})")
        elif analysis.verdict == verdicts.OVERFITTING:
            steps.append(f"best trial overfits after epoch {analysis.best_epoch}: train fewer epochs "
                         f"(epochs={rec}) or add augmentation")
        elif analysis.verdict == verdicts.OVERCONFIDENT:
            steps.append(f"best trial is overconfident (valid loss up, error rate not): judge by the error rate; "
                         f"epochs={rec} reaches its best")
    converged = converged_step(analysis, p)
    steps += [converged] if converged else []
    for name, (low, high) in bounds.items():
        value = p.get(name)
        if value is None or low == high or name in inert_params(p):  # no advice on what did nothing
            continue
        span = math.log(high / low) if low > 0 and "lr" in name else high - low
        pos = (math.log(value / low) if low > 0 and "lr" in name else value - low) / span
        if pos >= 0.95 and curve_agrees(name, True, value, analysis):  # the curve decides epochs first
            steps.append(f"best {name}={value:.3g} is at the top of its range [{low:.3g}, {high:.3g}]: widen it")
        elif (pos <= 0.05 and low > PARAMS.get(name, (None, -math.inf))[1]  # 0 frozen epochs cannot go lower
              and curve_agrees(name, False, value, analysis)):
            steps.append(f"best {name}={value:.3g} is at the bottom of its range [{low:.3g}, {high:.3g}]: widen it")
    close = [c for c in comparisons if c.verdict == "within noise"]
    if recommendation is not None and recommendation.pick is not None:
        if recommendation.pick != report_best.number:
            steps.append(f"ship the cheaper trial {recommendation.pick}, within noise of the best and "
                         f"{recommendation.ratio:.2f}x cheaper by {recommendation.cost}: pet-sweep export --pick cheapest")
    elif close:
        # the runner-up can also be the best of another architecture: name each trial once
        steps.append(tie_advice(report_best.number, list(dict.fromkeys(c.other_trial for c in close)), frame))
    steps += learning_failures(frame)  # pruned ones too: a diverging trial is pruned at once
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
                 always_inert: Sequence[str] = (), objectives: Sequence[str] = ("error_rate",),
                 cost_book: CostBook | None = None) -> StudyReport:
    """Analyse every trial with a history and compare the best with its rivals.

    `importances` from fewer than MIN_IMPORTANCE_TRIALS completed trials are dropped
    (`importance_note` says why); `always_inert`: parameters the space gives that no
    trial can use (`space.always_inert`); `objectives`: the study's, error_rate first (several:
    a multi-objective study, with a Pareto front); `cost_book`: the trials' cost keys and the
    study's timing session (`report.costs`), which decide what "cheaper" means.
    """
    done = completed(records, experiment=experiment, study_name=study_name)
    too_few = too_few_for_importances(len(done))
    if too_few:
        importances, importance_note = {}, too_few
    best, done, selection = picks(done)
    n_valid = _n_items(best)  # every trial is judged on the same validation items
    analyses = analyse_all(records, n_valid, n_classes)
    frame = with_heldout(trials_frame(records, analyses, n_valid), heldout)
    comparisons, recommendation = compare_and_recommend(best, done, objectives, analyses, cost_book)
    counts = {k: int(v) for k, v in frame["state"].value_counts().items()}
    # verdicts of the trials that ran their course: a pruned trial was cut short on purpose, so
    # "still improving" or an epoch count read off its curve says nothing about its config
    complete = frame[frame["state"] == "COMPLETE"]
    verdict_counts = {v: int((complete["verdict"] == v).sum()) for v in verdicts.VERDICTS if (complete["verdict"] == v).any()}
    mine = [h for h in heldout if h.trial == best.number]
    held = mine[-1] if mine else (heldout[-1] if heldout else None)
    steps = next_steps(best, analyses.get(best.number), comparisons, verdict_counts, frame, bounds or {}, held,
                       test_split, recommendation)
    notes = []
    if counts.get("RUNNING"):
        notes.append(f"the study is still running ({plural(counts['RUNNING'], 'trial')} in progress); "
                     "this report is a snapshot")
    notes += [f"{name} does nothing in this space: freeze_epochs is 0 in every trial, so there is no frozen phase; "
              f"it is not sampled, and can be dropped from the space" for name in always_inert]
    if len(objectives) > 1:
        notes.append(f"{len(objectives)} objectives ({', '.join(objectives)}): {front.NO_PRUNING}; the best trial is "
                     "the lowest error_rate, the front is over all objectives")
    return StudyReport(experiment=experiment, study_name=study_name, trials=frame, analyses=analyses, best=best,
                       n_valid=_n_items(best), comparisons=comparisons, tables=study_tables(frame),
                       importances=dict(importances or {}), heldout=held, next_steps=steps, counts=counts,
                       verdict_counts=verdict_counts, records={r.number: r for r in records}, notes=notes,
                       test_split=test_split, n_candidates=len(done), importance_note=importance_note,
                       objectives=tuple(objectives), recommendation=recommendation, cost_book=cost_book,
                       selection=selection,
                       front=tuple(r.number for r in front.pareto_front(done, len(objectives)))
                       if len(objectives) > 1 else ())


def too_few_for_importances(n_complete: int) -> str:
    """Why importances are not ranked on `n_complete` completed trials; "" when there are enough."""
    if n_complete >= MIN_IMPORTANCE_TRIALS:
        return ""
    return (f"not ranked: {plural(n_complete, 'completed trial')}, fewer than the "
            f"{MIN_IMPORTANCE_TRIALS} an importance ranking needs to be more than noise")


