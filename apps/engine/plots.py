"""PNG plots of a run: per-layer widths before/after, and accuracy / MACs over training."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plot_widths", "plot_history"]


def plot_widths(before: Mapping[str, int], after: Mapping[str, int], path: str | Path, *, title: str = "") -> Path:
    """Grouped bars: each layer's (or channel group's) width before and after pruning."""
    names = list(before)
    xs = range(len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(names) + 2), 4))
    ax.bar([i - 0.2 for i in xs], [before[n] for n in names], width=0.4, label="before")
    ax.bar([i + 0.2 for i in xs], [after.get(n, 0) for n in names], width=0.4, label="after")
    ax.set_xticks(list(xs), names, rotation=90, fontsize=7)
    ax.set_ylabel("channels")
    ax.set_title(title or "channel widths")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_history(history: Sequence[Mapping[str, Any]], path: str | Path, *, title: str = "") -> Path:
    """Validation accuracy (left axis) and, when logged, MACs (right axis) against the epoch."""
    rows = [r for r in history if r.get("val_acc") is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["epoch"] for r in rows], [r["val_acc"] for r in rows], "o-", color="tab:blue", label="val acc")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)", color="tab:blue")
    macs = [r for r in history if r.get("macs") is not None]
    if macs:
        ax2 = ax.twinx()
        ax2.plot([r["epoch"] for r in macs], [r["macs"] / 1e6 for r in macs], "s--", color="tab:red")
        ax2.set_ylabel("MACs (M, masked)", color="tab:red")
    ax.set_title(title or "training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
