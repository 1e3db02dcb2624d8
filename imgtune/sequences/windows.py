"""Cut a sequence into overlapping windows, measured in events or in seconds."""

from __future__ import annotations

import numpy as np

from imgtune.errors import ImgtuneError

UNITS = ("events", "seconds")
#: Defaults: 256 events is ~4 s of continuous movement at the Balabit sampling rate (~60 Hz), enough
#: for a few strokes; half of each window overlaps the next.
DEFAULT_WINDOW, DEFAULT_OVERLAP = 256, 0.5
#: A window needs this many events to be drawn (a session shorter than one window is drawn whole).
MIN_EVENTS = 16


def parse_window(text: str) -> tuple[float, str]:
    """Read a window length as the command line gives it.

    Returns:
        ``(length, unit)``: ``"256"`` -> (256, "events"); ``"10s"`` -> (10.0, "seconds").

    Raises:
        ImgtuneError: not a number of events or seconds, or not more than 0.
    """
    text = str(text).strip().lower()
    unit = "seconds" if text.endswith("s") else "events"
    try:
        value = float(text.removesuffix("s")) if unit == "seconds" else int(text)
    except ValueError:
        raise ImgtuneError(f"window {text!r}: give a number of events (256) or seconds (10s)") from None
    if value <= 0:
        raise ImgtuneError(f"window {text!r}: must be more than 0")
    return value, unit


def window_bounds(times: np.ndarray, *, window: float = DEFAULT_WINDOW, overlap: float = DEFAULT_OVERLAP,
                  unit: str = "events", min_events: int = MIN_EVENTS) -> list[tuple[int, int]]:
    """Where the windows of a sequence start and end (event indices, end exclusive).

    Windows of ``window`` events (or seconds) start every ``window * (1 - overlap)``; one more
    window ends at the last event, so the tail is never lost. A sequence shorter than one window is
    one window; windows with fewer than ``min_events`` events are left out.

    Args:
        times: the time of each event, in seconds, ascending (only read when ``unit="seconds"``).
        window: the window length, in ``unit``.
        overlap: the fraction of each window shared with the next, ``0 <= overlap < 1``.
        unit: ``"events"`` or ``"seconds"``.
        min_events: the fewest events a window may hold.

    Returns:
        ``[(start, end), ...]`` in order, without duplicates.
    """
    if unit not in UNITS:
        raise ImgtuneError(f"window unit must be one of {', '.join(UNITS)}, not {unit!r}")
    if not window > 0 or not 0 <= overlap < 1:
        raise ImgtuneError(f"need window > 0 and 0 <= overlap < 1, got window {window}, overlap {overlap}")
    n = len(times)
    if unit == "events":
        size = max(1, int(window))
        step = max(1, round(size * (1 - overlap)))
        if n <= size:
            bounds = [(0, n)]
        else:
            bounds = [(s, s + size) for s in range(0, n - size + 1, step)]
            if bounds[-1][1] < n:
                bounds.append((n - size, n))
    else:
        t0, t1 = float(times[0]) if n else 0.0, float(times[-1]) if n else 0.0
        step = window * (1 - overlap)
        starts = [t0 + k * step for k in range(int(max(0.0, t1 - t0 - window) // step) + 1)]
        if starts[-1] + window < t1:
            starts.append(t1 - window)
        lo = np.searchsorted(times, starts, side="left")
        hi = np.searchsorted(times, np.asarray(starts) + window, side="right")
        bounds = list(dict.fromkeys(zip(lo.tolist(), hi.tolist())))
    return [(s, e) for s, e in bounds if e - s >= min_events]
