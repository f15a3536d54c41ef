"""The figures of one trial, drawn while it trains and logged as its MLflow artifacts: its loss
curve (fastai's `plot_loss` view) and the LR finder's plot. The report's figures are in `figures`.

Made with `matplotlib.figure.Figure` (not pyplot), so a trial never touches a backend.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pet_sweep.report.figures import EPOCH_AXIS, unfreeze_epoch
from pet_sweep.report.verdicts import epoch_numbers


def loss_curve(history: Sequence[Any], path: Path, title: str = "") -> Path:
    """Train and validation loss per epoch (fastai's `plot_loss` view), error rate on a second axis."""
    epochs = epoch_numbers(history)
    fig = Figure(figsize=(7, 4.2), dpi=110)
    ax = fig.subplots()
    ax.plot(epochs, [r.train_loss for r in history], "o-", label="train loss")
    ax.plot(epochs, [r.valid_loss for r in history], "o-", label="valid loss")
    ax.set_xlabel(EPOCH_AXIS)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot(epochs, [r.error_rate for r in history], "s--", color="tab:red", alpha=0.7, label="error rate")
    ax2.set_ylabel("error rate")
    split = unfreeze_epoch(history)
    if split is not None:
        ax.axvline(split - 0.5, color="grey", linestyle=":", label="unfreeze")
    handles = ax.get_legend_handles_labels()
    handles2 = ax2.get_legend_handles_labels()
    ax.legend(handles[0] + handles2[0], handles[1] + handles2[1], loc="upper right", fontsize=8)
    ax.set_title(title or "loss per epoch")
    ax.grid(alpha=0.3)
    # fixed margins instead of tight_layout, which draws the figure once more just to
    # measure it (half the cost of a plot that every trial writes)
    fig.subplots_adjust(left=0.1, right=0.88, bottom=0.12, top=0.92)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def lr_find_plot(lrs: Sequence[float], losses: Sequence[float], suggestions: dict[str, float],
                 path: Path, title: str = "") -> Path:
    """fastai's LR-finder view: smoothed loss against a log-scale learning rate, each suggestion
    marked on the curve and named (with its value) in the legend."""
    fig = Figure(figsize=(7, 4.4), dpi=110)
    ax = fig.subplots()
    ax.plot(lrs, losses, color="tab:blue", label="smoothed training loss")
    ax.set_xscale("log")
    styles = {"minimum": ("v", "tab:green", "minimum (loss min / 10)"), "steep": ("^", "tab:orange", "steep"),
              "valley": ("o", "tab:red", "valley"), "slide": ("s", "tab:purple", "slide")}
    # hollow markers, each smaller than the last, so suggestions that coincide stay visible
    for size, (name, lr) in zip(range(14, 0, -3), suggestions.items()):
        marker, color, label = styles.get(name, ("o", "grey", name))
        # the suggested LR itself, read off the curve
        loss_at = float(np.interp(np.log10(lr), np.log10(lrs), losses))
        ax.axvline(lr, color=color, alpha=0.4, linestyle=":")
        ax.plot([lr], [loss_at], marker, color=color, markersize=size, markerfacecolor="none",
                markeredgewidth=2, label=f"{label}: {lr:.2e}")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss (smoothed)")
    lines = (title or "learning-rate finder").split("\n")
    ax.set_title("\n".join([lines[0]] + [textwrap.fill(line, 80) for line in lines[1:]]), fontsize=10)
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
