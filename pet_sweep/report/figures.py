"""The report's figures, built from a `StudyReport` (a trial's own loss curve and LR-finder plot,
drawn while it trains, are in `trial_figures`).

Figures are made with `matplotlib.figure.Figure` (not pyplot), so they never
touch the backend: the CLI and the trials save them as PNG, a notebook shows them
inline. Optuna's own plots (importances, parallel coordinates) come from its
matplotlib backend. Epochs are numbered as recorded (`verdicts.epoch_numbers`:
from 0 across both phases, as MLflow's step; fastai's table starts at 0 too).
"""

from __future__ import annotations

import io
import math
import warnings
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator, PercentFormatter

from pet_sweep.report.analysis import StudyReport
from pet_sweep.report.front import UNITS
from pet_sweep.report.verdicts import VERDICTS, epoch_numbers, value_of

EPOCH_AXIS = "epoch (frozen + unfrozen, from 0 as in MLflow)"

# One colour per verdict, the same in every figure.
VERDICT_COLOURS: dict[str, str] = dict(zip(VERDICTS, ("tab:green", "tab:orange", "tab:red", "tab:blue",
                                                      "tab:purple", "black", "tab:brown"), strict=True))


def unfreeze_epoch(history: Sequence[Any]) -> int | None:
    """Number of the first unfrozen epoch, when a frozen phase came before it."""
    frozen = [value_of(r, "phase") for r in history].count("frozen")
    return epoch_numbers(history)[frozen] if 0 < frozen < len(history) else None


def _error_axis(ax: Any, floor: float = 0.01, from_zero: bool = True) -> None:
    """Error rates from ~90 % at the first epoch to ~1 % at the end: log above `floor`, linear below
    (so 0 % still shows), so the last epochs, where trials differ, stay readable."""
    ax.set_yscale("symlog", linthresh=floor, linscale=0.5)
    if from_zero:
        ax.set_ylim(bottom=0)
    low, high = ax.get_ylim()
    ticks = [t for t in (0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0) if low <= t <= max(high, 0.01)]
    ax.set_yticks(ticks)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=1))
    ax.yaxis.set_minor_locator(NullLocator())


def _role(record: Any) -> str:
    """What a trial is besides a searched one: fastai's fine_tune baseline, or a repeat of a searched
    config on another seed (`selection`); "" for a searched trial."""
    run = record.run
    if run is None:
        return ""
    if run.baseline:
        return f"fine_tune baseline, seed {run.seed}"
    return f"repeat of trial {run.config_id}, seed {run.seed}" if run.config_id != str(record.number) else ""


def _label(report: StudyReport, number: int) -> str:
    record, analysis = report.records[number], report.analyses.get(number)
    verdict = f", {analysis.verdict}" if analysis else ""
    role = _role(record)
    return f"trial {number} ({record.params.get('arch')}{verdict}{', ' + role if role else ''})"


