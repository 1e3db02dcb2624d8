"""Mouse sessions: read a Balabit CSV, measure speed and acceleration, draw a window of events.

Mouse sessions are CSVs of ``record timestamp,client timestamp,button,state,x,y`` (the Balabit
Mouse Dynamics Challenge format). A window is drawn as the cursor's path, scaled to fit the image
so that screen size and position do not matter, with

- red: speed (log scale, 0-5000 px/s), green: acceleration magnitude (log scale, 0-50000 px/s^2),
  blue: set on drags (a button held), which are also drawn twice as wide;
- white rings: pauses over 0.5 s where the cursor rested, larger for longer pauses;
- yellow squares: left presses, cyan squares: right presses (other buttons: grey squares);
- magenta bars: scroll events, pointing up or down.

Speeds are measured in screen pixels, before scaling, so a fast user stays red on any screen.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgtune.errors import ImgtuneError
from imgtune.sequences.canvas import (
    DEFAULT_SIZE,
    brush,
    log_scale,
    plot,
    plot_max,
    rings,
    segment_pixels,
    squares,
)

MOUSE_HEADER = ("record timestamp", "client timestamp", "button", "state", "x", "y")
BUTTONS = {"NoButton": 0, "Left": 1, "Right": 2, "Scroll": 3}  # anything else (XButton): 4
STATES = {"Move": 0, "Pressed": 1, "Released": 2, "Drag": 3, "Down": 4, "Up": 5}
#: Remote-desktop clients report 65535 when the cursor leaves the window; such rows are dropped.
INVALID_COORDINATE = 65535
MIN_DT = 0.008  # s; events with equal or backwards timestamps count at least this far apart
SPEED_SPAN = 2  # speed is measured over this many segments on either side (see speed_acceleration)
SPEED_MAX, ACCEL_MAX = 5000.0, 50000.0  # px/s and px/s^2 at full colour (log scale)
PAUSE_SECONDS = 0.5
MIN_EXTENT = 200.0  # screen px: a smaller movement is not blown up to fill the image
MARGIN = 0.06  # of the image side, kept free around the path
LINE_WIDTH = 1 / 112  # of the image side (at least 1 px); drags are twice as wide

LEFT_CLICK, RIGHT_CLICK, OTHER_CLICK = (255, 255, 0), (0, 255, 255), (160, 160, 160)
PAUSE, SCROLL = (255, 255, 255), (255, 0, 255)


@dataclass
class MouseEvents:
    """One session's events: ``t`` seconds, ``xy`` screen pixels, ``button`` and ``state`` codes."""

    t: np.ndarray
    xy: np.ndarray
    button: np.ndarray
    state: np.ndarray

    def __len__(self) -> int:
        return len(self.t)

    def slice(self, start: int, end: int) -> MouseEvents:
        """The events ``start`` to ``end`` (exclusive)."""
        return MouseEvents(self.t[start:end], self.xy[start:end], self.button[start:end], self.state[start:end])


def read_mouse_session(path: str | Path) -> MouseEvents:
    """Read a mouse session CSV; rows with the off-screen coordinate 65535 are dropped.

    Raises:
        ImgtuneError: naming the file and line when the header or a row is not in the expected format.
    """
    path = Path(path)
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as handle:
        rows = csv.reader(handle)
        header = tuple(c.strip().lower() for c in next(rows, []))
        if header != MOUSE_HEADER:
            raise ImgtuneError(f"{path}: not a mouse session; the header must be {','.join(MOUSE_HEADER)}")
        t, x, y, button, state = [], [], [], [], []
        for line, row in enumerate(rows, start=2):
            if not row:
                continue
            try:
                t.append(float(row[1]))
                x.append(float(row[4]))
                y.append(float(row[5]))
                button.append(BUTTONS.get(row[2], 4))
                state.append(STATES[row[3]])
            except (ValueError, IndexError, KeyError):
                raise ImgtuneError(f"{path}:{line}: expected 6 fields (numbers, a button, a state "
                                   f"of {'/'.join(STATES)}), found {','.join(row)!r}") from None
    xy = np.column_stack([x, y]) if x else np.zeros((0, 2))
    keep = (xy < INVALID_COORDINATE).all(axis=1)
    return MouseEvents(np.asarray(t, float)[keep], xy[keep], np.asarray(button, np.int8)[keep],
                       np.asarray(state, np.int8)[keep])


