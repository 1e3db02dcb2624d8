"""Vectorised drawing on a ``(height, width, 3)`` uint8 canvas: line segments, brushes, squares, rings.

Shapes become arrays of integer pixels, painted in one go. :func:`plot_max` composites with
``np.maximum.at``, which does not depend on the order of the writes, so the same input gives the
same bytes on every run.
"""

from __future__ import annotations

import numpy as np

#: Image side in pixels (the ImageNet size).
DEFAULT_SIZE = 224


def segment_pixels(p0: np.ndarray, p1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer pixels along the segments ``p0 -> p1``.

    Args:
        p0, p1: ``(n, 2)`` start and end points, (x, y) in pixels.

    Returns:
        ``(points, segment)``: the pixels ``(k, 2)`` and the index of the segment each belongs to.
    """
    steps = np.ceil(np.abs(p1 - p0).max(axis=1)).astype(int) + 1  # one sample per pixel of the longer axis
    segment = np.repeat(np.arange(len(p0)), steps)
    first = np.repeat(np.cumsum(steps) - steps, steps)
    frac = (np.arange(len(segment)) - first) / np.maximum(steps[segment] - 1, 1)
    points = p0[segment] + (p1[segment] - p0[segment]) * frac[:, None]
    return np.rint(points).astype(int), segment


def brush(points: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Each point widened to a ``width`` x ``width`` square.

    Returns:
        ``(points, source)``: the widened pixels and the index of the point each came from.
    """
    offsets = np.arange(width) - (width - 1) // 2
    dx, dy = np.meshgrid(offsets, offsets)
    shift = np.column_stack([dx.ravel(), dy.ravel()])
    widened = (points[:, None, :] + shift[None, :, :]).reshape(-1, 2)
    return widened, np.repeat(np.arange(len(points)), len(shift))


def plot_max(canvas: np.ndarray, points: np.ndarray, colours: np.ndarray) -> None:
    """Per channel, the maximum of what is there and each point's colour (order-independent).

    Args:
        canvas: painted in place; points outside it are left out.
        points: ``(k, 2)`` integer pixels (x, y).
        colours: ``(k, 3)`` uint8, one colour per point.
    """
    inside = (points >= 0).all(axis=1) & (points[:, 0] < canvas.shape[1]) & (points[:, 1] < canvas.shape[0])
    points, colours = points[inside], colours[inside]
    for channel in range(3):
        np.maximum.at(canvas[:, :, channel], (points[:, 1], points[:, 0]), colours[:, channel])


def plot(canvas: np.ndarray, points: np.ndarray, colour: tuple[int, int, int]) -> None:
    """Paint ``(k, 2)`` integer pixels (x, y) in one colour, over whatever is there (in place)."""
    inside = (points >= 0).all(axis=1) & (points[:, 0] < canvas.shape[1]) & (points[:, 1] < canvas.shape[0])
    canvas[points[inside, 1], points[inside, 0]] = colour


def squares(centres: np.ndarray, half: int) -> np.ndarray:
    """The pixels of filled squares of side ``2 * half + 1`` around integer ``centres`` ``(n, 2)``."""
    return brush(centres, 2 * half + 1)[0]


def rings(centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """The pixels of circles of ``radii`` ``(n,)`` around ``centres`` ``(n, 2)``."""
    if not len(centres):
        return np.zeros((0, 2), int)
    samples = 8 * int(np.ceil(radii.max())) + 8
    angle = np.linspace(0, 2 * np.pi, samples, endpoint=False)
    ring = np.stack([np.cos(angle), np.sin(angle)], axis=1)
    points = centres[:, None, :] + radii[:, None, None] * ring[None, :, :]
    return np.rint(points.reshape(-1, 2)).astype(int)


def log_scale(values: np.ndarray, full: float, unit: float) -> np.ndarray:
    """0..1: ``log(1 + v/unit) / log(1 + full/unit)``, clipped (``full`` gives 1)."""
    return np.clip(np.log1p(values / unit) / np.log1p(full / unit), 0.0, 1.0)
