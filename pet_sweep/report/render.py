"""The report as text: the terminal summary, Markdown and a self-contained HTML page.

Strings only: the figures arrive as paths (Markdown) or PNG bytes (HTML).
"""

from __future__ import annotations

import base64
import html as html_lib
import math
from typing import Any, Mapping

import pandas as pd

from pet_sweep.params import lr_text
from pet_sweep.report.analysis import StudyReport
from pet_sweep.report.costs import NOT_MEASURED, cost_table
from pet_sweep.report.front import COSTS_LEGEND, SHOWN_COSTS, front_table
from pet_sweep.report.stats import format_rate, plural
from pet_sweep.report.verdicts import ADVICE


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
    # "was the sweep worth it?" first: the best config over its seeds against fastai's fine_tune defaults
    lines = [*(report.selection.lines() if report.selection else []),
             ("study", f"{report.study_name} ({report.experiment}): {plural(len(report.trials), 'trial')} ({counts})"),
             ("best", f"trial {b.number}: {describe_params(b.params)}"
                      + (f"  batch_size={b.batch_size}" if batch_sizes_vary(report) else "")),
             ("valid error", f"{format_rate(b.value, report.n_valid)}  (selected as the best of "
                             f"{plural(report.n_candidates, 'trial')} on these {report.n_valid or '?'} items: "
                             "optimistic)")]
    if a is not None:
        lines.append(("reading", f"{a.verdict}: {a.reason}; best at epoch {a.best_epoch} (last: epoch {a.last_epoch})"))
    for c in report.comparisons:
        lines.append((f"vs {c.label}", f"trial {c.other_trial}: {c.text()}"))
    if report.recommendation is not None:
        lines.append(("recommend", report.recommendation.text))
    lines.append(("held-out", heldout_text(report)))
    n_complete = report.counts.get("COMPLETE", 0)
    lines.append(("verdicts", (", ".join(f"{k} {v}" for k, v in report.verdict_counts.items()) or "-")
                  + f" (of the {plural(n_complete, 'completed trial')})"))
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
                "rec_unfrozen_epochs", "seconds"]
# What the epoch columns count (the table alone does not say).
TRIALS_LEGEND = ("epochs and rec_unfrozen_epochs (the recommended `epochs`) count unfrozen epochs, epochs_run "
                 "counts both phases; best_epoch is the epoch's number, as in MLflow")


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
    if replayed(report):  # beside the validation error it was selected on
        columns.insert(columns.index("ci_high") + 1, "heldout_error")
    if batch_sizes_vary(report):
        columns.insert(columns.index("epochs") + 1, "batch_size")
    shown = frame[columns + cost_columns(report)].reset_index(drop=True)
    if "peak_memory_mb" in shown:  # a completed trial without it: its device could not see its memory
        unseen = (shown["state"] == "COMPLETE") & shown["peak_memory_mb"].isna()
        shown["peak_memory_mb"] = shown["peak_memory_mb"].astype(object).where(~unseen, NOT_MEASURED)
    return shown


def replayed(report: StudyReport) -> bool:
    """Has some trial a held-out test error (a `pet-sweep train` replay)?"""
    return "heldout_error" in report.trials and bool(report.trials["heldout_error"].notna().any())


def cost_columns(report: StudyReport) -> list[str]:
    """The costs some trial recorded (none in a study from before costs were measured)."""
    return [c for c in SHOWN_COSTS if c in report.trials and report.trials[c].notna().any()]


HELDOUT_LEGEND = ("heldout_error: the replayed trial's error on the held-out test split (pet-sweep train), "
                  "not selected on, so not optimistic")


def trials_legend(report: StudyReport) -> str:
    return (TRIALS_LEGEND + (f"; {HELDOUT_LEGEND}" if replayed(report) else "")
            + (f"; {COSTS_LEGEND}" if cost_columns(report) else ""))


def front_section(report: StudyReport) -> tuple[str, pd.DataFrame | None]:
    """What the "Error against cost" section says, and the table of the Pareto front (multi-objective only)."""
    if not report.multi_objective:
        return "", None
    text = (f"Pareto front over {', '.join(report.objectives)}: {plural(len(report.front), 'trial')} that no other "
            "trial beats on every objective, cheapest first.")
    return text, front_table([report.records[n] for n in report.front], report.objectives, report.n_valid)


def costs_section(report: StudyReport) -> tuple[str, pd.DataFrame | None]:
    """What the "Costs by model" table says, and the table: one row per cost key (`report.costs`)."""
    book = report.cost_book
    if book is None or not book.keys:
        return "", None
    done = [r for r in report.records.values() if r.number in book.keys]
    how = (book.session.describe() if book.session is not None
           else "not timed side by side yet (pet-sweep report --time-costs times them)")
    text = ("A model's cost belongs to its architecture, image size, precision, batch size and device, not to a "
            f"trial: the trials of one row are one cost. Timings: {how}; the one-shot predict_ms each trial "
            "measured while it ran is shown beside, for its spread.")
    return text, cost_table(done, book)


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
    "pareto_front": "Error rate against cost: the Pareto front (Optuna), each error with its 95% interval",
}


def _verdict_section(report: StudyReport) -> list[tuple[str, str]]:
    return [(v, ADVICE[v]) for v in report.verdict_counts]


def markdown(report: StudyReport, figures: Mapping[str, str]) -> str:
    """The Markdown summary; `figures` maps a figure name to its relative path."""
    out = [f"# pet-sweep report: {report.study_name}", "", "```", summary_text(report), "```", "",
           "## Trials, best first", "", markdown_table(ranked(report)), "", f"*{trials_legend(report)}*", ""]
    text, front = front_section(report)
    if report.recommendation is not None or front is not None:
        out += ["## Error against cost", ""]
        out += [f"Recommendation: {report.recommendation.text}", ""] if report.recommendation else []
        out += [text, "", markdown_table(front), ""] if front is not None else []
        costs_text, costs = costs_section(report)
        out += ["### Costs by model", "", costs_text, "", markdown_table(costs), ""] if costs is not None else []
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
             "<h2>Trials, best first</h2>", _html_table(ranked(report)), f"<p><i>{esc(trials_legend(report))}</i></p>"]
    text, front = front_section(report)
    if report.recommendation is not None or front is not None:
        parts.append("<h2>Error against cost</h2>")
        parts += [f"<p>Recommendation: {esc(report.recommendation.text)}</p>"] if report.recommendation else []
        parts += [f"<p>{esc(text)}</p>", _html_table(front)] if front is not None else []
        costs_text, costs = costs_section(report)
        parts += ["<h3>Costs by model</h3>", f"<p>{esc(costs_text)}</p>", _html_table(costs)] \
            if costs is not None else []
    parts.append("<h2>Verdicts</h2><ul>")
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