def speed_acceleration(t: np.ndarray, xy: np.ndarray, span: int = SPEED_SPAN) -> tuple[np.ndarray, np.ndarray]:
    """Speed (px/s) and acceleration magnitude (px/s^2) of each segment ``i -> i+1``.

    Both are measured over ``span`` segments on either side: some clients stamp several events with
    the same time (a ~110 ms timer), so the time between two single events is often 0.
    """
    n = len(t)
    path = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(xy, axis=0).T))])
    segments = np.arange(n - 1)
    lo, hi = np.maximum(segments - span, 0), np.minimum(segments + 1 + span, n - 1)
    elapsed = np.maximum(t[hi] - t[lo], MIN_DT * (hi - lo))
    speed = (path[hi] - path[lo]) / elapsed
    mid = (t[lo] + t[hi]) / 2
    before, after = np.maximum(segments - span, 0), np.minimum(segments + span, n - 2)
    elapsed = np.maximum(mid[after] - mid[before], MIN_DT * np.maximum(after - before, 1))
    accel = np.abs(speed[after] - speed[before]) / elapsed
    return speed, accel


def draw_mouse_window(events: MouseEvents, size: int = DEFAULT_SIZE) -> np.ndarray:
    """Draw one window of mouse events as a ``(size, size, 3)`` uint8 image (see the module docstring).

    The path is centred and scaled uniformly so its longer side (at least ``MIN_EXTENT`` screen
    pixels) fills the image less a margin.
    """
    canvas = np.zeros((size, size, 3), np.uint8)
    if not len(events):
        return canvas
    xy, t = events.xy.astype(float), events.t.astype(float)
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    scale = (size - 1) * (1 - 2 * MARGIN) / max(float((hi - lo).max()), MIN_EXTENT)
    pixels = (xy - (lo + hi) / 2) * scale + (size - 1) / 2
    line = max(1, round(size * LINE_WIDTH))

    raw_dt = np.diff(t)
    speed, accel = speed_acceleration(t, xy)
    drag = events.state[1:] == STATES["Drag"]
    colours = np.column_stack([
        64 + 191 * log_scale(speed, SPEED_MAX, 10.0),
        255 * log_scale(accel, ACCEL_MAX, 100.0),
        np.where(drag, 255, 0),
    ]).astype(np.uint8)
    for is_drag, width in ((False, line), (True, 2 * line)):
        chosen = np.flatnonzero(drag == is_drag)
        if len(chosen):
            points, segment = segment_pixels(pixels[chosen], pixels[chosen + 1])
            points, source = brush(points, width)
            plot_max(canvas, points, colours[chosen][segment][source])

    pauses = np.flatnonzero(raw_dt > PAUSE_SECONDS)
    radii = np.minimum(size / 64 * (1 + np.log2(raw_dt[pauses] / PAUSE_SECONDS)), size / 8)
    plot(canvas, rings(pixels[pauses], radii), PAUSE)

    half = max(1, round(size / 75))
    pressed = events.state == STATES["Pressed"]
    for button, colour in ((1, LEFT_CLICK), (2, RIGHT_CLICK), (4, OTHER_CLICK)):
        plot(canvas, squares(np.rint(pixels[pressed & (events.button == button)]).astype(int), half), colour)
    for state, sign in ((STATES["Up"], -1), (STATES["Down"], 1)):
        where = np.rint(pixels[(events.button == BUTTONS["Scroll"]) & (events.state == state)]).astype(int)
        bar = np.column_stack([np.zeros(3 * half + 1, int), sign * np.arange(3 * half + 1)])
        plot(canvas, (where[:, None, :] + bar[None, :, :]).reshape(-1, 2), SCROLL)
    return canvas
