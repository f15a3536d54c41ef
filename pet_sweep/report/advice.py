"""Next-step advice that needs evidence before it is given: the epochs range read against the
best trial's curve, and learning-rate advice from the trials that failed to learn.

`analysis.next_steps` calls these; they are pure functions of a trial's analysis and the
trials table (`analysis.trials_frame`).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import pandas as pd

from pet_sweep.report.front import CHEAPER
from pet_sweep.report.stats import plural
from pet_sweep.report.verdicts import CONVERGED, DIVERGED, FAILED_TO_LEARN, NEVER_LEARNED, TrialAnalysis

DIVERGED_REASON = "diverged"  # how `train.callbacks` starts the reason of a trial it stopped for blowing up


def curve_agrees(name: str, upward: bool, value: Any, analysis: TrialAnalysis | None) -> bool:
    """May the report say "widen `name`'s range" (`upward`: past its top, else below its bottom)?

    The curve decides the epoch count first: a best trial that reached its best in fewer epochs
    than it ran (converged, overfitting, overconfident) did not need the top of the range, and one
    still improving did not need the bottom. Without a reading (or for another parameter) the
    range alone decides.
    """
    if name != "epochs" or analysis is None or analysis.recommended_epochs is None or value is None:
        return True
    rec = analysis.recommended_epochs
    return rec > int(value) if upward else rec < int(value)


def converged_step(analysis: TrialAnalysis | None, params: Mapping[str, Any]) -> str | None:
    """A converged best trial that needed fewer epochs than it ran: say so (the top of the range is not needed)."""
    if analysis is None or analysis.verdict != CONVERGED or analysis.recommended_epochs is None:
        return None
    epochs = params.get("epochs")
    if epochs is None or analysis.recommended_epochs >= int(epochs):
        return None
    return (f"best trial converged: epochs={analysis.recommended_epochs} reach its best (it ran epochs={epochs}); "
            "more epochs are not needed")


def _lr_span(values: pd.Series) -> str:
    return f"lr_hi {values.min():.2g}" if values.nunique() == 1 else f"lr_hi {values.min():.2g}–{values.max():.2g}"


def learning_failures(frame: pd.DataFrame) -> list[str]:
    """One step for the trials that diverged (blew up), one for those that never learned.

    Learning-rate advice only where the learning rate separates them from the trials that
    learned (completed, neither verdict): every failed trial above the highest lr_hi that
    learned: lower the top; every one that never learned below the lowest: raise the bottom.
    Otherwise the step says the learning rate does not explain it.
    """
    reason = frame["reason"].fillna("").astype(str)
    blew_up = frame[(frame["verdict"] == DIVERGED) | reason.str.startswith(DIVERGED_REASON)]
    stalled = frame[frame["verdict"] == NEVER_LEARNED]
    learned = frame[(frame["state"] == "COMPLETE") & ~frame["verdict"].isin(FAILED_TO_LEARN)]
    learned_hi = pd.to_numeric(learned["lr_hi"], errors="coerce").dropna()
    steps = []
    for rows, what in ((blew_up, "diverged (the loss blew up)"), (stalled, "never learned (stayed near chance)")):
        if rows.empty:
            continue
        his = pd.to_numeric(rows["lr_hi"], errors="coerce").dropna()
        head = f"{plural(len(rows), 'trial')} {what}"
        if his.empty:
            steps.append(head)
            continue
        head += f" ({_lr_span(his)})"
        if learned_hi.empty:
            steps.append(f"{head}; no trial learned, so nothing tells which learning rates work")
        elif his.min() > learned_hi.max():
            steps.append(f"{head}, all above every lr_hi that learned (highest {learned_hi.max():.2g}): "
                         f"lower the top of the LR ranges below {his.min():.2g}")
        elif rows is stalled and his.max() < learned_hi.min():
            steps.append(f"{head}, all below every lr_hi that learned (lowest {learned_hi.min():.2g}): "
                         f"raise the bottom of the LR ranges above {his.max():.2g}")
        else:
            steps.append(f"{head}, among learning rates that also learned ({_lr_span(learned_hi)}): "
                         "the learning rate alone does not explain it, so the LR ranges can stay")
    return steps


def trial_cost(row: Mapping[str, Any], by_time: bool = True) -> tuple[float, str]:
    """What a trial cost: its wall time (`by_time`), else its epochs (frozen + unfrozen)."""
    if by_time:
        return float(row["seconds"]), f"{row['seconds']:.0f}s"
    epochs = float((row.get("freeze_epochs") or 0) + (row.get("epochs") or 0))
    return epochs, plural(int(epochs), "epoch")


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
    cheaper = sorted((n for n in rivals if costs[n][0] < CHEAPER * costs[best][0]), key=lambda n: costs[n][0])
    if cheaper:
        return (f"{head}: prefer the cheaper trial {cheaper[0]} (pet-sweep export --trial {cheaper[0]}), "
                "or validate on more items before choosing")
    if all(costs[best][0] <= costs[n][0] for n in rivals):
        return f"{head}: it is also the cheapest, so keep it; validate on more items to separate them"
    return f"{head}: none is clearly cheaper (by a tenth), so keep it; validate on more items to separate them"
