"""The report's figures on a 30-trial study built in memory (no training): what each draws where.

Read off the figure objects (legend and label extents from the Agg renderer, axis limits, markers),
not from pixels.
"""

from __future__ import annotations

import dataclasses
import itertools
import random

from matplotlib.ticker import PercentFormatter

from pet_sweep.report import analysis, figures
from tests.test_report import history, record


def thirty_trials(heldout: tuple[analysis.HeldOut, ...] = ()) -> analysis.StudyReport:
    """22 completed trials between 8 % and 60 % error (one of them diverged: a gap of 1e6), 7 pruned
    and one failed, as a 30-trial sweep has them."""
    rng = random.Random(0)
    records = []
    for n in range(30):
        errors = sorted((round(rng.uniform(0.08, 0.6), 2) for _ in range(3)), reverse=True)
        state = "PRUNED" if n % 4 == 3 else "FAIL" if n == 29 else "COMPLETE"
        r = record(n, rng.choice(["resnet18", "resnet34"]), errors if state == "COMPLETE" else errors[:2], state=state)
        if n == 5:  # a loss that blew up: its gap is off any scale
            r = dataclasses.replace(r, history=tuple(history([1.0, 0.9, 0.8], [1.0, 1e3, 1e6], [0.6, 0.7, 0.9])),
                                    value=0.9)
        records.append(r)
    return analysis.build_report(records, experiment="e", study_name="s", n_classes=10, heldout=heldout)


def test_error_vs_gap_draws_pruned_trials_in_grey_and_labels_that_do_not_overlap() -> None:
    rep = thirty_trials()
    fig = figures.error_vs_gap(rep)
    ax = fig.axes[0]
    legend = fig.legends[0]
    labels = [t.get_text() for t in legend.get_texts()]
    pruned = next(text for text in labels if text.startswith("pruned / failed"))
    assert pruned.startswith("pruned / failed (8)")  # the 7 pruned and the failed one, counted where drawn
    grey = [c for c in ax.collections if c.get_label().startswith("pruned / failed")]
    assert len(grey) == 1 and len(grey[0].get_offsets()) == 8
    assert tuple(grey[0].get_facecolor()[0][:3]) == (0.5019607843137255,) * 3  # matplotlib's "grey"
    # the verdict entries count the completed trials only
    verdicts = sum(int(text.rsplit("(", 1)[1].rstrip(")")) for text in labels
                   if not text.startswith(("pruned", "gap off")))
    assert verdicts == 22
    # the diverged trial is drawn at the edge of a scale that still shows the others apart
    assert any(text.startswith("gap off the scale (1)") for text in labels)
    assert ax.get_xscale() == "symlog" and ax.get_xlim()[1] < 1e3
    renderer = figures.laid_out(fig)
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    assert len(boxes) >= 15, len(boxes)  # most trials labelled
    assert not [(a, b) for a, b in itertools.combinations(boxes, 2) if a.overlaps(b)]
    assert all(ax.bbox.contains(b.x0, b.y0) and ax.bbox.contains(b.x1, b.y1) for b in boxes)
    # the legend is beside the plot, not on it
    assert not legend.get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))


def test_error_curves_keep_the_legend_off_the_curves_and_the_axis_fitted() -> None:
    rep = thirty_trials()
    fig = figures.error_curves(rep)
    ax = fig.axes[0]
    renderer = figures.laid_out(fig)
    assert fig.legends and not ax.get_legend()
    assert not fig.legends[0].get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))
    drawn = [v for line in ax.get_lines() for v in line.get_ydata()]
    low, high = ax.get_ylim()
    assert 0 < low <= min(drawn) and max(drawn) <= high <= 1.0  # no empty half from 0 %
    assert isinstance(ax.yaxis.get_major_formatter(), PercentFormatter)


def test_error_curves_mark_a_replayed_trials_held_out_error() -> None:
    best = thirty_trials().best.number
    replay = analysis.HeldOut(trial=best, test_error=0.21, n_test=100, valid_error=None, run_id="r", held_out=True)
    ax = figures.error_curves(thirty_trials((replay,))).axes[0]
    marks = [line for line in ax.get_lines() if line.get_marker() == "D" and len(line.get_xdata())]
    assert [(list(m.get_ydata())) for m in marks] == [[0.21]]
    assert "held-out error (replayed: pet-sweep train)" in ax.get_legend_handles_labels()[1]
    assert [t.get_text() for t in ax.texts] == ["21.0%"]
    assert "held-out" not in " ".join(figures.error_curves(thirty_trials()).axes[0].get_legend_handles_labels()[1])


def test_the_baseline_and_the_repeats_are_told_apart_from_the_searched_trials() -> None:
    from pet_sweep.report.seeds import Run

    rep = thirty_trials()
    first, second, third = rep.top(6)[:3]
    rep.records[first] = dataclasses.replace(rep.records[first], run=Run(first, "baseline", 1, 0.1, baseline=True))
    rep.records[second] = dataclasses.replace(rep.records[second], run=Run(second, str(third), 1, 0.1))
    rep.records[third] = dataclasses.replace(rep.records[third], run=Run(third, str(third), 0, 0.1))  # searched
    labels = figures.error_curves(rep).axes[0].get_legend_handles_labels()[1]
    assert [label for label in labels if "baseline" in label or "repeat" in label] == [
        f"trial {first} ({rep.records[first].params['arch']}, {rep.analyses[first].verdict}, fine_tune baseline, seed 1)",
        f"trial {second} ({rep.records[second].params['arch']}, {rep.analyses[second].verdict}, "
        f"repeat of trial {third}, seed 1)"]
    ax = figures.error_vs_gap(rep).axes[0]
    ringed = {c.get_label(): len(c.get_offsets()) for c in ax.collections if c.get_label().startswith(("fastai", "a repeat"))}
    assert ringed == {"fastai's fine_tune baseline (1)": 1, "a repeat on another seed (1)": 1}
    plain = figures.error_vs_gap(thirty_trials()).axes[0]  # a study without selection: nothing ringed
    assert not [c for c in plain.collections if c.get_label().startswith(("fastai", "a repeat"))]
