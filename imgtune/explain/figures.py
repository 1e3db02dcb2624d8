"""The figures of a run: training curves, confusion matrix, top losses with Grad-CAM, results, training samples.

Each ``plot_*`` function returns a matplotlib :class:`~matplotlib.figure.Figure` made without pyplot,
so drawing needs no display, changes no global backend and leaves nothing open to close; a
notebook shows the figure as it is, and :func:`figure_png` turns it into PNG bytes (and a file).
The notebook methods (``Learner.plot_losses``, ``Learner.show_results``,
``Interpretation.plot_confusion_matrix``, ``plot_top_losses``, ``plot_cam``) and the run report
(:mod:`imgtune.explain.report`) call these same functions; the training samples are drawn by
:mod:`imgtune.data.show` (``ImageData.show_batch``), which the data stage can use.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from imgtune.data.show import denormalise, image_grid, plot_samples
from imgtune.errors import ImgtuneError
from imgtune.files import atomic_write
from imgtune.models import gradcam_layer

__all__ = ["denormalise", "figure_png", "plot_cam", "plot_confusion_matrix", "plot_results", "plot_samples",
           "plot_top_losses", "plot_training"]


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
    if not history:
        raise ImgtuneError("no epoch trained yet: nothing to plot; train first (fine_tune or fit_one_cycle)")
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
    ax_loss.set(ylabel="loss", title="loss")
    ax_acc.set(ylabel="accuracy (%)", title="validation accuracy")
    fig.tight_layout()
    return fig


def plot_confusion_matrix(matrix: np.ndarray, classes: Sequence[str], *, normalize: bool = False) -> Figure:
    """The confusion matrix, sized so that 37 class names stay readable.

    Args:
        matrix: ``(C, C)`` counts, row = actual class, column = predicted class.
        classes: the C class names.
        normalize: show each row as fractions of its actual class (a row without items stays 0),
            so that classes of different sizes compare; the colours follow the same values.

    Returns:
        A square figure with the counts (or fractions, two decimals) written in the non-zero cells.
    """
    n = len(classes)
    values = np.asarray(matrix, dtype=np.float64 if normalize else np.int64)
    if normalize:
        totals = values.sum(1, keepdims=True)
        values = np.divide(values, totals, out=np.zeros_like(values), where=totals > 0)
    side = max(4.5, 0.32 * n + 2.5)
    font = 10 if n <= 12 else 7 if n <= 40 else 5
    fig = Figure(figsize=(side, side), dpi=100)
    ax = fig.subplots()
    ax.imshow(values, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    # parse_math=False: a class name is text, and "$" in one would otherwise start matplotlib's math mode
    ax.set_xticks(range(n), classes, rotation=90, fontsize=font, parse_math=False)
    ax.set_yticks(range(n), classes, fontsize=font, parse_math=False)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title("confusion matrix" + (" (fraction of each actual class)" if normalize else ""), fontsize=font + 1)
    top = values.max() if values.size else 0
    for i in range(n):
        for j in range(n):
            if values[i, j]:
                ax.text(j, i, f"{values[i, j]:.2f}" if normalize else str(values[i, j]), ha="center", va="center",
                        fontsize=font, color="white" if values[i, j] > top / 2 else "black")
    fig.tight_layout()
    return fig


def can_cam(interp) -> bool:
    """Whether Grad-CAM can be drawn for ``interp``: it has a model with a known Grad-CAM layer."""
    if interp.model is None:
        return False
    try:
        gradcam_layer(interp.model, interp.arch)
    except (ImgtuneError, AttributeError):  # AttributeError: a registry layer name the model lacks
        return False
    return True


def plot_top_losses(interp, k: int = 9, *, columns: int = 3, cam: bool = True) -> Figure:
    """The ``k`` worst validation images as the model saw them, each with its Grad-CAM overlay.

    Args:
        interp: an :class:`~imgtune.explain.interpret.Interpretation` with image paths and a transform.
        k: how many images.
        columns: images per row.
        cam: draw the Grad-CAM of the prediction beside each image, when the model allows it
            (:func:`can_cam`); otherwise one panel per image.

    Returns:
        A figure whose panels are titled actual / predicted, and loss, probability.

    Raises:
        ImgtuneError: the interpretation has no image paths.
    """
    if not interp.paths:
        raise ImgtuneError("this Interpretation has no image paths to draw; build it with from_learner or from_run")
    cam = cam and can_cam(interp)
    items = interp.top_losses(k)
    per_image = 2 if cam else 1
    fig, axes = image_grid(per_image * len(items), columns=per_image * columns, cell=(2.0, 2.3))
    for n, item in enumerate(items):
        x = interp.input_tensor(interp.paths[item.index])  # decoded once for all its uses
        left = axes[per_image * n]
        left.imshow(interp.model_view(x))
        left.set_title(f"{item.actual} / {item.predicted}\nloss {item.loss:.2f}, p {item.probability:.2f}",
                       fontsize=8, parse_math=False)
        if cam:
            heatmap = interp.grad_cam(x, interp.classes.index(item.predicted))
            axes[per_image * n + 1].imshow(interp.overlay(x, heatmap))
            axes[per_image * n + 1].set_title("Grad-CAM", fontsize=8)
    what = ", Grad-CAM of the prediction beside each" if cam else ""
    fig.suptitle(f"top losses: actual / predicted{what}", fontsize=9)
    fig.tight_layout()
    return fig


def plot_results(interp, n: int = 9, *, columns: int = 3, seed: int = 0) -> Figure:
    """``n`` validation images (picked with ``seed``) titled predicted / actual; the wrong ones in red.

    Args:
        interp: an :class:`~imgtune.explain.interpret.Interpretation` with image paths and a transform.
        n: how many images.
        columns: images per row.
        seed: picks the images.

    Returns:
        A figure of ``n`` panels (fewer when the validation set is smaller); a wrong prediction's
        title is red and its panel framed in red.
    """
    if not interp.paths:
        raise ImgtuneError("this Interpretation has no image paths to draw; build it with from_learner or from_run")
    picks = np.random.default_rng(seed).permutation(len(interp.paths))[:n]
    preds = interp.preds
    fig, axes = image_grid(len(picks), columns=columns, cell=(2.2, 2.4))
    for ax, i in zip(axes, picks):
        right = preds[i] == interp.targets[i]
        ax.imshow(interp.model_view(interp.paths[i]))
        colour = "black" if right else "red"
        ax.set_title(f"{interp.classes[preds[i]]} / {interp.classes[interp.targets[i]]}", fontsize=8,
                     color=colour, parse_math=False)
        if not right:
            ax.axis("on")
            ax.set(xticks=[], yticks=[])
            for spine in ax.spines.values():
                spine.set(color="red", linewidth=3)
    fig.suptitle("predicted / actual (wrong ones in red)", fontsize=9)
    fig.tight_layout()
    return fig


def plot_cam(interp, image, class_index: int | None = None) -> Figure:
    """One picture as the model sees it and its Grad-CAM heatmap drawn over it.

    Args:
        interp: an :class:`~imgtune.explain.interpret.Interpretation` with a model.
        image: a path, a PIL image, an array or a transformed tensor (see ``Interpretation.grad_cam``).
        class_index: the class whose evidence is shown (default: the predicted class).

    Returns:
        A figure of two panels: the picture titled with the prediction and its probability, and
        the overlay titled with the class explained.
    """
    x = interp.input_tensor(image)
    probs = interp.probabilities(x)
    predicted = int(probs.argmax())
    explained = predicted if class_index is None else int(class_index)
    heatmap = interp.grad_cam(x, explained)
    fig, (left, right) = image_grid(2, columns=2, cell=(3.2, 3.4))
    left.imshow(interp.model_view(x))
    left.set_title(f"predicted {interp.classes[predicted]} ({probs[predicted]:.2f})", fontsize=9, parse_math=False)
    right.imshow(interp.overlay(x, heatmap))
    right.set_title(f"Grad-CAM for {interp.classes[explained]} ({probs[explained]:.2f})", fontsize=9,
                    parse_math=False)
    fig.tight_layout()
    return fig
