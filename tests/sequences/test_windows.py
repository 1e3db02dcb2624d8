"""Windows of a sequence: by events or seconds, with overlap, the tail kept, options checked."""

from __future__ import annotations

import numpy as np
import pytest

from imgtune.errors import ImgtuneError
from imgtune.sequences.windows import parse_window, window_bounds


def test_window_bounds_by_events_overlap_and_tail():
    assert window_bounds(np.arange(10.0), window=4, overlap=0.5, min_events=1) == [(0, 4), (2, 6), (4, 8), (6, 10)]
    # the last window is aligned to the end so no event is lost
    assert window_bounds(np.arange(11.0), window=4, overlap=0.5, min_events=1)[-1] == (7, 11)
    assert window_bounds(np.arange(3.0), window=4, min_events=1) == [(0, 3)]  # shorter than one window: whole
    assert window_bounds(np.arange(3.0), window=4, min_events=5) == []  # too short to draw
    assert window_bounds(np.arange(8.0), window=4, overlap=0.0, min_events=1) == [(0, 4), (4, 8)]


def test_window_bounds_by_seconds():
    times = np.arange(0, 10.01, 0.5)  # 21 events over 10 s
    bounds = window_bounds(times, window=4.0, overlap=0.5, unit="seconds", min_events=1)
    assert bounds[0] == (0, 9)  # events at 0.0..4.0 s
    assert bounds[1] == (4, 13)  # starts at 2 s
    assert bounds[-1][1] == 21
    assert all(times[e - 1] - times[s] <= 4.0 for s, e in bounds)


def test_window_options_are_checked():
    assert parse_window("256") == (256, "events") and parse_window("2.5s") == (2.5, "seconds")
    for bad in ("abc", "0", "-3s"):
        with pytest.raises(ImgtuneError, match="window"):
            parse_window(bad)
    with pytest.raises(ImgtuneError, match="overlap"):
        window_bounds(np.arange(5.0), window=4, overlap=1.0)
