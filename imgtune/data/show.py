"""Pictures as the model sees them: a grid of (augmented) training images titled with their classes.

This is the drawing behind :meth:`imgtune.data.loaders.ImageData.show_batch` and the report's
``samples.png`` (:mod:`imgtune.explain.figures` reuses it), so a notebook and the report show one
picture. Like every imgtune figure it is a matplotlib :class:`~matplotlib.figure.Figure` made without
pyplot: a notebook shows it, ``fig.savefig`` writes it, and nothing stays open to close.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure


def image_grid(count: int, *, columns: int = 6, cell: tuple[float, float] = (2.0, 2.2)) -> tuple[Figure, list]:
    """A figure of ``count`` picture panels, ``columns`` to a row, axes hidden.

    Args:
        count: how many panels are used (at least one row is made when it is 0).
        columns: panels per row at most.
        cell: width and height of one panel in inches.

    Returns:
        ``(figure, axes)``: the axes in reading order, all of the grid's (the unused ones stay blank).
    """
    columns = min(columns, max(1, count))
    rows = max(1, -(-count // columns))
    fig = Figure(figsize=(cell[0] * columns, cell[1] * rows), dpi=100)
    axes = list(fig.subplots(rows, columns, squeeze=False).flat)
    for ax in axes:
        ax.axis("off")
    return fig, axes


def plot_samples(dataset, classes: Sequence[str], mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), *, n: int = 12,
                 seed: int = 0) -> Figure:
    """``n`` images of ``dataset`` as the model sees them: augmented, then de-normalised for display.

    Args:
        dataset: gives ``(tensor, label index)`` pairs, the tensors normalised with ``mean`` and ``std``
            (or uint8 pictures, shown as they are).
        classes: the class names the label indices point into.
        mean: the per-channel mean the tensors were normalised with.
        std: the per-channel standard deviation.
        n: how many images.
        seed: picks the images (the augmentation draws from torch's global generator).

    Returns:
        A figure of up to six images per row, each titled with its class.
    """
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randperm(len(dataset), generator=generator)[:n].tolist()
    fig, axes = image_grid(len(picks))
    for ax, index in zip(axes, picks):
        tensor, label = dataset[index]
        ax.imshow(denormalise(tensor, mean, std))
        # parse_math=False: a class name is text, and "$" in one would otherwise start matplotlib's math mode
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
    if tensor.dtype == torch.uint8:
        return tensor.detach().cpu().numpy().transpose(1, 2, 0)
    array = tensor.detach().float().cpu().numpy().transpose(1, 2, 0)
    array = array * np.asarray(std, dtype=np.float32) + np.asarray(mean, dtype=np.float32)
    return (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
