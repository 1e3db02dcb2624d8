"""Figures of a run (matplotlib, PNG, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures are files, never windows
import matplotlib.pyplot as plt  # noqa: E402


def plot_lr_find(result, path: str | Path) -> Path:
    """The lr-finder curve (raw and smoothed loss against a log-scale learning rate), suggestion marked."""
    from imgtune.schedule import smooth_losses

    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(result.lrs, result.losses, color="0.75", linewidth=1, label="loss")
    ax.plot(result.lrs, smooth_losses(result.losses, beta=0.9, centered=True), color="C0", linewidth=2, label="smoothed")
    for key, color in (("suggested", "C3"), ("minimum", "C1"), ("steepest", "C2")):
        if key in result.suggestion:
            value = result.suggestion[key]
            ax.axvline(value, color=color, linestyle="--", label=f"{key} {value:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    smooth = smooth_losses(result.losses, beta=0.9, centered=True)
    ax.set_ylim(min(smooth) - 0.1 * abs(min(smooth)), max(smooth[: max(3, len(smooth) // 4)]) * 1.5)
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
