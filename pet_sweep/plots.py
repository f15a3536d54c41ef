"""Figures (matplotlib, written as PNG). Kept apart from the analysis so `report` stays pure."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never open a window
import matplotlib.pyplot as plt  # noqa: E402

from pet_sweep.callbacks import EpochRecord  # noqa: E402


def unfreeze_epoch(history: Sequence[EpochRecord]) -> int | None:
    """Global index of the first unfrozen epoch, when a frozen phase came before it."""
    frozen = [r for r in history if r.phase == "frozen"]
    return len(frozen) if frozen and len(frozen) < len(history) else None


def loss_curve(history: Sequence[EpochRecord], path: Path, title: str = "") -> Path:
    """Train and validation loss per epoch (fastai's `plot_loss` view), error rate on a second axis."""
    epochs = [r.epoch + 1 for r in history]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.plot(epochs, [r.train_loss for r in history], "o-", label="train loss")
    ax.plot(epochs, [r.valid_loss for r in history], "o-", label="valid loss")
    ax.set_xlabel("epoch (both phases)")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot(epochs, [r.error_rate for r in history], "s--", color="tab:red", alpha=0.7, label="error rate")
    ax2.set_ylabel("error rate")
    split = unfreeze_epoch(history)
    if split is not None:
        ax.axvline(split + 0.5, color="grey", linestyle=":", label="unfreeze")
    handles = ax.get_legend_handles_labels()
    handles2 = ax2.get_legend_handles_labels()
    ax.legend(handles[0] + handles2[0], handles[1] + handles2[1], loc="upper right", fontsize=8)
    ax.set_title(title or "loss per epoch")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