def loss_curves(report: StudyReport, k: int = 4) -> Figure:
    """fastai's `plot_loss` view of the top k trials: train/valid loss, error rate, unfreeze point."""
    top = [n for n in report.top(k) if report.records[n].history]
    cols = 2 if len(top) > 1 else 1
    rows = math.ceil(len(top) / cols) or 1
    fig = Figure(figsize=(6.2 * cols, 3.8 * rows), dpi=100, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    handles: dict[str, Any] = {}
    for ax, number in zip(axes, top):
        history = report.records[number].history
        epochs = epoch_numbers(history)
        for key, style, name in (("train_loss", "o-", "train loss"), ("valid_loss", "o-", "valid loss")):
            (line,) = ax.plot(epochs, [h[key] for h in history], style, ms=4, label=name)
            handles[name] = line
        ax.set_xlabel(EPOCH_AXIS)
        ax.set_yscale("log")  # a spike in one epoch must not flatten the end of the curve
        ax.set_ylabel("loss (log scale)")
        ax.grid(alpha=0.3)
        err = ax.twinx()
        (line,) = err.plot(epochs, [h["error_rate"] for h in history], "s--", color="tab:red", ms=4, alpha=0.8,
                           label="error rate")
        handles["error rate (right axis)"] = line
        err.set_ylabel("error rate")
        analysis = report.analyses.get(number)
        if analysis:
            (star,) = err.plot([analysis.best_epoch], [analysis.best_error], "*", color="tab:red", ms=13,
                               label="best error rate")
            handles["best error rate"] = star
        _error_axis(err)
        split = unfreeze_epoch(history)
        if split is not None:
            handles["unfreeze"] = ax.axvline(split - 0.5, color="grey", linestyle=":", lw=1.5, label="unfreeze")
        ax.set_xticks(epochs)
        ax.set_title(_label(report, number), fontsize=10)
    for ax in axes[len(top):]:
        ax.set_visible(False)
    # one row fits under two panels; under one panel, a row would be cut at both edges
    fig.legend(list(handles.values()), list(handles), loc="outside lower center",
               ncols=len(handles) if cols > 1 else 3, fontsize=9)
    fig.suptitle(f"{report.study_name}: loss curves of the " + ("best trial" if len(top) == 1 else
                                                                f"top {len(top)} trials"))
    return fig


def error_curves(report: StudyReport, k: int = 6) -> Figure:
    """Error rate per epoch of the top k trials, with the best trial's 95 % interval as a band."""
    fig = Figure(figsize=(8, 4.6), dpi=100, layout="constrained")
    ax = fig.subplots()
    ticks: set[int] = set()
    for i, number in enumerate(report.top(k)):
        history = report.records[number].history
        if not history:
            continue
        epochs = epoch_numbers(history)
        ticks.update(epochs)
        (line,) = ax.plot(epochs, [h["error_rate"] for h in history], "o-", ms=4, lw=2.2 if i == 0 else 1.3,
                          label=_label(report, number))
        split = unfreeze_epoch(history)
        if split is not None:
            ax.plot([split], [history[epochs.index(split)]["error_rate"]], "v", color=line.get_color(), ms=9)
    by_number = report.trials.set_index("number")
    held = [(n, float(by_number.loc[n, "heldout_error"])) for n in report.top(k)
            if "heldout_error" in by_number and report.records[n].history
            and math.isfinite(float(by_number.loc[n, "heldout_error"]))]
    for n, error in held:  # a replayed trial's held-out error (pet-sweep train), beside its last epoch
        last = epoch_numbers(report.records[n].history)[-1]
        ax.plot([last + 0.25], [error], "D", color="black", ms=7, mfc="white", mew=1.5)
        ax.annotate(f"{error:.1%}", (last + 0.25, error), textcoords="offset points", xytext=(6, -3), fontsize=8)
    if held:
        ax.plot([], [], "D", color="black", mfc="white", mew=1.5, label="held-out error (replayed: pet-sweep train)")
    row = by_number.loc[report.best.number]
    if row["ci_low"] is not None and not math.isnan(row["ci_low"]):
        ax.axhspan(row["ci_low"], row["ci_high"], color="grey", alpha=0.15,
                   label=f"best trial's 95% interval ({row['n_valid']:.0f} items)")
    ax.plot([], [], "v", color="grey", label="first unfrozen epoch")
    ax.set_xticks(sorted(ticks))
    _fit_error_limits(ax, [v for line in ax.get_lines() for v in line.get_ydata()] + [row["ci_low"], row["ci_high"]])
    _error_axis(ax, from_zero=False)
    ax.set_xlabel(EPOCH_AXIS)
    ax.set_ylabel("validation error rate (log scale above 1%)")
    ax.set_title(f"{report.study_name}: error rate per epoch, top trials")
    ax.grid(alpha=0.3)
    # beside the plot, never on the curves' last epochs (where the best point is)
    fig.legend(*ax.get_legend_handles_labels(), fontsize=8, loc="outside right upper")
    return fig


def _fit_error_limits(ax: Any, values: Sequence[float]) -> None:
    """The error axis spans the values drawn (a little margin), not 0 to 100 %."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if finite:
        low, high = min(finite), max(finite)
        ax.set_ylim(max(0.0, low * 0.8), min(1.0, high * 1.15) or 0.01)


def error_vs_gap(report: StudyReport) -> Figure:
    """Every analysed trial: final error rate against the final generalisation gap, by verdict."""
    fig = Figure(figsize=(8, 5), dpi=100, layout="constrained")
    ax = fig.subplots()
    frame = report.trials[report.trials["verdict"].isin(VERDICTS)].copy()  # running trials have no verdict yet
    frame["final_gap"], clipped = _clip_gaps(frame)
    done = frame[frame["state"] == "COMPLETE"]
    for verdict in VERDICTS:
        rows = done[done["verdict"] == verdict]
        if rows.empty:
            continue
        low = (rows["error_rate"] - rows["ci_low"]).fillna(0).clip(lower=0)
        high = (rows["ci_high"] - rows["error_rate"]).fillna(0).clip(lower=0)
        ax.errorbar(rows["final_gap"], rows["error_rate"], yerr=[low, high], fmt="o", color=VERDICT_COLOURS[verdict],
                    ms=7, capsize=3, alpha=0.85, label=f"{verdict} ({len(rows)})")
    # a pruned or failed trial's verdict is of a curve cut short: drawn apart, in grey, not as its verdict
    other = frame[frame["state"] != "COMPLETE"]
    if not other.empty:
        ax.scatter(other["final_gap"], other["error_rate"], marker="x", color="grey", s=40,
                   label=f"pruned / failed ({len(other)}): its last epoch")
    roles = {int(n): _role(report.records[int(n)]) for n in frame["number"]}
    for prefix, marker, what in (("fine_tune", "s", "fastai's fine_tune baseline"), ("repeat", "o", "a repeat on another seed")):
        rows = frame[frame["number"].isin([n for n, role in roles.items() if role.startswith(prefix)])]
        if not rows.empty:  # not searched trials: ringed, so the eye does not count them as the search's
            ax.scatter(rows["final_gap"], rows["error_rate"], marker=marker, s=170, facecolors="none",
                       edgecolors="black", linewidths=1.2, label=f"{what} ({len(rows)})")
    if clipped:  # a diverged trial's gap (1e6) would squeeze every other trial onto x = 0
        beyond = frame[frame["number"].isin(clipped)]
        ax.scatter(beyond["final_gap"], beyond["error_rate"], marker=">", facecolors="none", edgecolors="black",
                   s=90, clip_on=False, label=f"gap off the scale ({len(clipped)}): drawn at the edge")
    ax.axvline(0, color="grey", lw=1, linestyle=":")
    # linear within a loss unit of 0, where most trials sit; logarithmic beyond (a diverging trial's 100s)
    ax.set_xscale("symlog", linthresh=1.0, linscale=1.5)
    _fit_error_limits(ax, frame[["error_rate", "ci_low", "ci_high"]].astype(float).stack().tolist())
    _error_axis(ax, from_zero=False)
    ax.set_xlabel("generalisation gap at the last epoch (valid loss − train loss; log scale beyond ±1)")
    ax.set_ylabel("error rate at the last epoch (bars: 95% interval)")
    ax.set_title(f"{report.study_name}: error rate vs generalisation gap (labels: trial numbers)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # none where no trial has a loss curve
        fig.legend(*ax.get_legend_handles_labels(), title="verdict", fontsize=8, loc="outside right upper")
    best_first = frame.sort_values(["error_rate", "number"], na_position="last")
    _place_labels(fig, ax, [(str(int(r["number"])), float(r["final_gap"]), float(r["error_rate"]))
                            for _, r in best_first.iterrows()
                            if math.isfinite(float(r["final_gap"])) and math.isfinite(float(r["error_rate"]))])
    return fig


def _clip_gaps(frame: Any) -> tuple[Any, list[int]]:
    """The gaps to draw: within two decades (of the symlog axis) beyond the completed trials' quartiles
    (all trials' where none completed); a gap past that (a loss that blew up to 1e6) is drawn at the
    edge. Returns the gaps and the trials clipped."""
    gaps = frame["final_gap"].astype(float)
    base = gaps[(frame["state"] == "COMPLETE") & np.isfinite(gaps)]
    base = base if len(base) else gaps[np.isfinite(gaps)]
    if base.empty:
        return gaps, []
    lo, hi = min(float(base.quantile(0.25)), -1.0) * 100, max(float(base.quantile(0.75)), 1.0) * 100
    outside = frame["number"][(gaps < lo) | (gaps > hi)].astype(int).tolist()
    return gaps.clip(lower=lo, upper=hi), outside


def laid_out(fig: Figure) -> Any:
    """The figure's renderer (Agg, no pyplot backend), once its layout (constrained) is final: what
    text and legend extents are measured with."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no backend of pyplot's: only a renderer

    canvas = fig.canvas if hasattr(fig.canvas, "get_renderer") else FigureCanvasAgg(fig)
    fig.draw_without_rendering()
    return canvas.get_renderer()


# Where a point's label may go, in points from it: right, above, left, below, then the diagonals.
_LABEL_OFFSETS = ((5, 3), (0, 7), (-12, 3), (0, -12), (6, 7), (-12, 7), (6, -11), (-12, -11))


def _place_labels(fig: Figure, ax: Any, points: Sequence[tuple[str, float, float]]) -> int:
    """Label each point (best first) at the first of `_LABEL_OFFSETS` where the text overlaps no label
    placed before it and no other point; a point with no free place is left unlabelled. Returns how
    many were labelled. Sizes are the renderer's, so the rule holds at any number of trials."""
    renderer = laid_out(fig)
    dots = [ax.transData.transform((x, y)) for _, x, y in points]
    taken: list[Any] = []
    placed = 0
    for i, (text, x, y) in enumerate(points):
        for dx, dy in _LABEL_OFFSETS:
            label = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=8, color="#333")
            box = label.get_window_extent(renderer).expanded(1.1, 1.2)
            clash = any(box.overlaps(other) for other in taken) or any(
                j != i and box.x0 - 3 <= px <= box.x1 + 3 and box.y0 - 3 <= py <= box.y1 + 3
                for j, (px, py) in enumerate(dots))
            if not clash and ax.bbox.contains(box.x0, box.y0) and ax.bbox.contains(box.x1, box.y1):
                taken.append(box)
                placed += 1
                break
            label.remove()
    return placed


def optuna_figures(study: Any, importance_params: Sequence[str] = ()) -> tuple[dict[str, Figure], list[str]]:
    """Optuna's matplotlib importances and parallel-coordinate plots; notes for those it cannot draw.

    The importances only over `importance_params` (the report's ranked ones), and none without them:
    too few trials, or nothing active varies (the report says which).
    """
    import optuna  # heavy: optuna's figures only when the report draws them
    from optuna.visualization import matplotlib as ovm

    from pet_sweep.sweep.records import error_of

    figures: dict[str, Figure] = {}
    notes: list[str] = []
    target = error_of if len(study.directions) > 1 else None  # several objectives: plot the error rate
    makers = {"param_importances": lambda: ovm.plot_param_importances(
                  study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0), target_name="error rate",
                  params=list(importance_params), target=target),
              "parallel_coordinate": lambda: ovm.plot_parallel_coordinate(study, target_name="error rate",
                                                                          target=target)}
    if not importance_params:
        del makers["param_importances"]
    titles = {"param_importances": "Which settings matter: fANOVA importance for the error rate",
              "parallel_coordinate": "Settings of every completed trial (colour: error rate)"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", UserWarning)  # matplotlib on a parameter with one value
        for name, make in makers.items():
            try:
                ax = make()
            except (ValueError, RuntimeError) as err:  # too few trials, nothing varies
                notes.append(f"{name.replace('_', ' ')} not drawn: {err}")
                continue
            fig = ax.figure
            if not fig.axes or not any(a.has_data() for a in fig.axes):
                notes.append(f"{name.replace('_', ' ')} not drawn: not enough completed trials")
                _close(fig)
                continue
            for loc in ("left", "right"):  # Optuna's own title sits on the left, under ours
                ax.set_title("", loc=loc)
            ax.set_title(titles[name])
            if name == "parallel_coordinate":
                _readable_parallel_coordinate(fig)
            fig.set_size_inches(9, 5)
            if name == "parallel_coordinate":
                ax.set_title("")
                fig.suptitle(titles[name])  # above the parameter names Optuna writes over the axes
                fig.tight_layout(rect=(0, 0, 1, 0.97))
            else:
                fig.tight_layout()
            figures[name] = fig
    return figures, notes


def _readable_parallel_coordinate(fig: Figure) -> None:
    """Optuna draws the worst trials near-white (Blues) on a grey background, and each axis's
    tick labels on top of the lines: a colour map dark at the best end and light at the
    worst end that stays visible, and tick labels on a pale box."""
    fig.axes[0].yaxis.set_major_formatter(PercentFormatter(1.0))  # the error rate's axis, the first
    for ax in fig.axes:
        for collection in ax.collections:
            if collection.get_array() is not None:
                collection.set_cmap("viridis")  # low error: dark purple; high: yellow, still seen on grey
                if collection.colorbar is not None:
                    collection.colorbar.update_normal(collection)
                    collection.colorbar.ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        for label in ax.get_yticklabels() + ax.get_xticklabels():
            label.set_bbox({"facecolor": "white", "alpha": 0.75, "edgecolor": "none", "pad": 1})


def _close(fig: Any) -> None:
    import matplotlib.pyplot as plt  # heavy: pyplot (a backend), only to release Optuna's figures

    plt.close(fig)


def report_figures(report: StudyReport) -> dict[str, Figure]:
    """The report's own figures, by name (see `render.FIGURE_CAPTIONS`)."""
    return {"loss_curves": loss_curves(report), "error_curves": error_curves(report),
            "error_vs_gap": error_vs_gap(report)}


def pareto_front(study: Any, report: StudyReport) -> Figure:
    """Optuna's Pareto-front plot of error rate against the study's first cost (its second
    objective), each trial's error with its Wilson 95 % interval as an error bar, the
    lowest-error and the recommended trials marked."""
    import matplotlib.pyplot as plt  # heavy: pyplot, for Optuna's figure and its style
    import optuna
    from optuna.visualization.matplotlib import plot_pareto_front

    from pet_sweep.sweep.records import error_of

    cost = report.objectives[1]
    with plt.rc_context(), warnings.catch_warnings():  # Optuna sets the ggplot style for everyone: not past here
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = plot_pareto_front(study, target_names=[cost, "error rate"],
                               targets=lambda t: (float(t.values[1]), error_of(t)))
        frame = report.trials.set_index("number")
        points = [(n, r.values[1], frame.loc[n]) for n, r in report.records.items()
                  if r.state == "COMPLETE" and len(r.values) == len(report.objectives) and r.value is not None]
        xs = [x for _, x, _ in points]
        ys = [row["error_rate"] for _, _, row in points]
        low = [max(0.0, row["error_rate"] - row["ci_low"]) for _, _, row in points]
        high = [max(0.0, row["ci_high"] - row["error_rate"]) for _, _, row in points]
        ax.errorbar(xs, ys, yerr=[low, high], fmt="none", ecolor="#555", elinewidth=1, capsize=3, zorder=1,
                    label="95% interval (Wilson)")
        for number, x, row in points:
            ax.annotate(str(number), (x, row["error_rate"]), textcoords="offset points", xytext=(9, 6), fontsize=8)
        names = {"Trial": "dominated trial", "Best Trial": "on the Pareto front (all objectives)"}
        for collection in ax.collections:  # Optuna's own legend labels, in the report's words
            collection.set_label(names.get(collection.get_label(), collection.get_label()))
        marks = [(report.best.number, "s", "lowest error")]
        rec = report.recommendation
        if rec is not None and rec.pick is not None and rec.pick != report.best.number:
            marks.append((rec.pick, "D", f"recommended (cheapest within noise, by {rec.cost})"))
        for number, marker, label in marks:
            r = report.records[number]
            ax.plot([r.values[1]], [r.value], marker, ms=13, mfc="none", mec="black", mew=1.5, label=label)
        if xs and min(xs) > 0 and max(xs) > 10 * min(xs):  # a cost spread over decades: each one readable
            ax.set_xscale("log")
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=1))
        ax.set_xlabel(f"{cost} ({UNITS.get(cost, 'lower is cheaper')}{', log scale' if ax.get_xscale() == 'log' else ''})")
        ax.set_ylabel("validation error rate (bars: 95% interval)")
        ax.set_title(f"{report.study_name}: error rate against {cost} (labels: trial numbers)")
        ax.legend(fontsize=8, loc="best")
        fig = ax.figure
        fig.set_size_inches(9, 5.5)
        fig.tight_layout()
    return fig


def png_bytes(fig: Figure) -> bytes:
    """A figure as PNG bytes (closing pyplot's handle, if it has one)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    _close(fig)
    return buffer.getvalue()
