"""Numeric series drawn as line plots, recurrence plots and Gramian angular fields."""

from __future__ import annotations

import numpy as np
import pytest

from imgtune.errors import ImgtuneError
from imgtune.sequences.series import draw_series_window


def test_series_styles():
    t = np.linspace(0, 4 * np.pi, 200)
    values = np.column_stack([np.sin(t), np.cos(t)])
    line = draw_series_window(values, 64, "line")
    top, bottom = line[:32].any(axis=2), line[32:].any(axis=2)
    assert top.any(axis=0).all() and bottom.any(axis=0).all()  # each column a line across its own band
    recurrence = draw_series_window(values, 64, "recurrence")
    assert recurrence.shape == (64, 64, 3) and (np.diag(recurrence[..., 0]) == 255).all()
    assert np.array_equal(recurrence[..., 0], recurrence[..., 0].T)
    gaf = draw_series_window(values, 64, "gaf")
    assert np.array_equal(gaf[..., 0], gaf[..., 0].T) and (gaf[..., 2] == 0).all()  # two columns: red, green
    with pytest.raises(ImgtuneError, match="at most 3"):
        draw_series_window(np.zeros((10, 4)), 64, "gaf")
