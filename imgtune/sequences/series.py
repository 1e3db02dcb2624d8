"""Numeric time series: read the columns of a CSV, draw a window as a line plot, recurrence plot or GAF."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from imgtune.errors import ImgtuneError
from imgtune.sequences.canvas import DEFAULT_SIZE, plot, segment_pixels

SERIES_STYLES = ("line", "recurrence", "gaf")
SERIES_COLOURS = ((255, 80, 80), (80, 220, 80), (90, 140, 255), (255, 210, 0), (230, 90, 255), (0, 220, 220))


def read_series(path: str | Path, *, columns: Sequence[str] | None = None,
                time_column: str | None = None) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """Read a CSV of numeric columns (with a header).

    Args:
        columns: the columns to draw (default: every column but ``time_column``).
        time_column: a column of seconds, needed for windows measured in seconds.

    Returns:
        ``(values, times, names)``: values ``(rows, columns)``, times ``(rows,)`` or None, column names.
    """
    path = Path(path)
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as handle:
        reader = csv.reader(handle)
        header = [c.strip() for c in next(reader, [])]
        rows = [row for row in reader if row]
    names = list(columns) if columns else [c for c in header if c != time_column]
    missing = [c for c in [*names, *([time_column] if time_column else [])] if c not in header]
    if missing or not names:
        raise ImgtuneError(f"{path}: no column {missing[0] if missing else 'to draw'!r}; the header has {header}")
    index = [header.index(c) for c in names]
    try:
        table = np.array([[float(row[i]) for i in index] for row in rows], dtype=float).reshape(len(rows), len(names))
        times = np.array([float(row[header.index(time_column)]) for row in rows]) if time_column else None
    except (ValueError, IndexError):
        raise ImgtuneError(f"{path}: columns {names} must hold numbers on every row") from None
    if not np.isfinite(table).all():
        raise ImgtuneError(f"{path}: columns {names} hold NaN or infinite values; fill or drop those rows")
    return table, times, names


def draw_series_window(values: np.ndarray, size: int = DEFAULT_SIZE, style: str = "line") -> np.ndarray:
    """Draw a window of a numeric series ``(rows, columns)`` as a ``(size, size, 3)`` uint8 image.

    Styles:
        ``line``: each column in its own horizontal band (top to bottom in column order), scaled to
        the band by its minimum and maximum within the window.
        ``recurrence``: an unthresholded recurrence plot, grey: bright where the (z-scored) columns
        are close at times i and j, dark where they are far apart.
        ``gaf``: a Gramian angular summation field per column, up to three columns as red, green, blue
        (one column: grey).

    Raises:
        ImgtuneError: an unknown style, or more than three columns for ``gaf``.
    """
    values = np.asarray(values, float)
    if values.ndim == 1:
        values = values[:, None]
    rows, columns = values.shape
    if style not in SERIES_STYLES:
        raise ImgtuneError(f"series style must be one of {', '.join(SERIES_STYLES)}, not {style!r}")
    lo, hi = values.min(axis=0), values.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    unit = np.where(hi > lo, (values - lo) / span, 0.5)  # 0..1 per column
    if style == "line":
        return _line_plot(unit, size)
    grid = np.linspace(0, rows - 1, size)
    resampled = np.column_stack([np.interp(grid, np.arange(rows), unit[:, k]) for k in range(columns)])
    if style == "recurrence":
        return _recurrence_plot(resampled)
    return _angular_field(resampled, size)


def _line_plot(unit: np.ndarray, size: int) -> np.ndarray:
    """Columns of ``unit`` (0..1, ``(rows, columns)``) as lines, each in its own horizontal band."""
    rows, columns = unit.shape
    canvas = np.zeros((size, size, 3), np.uint8)
    band = size / columns
    x = np.linspace(0, size - 1, rows) if rows > 1 else np.full(1, (size - 1) / 2)
    for k in range(columns):
        pad = max(1.0, 0.08 * band)
        y = (k + 1) * band - pad - unit[:, k] * max(band - 1 - 2 * pad, 0.0)
        p = np.column_stack([x, y])
        points, _ = segment_pixels(p[:-1], p[1:]) if rows > 1 else (np.rint(p).astype(int), None)
        plot(canvas, points, SERIES_COLOURS[k % len(SERIES_COLOURS)])
    return canvas


def _recurrence_plot(resampled: np.ndarray) -> np.ndarray:
    """Grey: 255 where the z-scored rows i and j are equal, 0 at the largest distance."""
    z = (resampled - resampled.mean(axis=0)) / np.maximum(resampled.std(axis=0), 1e-12)
    distance = np.sqrt(((z[:, None, :] - z[None, :, :]) ** 2).sum(axis=2))
    grey = 255 * (1 - distance / max(float(distance.max()), 1e-12))
    return np.repeat(np.rint(grey).astype(np.uint8)[:, :, None], 3, axis=2)


def _angular_field(resampled: np.ndarray, size: int) -> np.ndarray:
    """The Gramian angular summation field of each column (0..1) as red, green, blue (one column: grey)."""
    columns = resampled.shape[1]
    if columns > 3:
        raise ImgtuneError(f"the gaf style draws at most 3 columns (as red, green, blue), got {columns}; "
                           "choose them with `columns`")
    phi = np.arccos(np.clip(2 * resampled - 1, -1, 1))
    fields = [np.rint(255 * (np.cos(phi[:, None, k] + phi[None, :, k]) + 1) / 2) for k in range(columns)]
    if columns == 1:
        fields = fields * 3
    fields += [np.zeros((size, size))] * (3 - len(fields))
    return np.stack(fields, axis=2).astype(np.uint8)
