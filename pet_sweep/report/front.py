"""Error against cost: the cheapest trial within noise of the lowest error, and the Pareto front.

Every completed trial records what it cost (`sweep.records.COST_ATTRS`: seconds of
fine-tuning, milliseconds to predict one image, parameters, peak memory). The
recommendation compares each trial cheaper than the lowest-error one with it by the
exact McNemar test the report already uses, Holm-corrected together with the report's
other comparisons (`analysis.compare_and_recommend`), and names the cheapest one the
test does not put beyond noise. "Cheaper" is asked of a `report.costs.CostBook`: trials that
share a model (a `CostKey`: architecture, image size, precision, batch size, device) are one cost, and a timing is cheaper only where
the side-by-side timing intervals are apart. Pure: plain records in, text and tables out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Sequence

import pandas as pd

from pet_sweep.config import NO_MO_PRUNING
from pet_sweep.report.costs import CostBook
from pet_sweep.report.stats import Comparison, compare_predictions, compare_rates, format_rate, plural

DEFAULT_COST = "predict_ms"  # what "cheapest" means in a single-objective study
# "Cheaper" means by a tenth at least: timings of one config repeated differ by a few per
# cent on an idle machine (more on a busy one), and a smaller gain is not worth a worse model.
CHEAPER = 0.9
# The trial table's cost columns (predict_ms_batch is recorded too, and can be an objective).
SHOWN_COSTS = ("train_seconds", "predict_ms", "params_m", "peak_memory_mb")
UNITS = {"train_seconds": "s", "predict_ms": "ms/image", "predict_ms_batch": "ms/image at the training batch size",
         "params_m": "M parameters", "peak_memory_mb": "MB"}
COSTS_LEGEND = ("train_seconds: seconds of fine-tuning; predict_ms: milliseconds to predict one image at batch "
                "size 1, measured once during the trial (Costs by model: timed side by side); params_m: parameters "
                "in millions; peak_memory_mb: peak memory (CUDA max allocated on a GPU, resident-set growth on a CPU; "
                "not measured where that growth is less than the model's weights and gradients: the process held "
                "the memory already)")
NO_PRUNING = (f"{NO_MO_PRUNING} (Trial.report and Trial.should_prune support one objective only), so every "
              "trial of this study ran all its epochs")


def cost_name(objectives: Sequence[str]) -> tuple[str, str]:
    """The cost "cheapest" is judged by, and why: the study's second objective, else predict_ms."""
    if len(objectives) > 1:
        return objectives[1], "the study's second objective"
    return DEFAULT_COST, "the default cost of a single-objective study"


def has_costs(records: Sequence[Any]) -> bool:
    return any(v is not None for r in records for v in r.costs.values())


def compare_records(label: str, best: Any, other: Any) -> Comparison | None:
    """The best trial against another: paired on their predictions where both have them on
    the same items, else from the error totals; None without an item count."""
    if best.preds and other.preds and best.targets and best.targets == other.targets \
            and len(best.preds) == len(other.preds) == len(best.targets):
        return compare_predictions(label, (best.number, best.preds), (other.number, other.preds), best.targets)
    if best.targets:
        return compare_rates(label, (best.number, float(best.value)), (other.number, float(other.value)),
                             len(best.targets))
    return None


def cheaper_comparisons(best: Any, done: Sequence[Any], cost: str, book: CostBook | None = None) -> list[Comparison]:
    """The best trial against every completed trial cheaper by `cost` (by a tenth at least:
    `CHEAPER`, and as `book` judges: another cost key, timing intervals apart), cheapest first
    (uncorrected)."""
    book = book or CostBook({})
    if book.value(best, cost) is None:
        return []
    cheaper = sorted((r for r in done if r.number != best.number and book.cheaper(r, best, cost, CHEAPER)),
                     key=lambda r: (book.value(r, cost), r.value, r.number))
    return [c for c in (compare_records(f"cheaper by {cost}", best, r) for r in cheaper) if c is not None]


@dataclass(frozen=True)
class Recommendation:
    """The trial to ship: the cheapest by `cost` that is within noise of the lowest error."""

    cost: str
    why_cost: str                        # "the study's second objective", ...
    best: int                            # the lowest-error trial
    pick: int | None                     # None: the best trial has no cost recorded
    text: str
    comparisons: tuple[Comparison, ...] = ()  # best vs each cheaper trial, Holm-corrected with the report's
    ratio: float | None = None           # best's cost / pick's cost (> 1: the pick is cheaper)


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.inf


def recommend(best: Any, done: Sequence[Any], cost: str, why_cost: str, comparisons: Sequence[Comparison],
              left_out: int = 0, book: CostBook | None = None) -> Recommendation:
    """Choose among `comparisons` (from `cheaper_comparisons`, Holm-corrected): the cheapest
    trial whose verdict is "within noise" ("cannot tell", from totals only, is not enough).
    `left_out`: cheaper trials not compared because they diverged or never learned."""
    rec = _recommend(best, done, cost, why_cost, comparisons, left_out, book or CostBook({}))
    if not left_out:
        return rec
    return replace(rec, text=f"{rec.text} ({plural(left_out, 'cheaper trial')} that diverged or never learned "
                             "left out)")


