"""The figures of a run: training curves, confusion matrix, top losses with Grad-CAM, training samples.

Each ``plot_*`` function returns a matplotlib :class:`~matplotlib.figure.Figure` made without pyplot,
so drawing needs no display, changes no global backend and leaves nothing open to close; a
notebook shows the figure as it is, and :func:`figure_png` turns it into PNG bytes (and a file).
"""

from __future__ import annotations

import io
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from imgtune.files import atomic_write


def figure_png(fig: Figure, path: str | Path | None = None) -> bytes:
    """The figure as PNG bytes, also written to ``path`` when given.

    Args:
        fig: any matplotlib figure; one made with pyplot is closed afterwards, so it does not stay
            in pyplot's list of open figures.
        path: a file to write the PNG to.

    Returns:
        The PNG bytes.
    """
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    pyplot = sys.modules.get("matplotlib.pyplot")  # not imported: the figure cannot be one of its own
    if pyplot is not None:
        pyplot.close(fig)
    data = buffer.getvalue()
    if path is not None:
        atomic_write(path, data)
    return data


def plot_training(history: Sequence[dict]) -> Figure:
    """Train/valid loss and accuracy per epoch, with the frozen -> unfrozen boundary marked.

    Args:
        history: one dict per epoch with ``train_loss``, ``valid_loss``, ``accuracy`` (a fraction)
            and ``phase``, as in a run's ``metrics.json``.

    Returns:
        A figure with two panels, loss and accuracy.
    """
    x = np.arange(1, len(history) + 1)
    fig = Figure(figsize=(10, 3.8), dpi=100)
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(x, [h["train_loss"] for h in history], "o-", label="train loss")
    ax_loss.plot(x, [h["valid_loss"] for h in history], "o-", label="valid loss")
    ax_acc.plot(x, [100 * h["accuracy"] for h in history], "o-", color="C2", label="valid accuracy")
    boundaries = [i + 0.5 for i in range(1, len(history)) if history[i]["phase"] != history[i - 1]["phase"]]
    for ax in (ax_loss, ax_acc):
        for b in boundaries:
            ax.axvline(b, color="0.4", linestyle=":", label="unfrozen from here")
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        ax.legend()
    ax_loss.set_ylabel("loss")
    ax_acc.set_ylabel("accuracy (%)")
    fig.tight_layout()
    return fig


def plot_confusion_matrix(matrix: np.ndarray, classes: Sequence[str]) -> Figure:
    """The confusion matrix, sized so that 37 class names stay readable.

    Args:
        matrix: ``(C, C)`` counts, row = actual class, column = predicted class.
        classes: the C class names.

    Returns:
        A square figure with the counts written in the non-zero cells.
    """
    n = len(classes)
    side = max(4.5, 0.32 * n + 2.5)
    font = 10 if n <= 12 else 7 if n <= 40 else 5
    fig = Figure(figsize=(side, side), dpi=100)
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    # parse_math=False: a class name is text, and "$" in one would otherwise start matplotlib's math mode
    ax.set_xticks(range(n), classes, rotation=90, fontsize=font, parse_math=False)
    ax.set_yticks(range(n), classes, fontsize=font, parse_math=False)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    top = matrix.max() if matrix.size else 0
    for i in range(n):
        for j in range(n):
            if matrix[i, j]:
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=font,
                        color="white" if matrix[i, j] > top / 2 else "black")
    fig.tight_layout()
    return fig


def plot_top_losses(interp, k: int = 9, *, columns: int = 3) -> Figure:
    """The ``k`` worst validation images, each as the model saw it and with its Grad-CAM overlay.

    Args:
        interp: an :class:`~imgtune.explain.interpret.Interpretation` with image paths and a model.
        k: how many images.
        columns: images per row (each takes two panels).

    Returns:
        A figure whose panels are titled actual / predicted and loss, probability.
    """
    items = interp.top_losses(k)
    rows = max(1, -(-len(items) // columns))
    fig = Figure(figsize=(4 * columns, 2.3 * rows), dpi=100)
    axes = fig.subplots(rows, 2 * columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for n, item in enumerate(items):
        x = interp.input_tensor(interp.paths[item.index])  # decoded once for all three uses
        heatmap = interp.grad_cam(x, interp.classes.index(item.predicted))
        left, right = axes[n // columns, 2 * (n % columns)], axes[n // columns, 2 * (n % columns) + 1]
        left.imshow(interp.model_view(x))
        right.imshow(interp.overlay(x, heatmap))
        left.set_title(f"{item.actual} / {item.predicted}", fontsize=8, parse_math=False)
        right.set_title(f"loss {item.loss:.2f}, p {item.probability:.2f}", fontsize=8)
    fig.suptitle("top losses: actual / predicted (left), Grad-CAM for the prediction (right)", fontsize=9)
    fig.tight_layout()
    return fig


def plot_samples(dataset, classes: Sequence[str], mean, std, *, n: int = 12, seed: int = 0) -> Figure:
    """``n`` training images as the model sees them: augmented, then de-normalised for display.

    Args:
        dataset: gives ``(tensor, label index)`` pairs, the tensors normalised with ``mean`` and ``std``.
        classes: the class names the label indices point into.
        mean: the per-channel mean the tensors were normalised with.
        std: the per-channel standard deviation.
        n: how many images.
        seed: picks the images (the augmentation draws from torch's global generator).

    Returns:
        A figure of up to six images per row, each titled with its class.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    picks = torch.randperm(len(dataset), generator=generator)[:n].tolist()
    columns = min(6, max(1, len(picks)))
    rows = max(1, -(-len(picks) // columns))
    fig = Figure(figsize=(2 * columns, 2.2 * rows), dpi=100)
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, index in zip(axes.flat, picks):
        tensor, label = dataset[index]
        ax.imshow(denormalise(tensor, mean, std))
        ax.set_title(classes[label], fontsize=8, parse_math=False)
    fig.tight_layout()
    return fig


def denormalise(tensor, mean, std) -> np.ndarray:
    """A normalised ``(3, H, W)`` tensor back to an ``(H, W, 3)`` uint8 picture.

    Args:
        tensor: the normalised image.
        mean: the per-channel mean it was normalised with.
        std: the per-channel standard deviation.

    Returns:
        The picture, clipped to [0, 255]. A uint8 tensor (what the loaders give for a GPU, to be
        normalised there) is the picture already.
    """
    import torch

    if tensor.dtype == torch.uint8:
        return tensor.detach().cpu().numpy().transpose(1, 2, 0)
    array = tensor.detach().float().cpu().numpy().transpose(1, 2, 0)
    array = array * np.asarray(std, dtype=np.float32) + np.asarray(mean, dtype=np.float32)
    return (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