def _recommend(best: Any, done: Sequence[Any], cost: str, why_cost: str, comparisons: Sequence[Comparison],
               left_out: int, book: CostBook) -> Recommendation:
    by_number = {r.number: r for r in done}
    mine = book.value(best, cost)
    unit = UNITS.get(cost, "")
    named = f"{cost} ({why_cost})"
    if mine is None:
        return Recommendation(cost, why_cost, best.number, None,
                              f"no {cost} recorded for the lowest-error trial {best.number} (a trial from before "
                              "costs were measured): cannot name a cheaper one")
    if not comparisons:
        which = "trial that learned" if left_out else "trial"
        return Recommendation(cost, why_cost, best.number, best.number,
                              f"the lowest-error trial {best.number} is also the cheapest by {named}: "
                              f"{book.shown(best, cost)} {unit}{book.how(cost)}, and no other {which} is a tenth "
                              f"cheaper{_apart(book, cost)}; ship it", (), 1.0)
    close = [c for c in comparisons if c.verdict == "within noise"]
    if not close:
        return Recommendation(cost, why_cost, best.number, best.number,
                              f"none of the {plural(len(comparisons), 'trial')} a tenth or more cheaper by {named} "
                              f"is within noise of the lowest-error trial {best.number} after Holm's correction: "
                              "ship it",
                              tuple(comparisons), 1.0)
    chosen = _lowest_error_among_the_cheapest(close, by_number, cost, book)
    pick = by_number[chosen.other_trial]
    theirs = book.value(pick, cost) or 0.0
    ratio = _ratio(mine, theirs)
    n = chosen.n_items
    text = (f"trial {pick.number} ({pick.params.get('arch')}): {ratio:.2f}x cheaper by {named}, "
            f"{book.shown(pick, cost)} against {book.shown(best, cost)} {unit} of the lowest-error trial "
            f"{best.number} ({best.params.get('arch')}){book.how(cost)}, and within noise of it: error "
            f"{format_rate(pick.value, n)} against {format_rate(best.value, n)} ({chosen.how()}). "
            "Ship it: pet-sweep export --pick cheapest")
    if chosen is not close[0]:
        cheapest = by_number[close[0].other_trial]
        margin = ("by less than a tenth" if not _apart(book, cost)
                  else "not clearly: by less than a tenth, or with overlapping timing intervals")
        text += (f" (trial {cheapest.number} is cheaper still, {book.shown(cheapest, cost)} {unit}, but {margin}, "
                 f"and errs more: {format_rate(cheapest.value, n)})")
    return Recommendation(cost, why_cost, best.number, pick.number, text, tuple(comparisons), ratio)


def _apart(book: CostBook, cost: str) -> str:
    return " with its timing interval apart" if book.session is not None and cost in book.TIMED else ""


def _lowest_error_among_the_cheapest(close: Sequence[Comparison], by_number: dict[int, Any],
                                     cost: str, book: CostBook) -> Comparison:
    """Of the trials within noise of the best (`close`, cheapest first), the one to ship: the
    cheapest, unless the cheapest is not clearly cheaper than another (`book.cheaper`: by less than
    a tenth, `CHEAPER`, one cost key, or timing intervals that overlap) that errs less; then the
    lowest error among those."""
    cheapest = by_number[close[0].other_trial]
    ties = [c for c in close if not book.cheaper(cheapest, by_number[c.other_trial], cost, CHEAPER)]
    return min(ties, key=lambda c: by_number[c.other_trial].value)  # the first, so the cheaper, of equal errors


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """`a` is no worse than `b` in every objective and better in one (all minimised)."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pareto_front(done: Sequence[Any], n_objectives: int) -> list[Any]:
    """The completed trials no other dominates on all `n_objectives` values, cheapest first."""
    scored = [r for r in done if len(r.values) == n_objectives and all(math.isfinite(v) for v in r.values)]
    front = [r for r in scored if not any(dominates(o.values, r.values) for o in scored if o is not r)]
    return sorted(front, key=lambda r: (tuple(r.values[1:]), r.number))


def front_table(front: Sequence[Any], objectives: Sequence[str], n_valid: int | None) -> pd.DataFrame:
    """One row per trial on the front: its number, architecture, error with its interval, each cost."""
    rows = []
    for r in front:
        row: dict[str, Any] = {"trial": r.number, "arch": r.params.get("arch"),
                               "error_rate (95% CI)": format_rate(r.value, len(r.targets) or n_valid)}
        row.update({name: value for name, value in zip(objectives[1:], r.values[1:])})
        rows.append(row)
    return pd.DataFrame(rows)
