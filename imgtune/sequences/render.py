"""Draw what is not a photo: mouse-movement sessions and numeric time series become images.

Each session file (one CSV) is cut into overlapping windows and every window is drawn as a square
PNG, so the usual pipeline (transfer learning, interpretation, export) applies to it. The output is
a class-folder dataset (``OUT/<label>/...png``) plus ``OUT/manifest.csv`` with one row per image:
``file,label,group,start,end,t_start,t_end``; ``group`` names the session the window came from, so
``imgtune train OUT --csv OUT/manifest.csv`` never puts windows of one session in both train and
valid, and :func:`aggregate_windows` turns window predictions into one score per session.

Mouse sessions are CSVs of ``record timestamp,client timestamp,button,state,x,y`` (the Balabit
Mouse Dynamics Challenge format). A window is drawn as the cursor's path, scaled to fit the image
so that screen size and position do not matter, with

- red: speed (log scale, 0-5000 px/s), green: acceleration magnitude (log scale, 0-50000 px/s^2),
  blue: set on drags (a button held), which are also drawn twice as wide;
- white rings: pauses over 0.5 s where the cursor rested, larger for longer pauses;
- yellow squares: left presses, cyan squares: right presses (other buttons: grey squares);
- magenta bars: scroll events, pointing up or down.

Speeds are measured in screen pixels, before scaling, so a fast user stays red on any screen.

Drawing is vectorised (segments become sampled pixels, composited with ``np.maximum.at``, which
does not depend on the order of the writes), so the same input gives the same bytes on every run.
"""

from __future__ import annotations

import csv
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from imgtune.errors import ImgtuneError
from imgtune.system import usable_cores

KINDS = ("mouse", "series")
SERIES_STYLES = ("line", "recurrence", "gaf")
UNITS = ("events", "seconds")
MANIFEST = "manifest.csv"
MANIFEST_COLUMNS = ("file", "label", "group", "start", "end", "t_start", "t_end")

#: Defaults: 256 events is ~4 s of continuous movement at the Balabit sampling rate (~60 Hz), enough
#: for a few strokes; half of each window overlaps the next.
DEFAULT_WINDOW, DEFAULT_OVERLAP, DEFAULT_SIZE = 256, 0.5, 224
#: A window needs this many events to be drawn (a session shorter than one window is drawn whole).
MIN_EVENTS = 16

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
SERIES_COLOURS = ((255, 80, 80), (80, 220, 80), (90, 140, 255), (255, 210, 0), (230, 90, 255), (0, 220, 220))


# --- reading ----------------------------------------------------------------------------------


@dataclass
class MouseEvents:
    """One session's events: ``t`` seconds, ``xy`` screen pixels, ``button`` and ``state`` codes."""

    t: np.ndarray
    xy: np.ndarray
    button: np.ndarray
    state: np.ndarray

    def __len__(self) -> int:
        return len(self.t)

    def slice(self, start: int, end: int) -> "MouseEvents":
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


# --- windows ----------------------------------------------------------------------------------


def parse_window(text: str) -> tuple[float, str]:
    """``"256"`` -> (256, "events"); ``"10s"`` -> (10.0, "seconds")."""
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
    """
    if unit not in UNITS:
        raise ImgtuneError(f"window unit must be one of {', '.join(UNITS)}, not {unit!r}")
    if not window > 0 or not 0 <= overlap < 1:
        raise ImgtuneError(f"need window > 0 and 0 <= overlap < 1, got window {window}, overlap {overlap}")
    n = len(times)
    if unit == "events":
        size = max(1, int(window))
        step = max(1, int(round(size * (1 - overlap))))
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


# --- drawing primitives -----------------------------------------------------------------------


def _segment_pixels(p0: np.ndarray, p1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer pixels ``(k, 2)`` (x, y) along segments ``p0 -> p1`` and the segment of each pixel."""
    steps = np.ceil(np.abs(p1 - p0).max(axis=1)).astype(int) + 1  # one sample per pixel of the longer axis
    segment = np.repeat(np.arange(len(p0)), steps)
    first = np.repeat(np.cumsum(steps) - steps, steps)
    frac = (np.arange(len(segment)) - first) / np.maximum(steps[segment] - 1, 1)
    points = p0[segment] + (p1[segment] - p0[segment]) * frac[:, None]
    return np.rint(points).astype(int), segment


def _brush(points: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Each point widened to a ``width`` x ``width`` square; returns the points and their source index."""
    offsets = np.arange(width) - (width - 1) // 2
    dx, dy = np.meshgrid(offsets, offsets)
    shift = np.column_stack([dx.ravel(), dy.ravel()])
    widened = (points[:, None, :] + shift[None, :, :]).reshape(-1, 2)
    return widened, np.repeat(np.arange(len(points)), len(shift))


def _plot_max(canvas: np.ndarray, points: np.ndarray, colours: np.ndarray) -> None:
    """Per channel, the maximum of what is there and each point's colour (order-independent)."""
    inside = (points >= 0).all(axis=1) & (points[:, 0] < canvas.shape[1]) & (points[:, 1] < canvas.shape[0])
    points, colours = points[inside], colours[inside]
    for channel in range(3):
        np.maximum.at(canvas[:, :, channel], (points[:, 1], points[:, 0]), colours[:, channel])


def _plot(canvas: np.ndarray, points: np.ndarray, colour: tuple[int, int, int]) -> None:
    """Paint points in one colour, over whatever is there."""
    inside = (points >= 0).all(axis=1) & (points[:, 0] < canvas.shape[1]) & (points[:, 1] < canvas.shape[0])
    canvas[points[inside, 1], points[inside, 0]] = colour


def _squares(centres: np.ndarray, half: int) -> np.ndarray:
    return _brush(centres, 2 * half + 1)[0]


def _rings(centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    if not len(centres):
        return np.zeros((0, 2), int)
    samples = 8 * int(np.ceil(radii.max())) + 8
    angle = np.linspace(0, 2 * np.pi, samples, endpoint=False)
    ring = np.stack([np.cos(angle), np.sin(angle)], axis=1)
    points = centres[:, None, :] + radii[:, None, None] * ring[None, :, :]
    return np.rint(points.reshape(-1, 2)).astype(int)


def _log_scale(values: np.ndarray, full: float, unit: float) -> np.ndarray:
    """0..1: ``log(1 + v/unit) / log(1 + full/unit)``, clipped."""
    return np.clip(np.log1p(values / unit) / np.log1p(full / unit), 0.0, 1.0)


# --- mouse windows ----------------------------------------------------------------------------


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
        64 + 191 * _log_scale(speed, SPEED_MAX, 10.0),
        255 * _log_scale(accel, ACCEL_MAX, 100.0),
        np.where(drag, 255, 0),
    ]).astype(np.uint8)
    for is_drag, width in ((False, line), (True, 2 * line)):
        chosen = np.flatnonzero(drag == is_drag)
        if len(chosen):
            points, segment = _segment_pixels(pixels[chosen], pixels[chosen + 1])
            points, source = _brush(points, width)
            _plot_max(canvas, points, colours[chosen][segment][source])

    pauses = np.flatnonzero(raw_dt > PAUSE_SECONDS)
    radii = np.minimum(size / 64 * (1 + np.log2(raw_dt[pauses] / PAUSE_SECONDS)), size / 8)
    _plot(canvas, _rings(pixels[pauses], radii), PAUSE)

    half = max(1, round(size / 75))
    pressed = events.state == STATES["Pressed"]
    for button, colour in ((1, LEFT_CLICK), (2, RIGHT_CLICK), (4, OTHER_CLICK)):
        _plot(canvas, _squares(np.rint(pixels[pressed & (events.button == button)]).astype(int), half), colour)
    for state, sign in ((STATES["Up"], -1), (STATES["Down"], 1)):
        where = np.rint(pixels[(events.button == BUTTONS["Scroll"]) & (events.state == state)]).astype(int)
        bar = np.column_stack([np.zeros(3 * half + 1, int), sign * np.arange(3 * half + 1)])
        _plot(canvas, (where[:, None, :] + bar[None, :, :]).reshape(-1, 2), SCROLL)
    return canvas


# --- numeric series ---------------------------------------------------------------------------


def draw_series_window(values: np.ndarray, size: int = DEFAULT_SIZE, style: str = "line") -> np.ndarray:
    """Draw a window of a numeric series ``(rows, columns)`` as a ``(size, size, 3)`` uint8 image.

    Styles:
        ``line``: each column in its own horizontal band (top to bottom in column order), scaled to
        the band by its minimum and maximum within the window.
        ``recurrence``: an unthresholded recurrence plot, grey: bright where the (z-scored) columns
        are close at times i and j, dark where they are far apart.
        ``gaf``: a Gramian angular summation field per column, up to three columns as red, green, blue
        (one column: grey).
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
        canvas = np.zeros((size, size, 3), np.uint8)
        band = size / columns
        x = np.linspace(0, size - 1, rows) if rows > 1 else np.full(1, (size - 1) / 2)
        for k in range(columns):
            pad = max(1.0, 0.08 * band)
            y = (k + 1) * band - pad - unit[:, k] * max(band - 1 - 2 * pad, 0.0)
            p = np.column_stack([x, y])
            points, _ = _segment_pixels(p[:-1], p[1:]) if rows > 1 else (np.rint(p).astype(int), None)
            _plot(canvas, points, SERIES_COLOURS[k % len(SERIES_COLOURS)])
        return canvas
    grid = np.linspace(0, rows - 1, size)
    resampled = np.column_stack([np.interp(grid, np.arange(rows), unit[:, k]) for k in range(columns)])
    if style == "recurrence":
        z = (resampled - resampled.mean(axis=0)) / np.maximum(resampled.std(axis=0), 1e-12)
        distance = np.sqrt(((z[:, None, :] - z[None, :, :]) ** 2).sum(axis=2))
        grey = 255 * (1 - distance / max(float(distance.max()), 1e-12))
        return np.repeat(np.rint(grey).astype(np.uint8)[:, :, None], 3, axis=2)
    if columns > 3:
        raise ImgtuneError(f"the gaf style draws at most 3 columns (as red, green, blue), got {columns}; "
                           "choose them with --columns")
    phi = np.arccos(np.clip(2 * resampled - 1, -1, 1))
    fields = [np.rint(255 * (np.cos(phi[:, None, k] + phi[None, :, k]) + 1) / 2) for k in range(columns)]
    if columns == 1:
        fields = fields * 3
    fields += [np.zeros((size, size))] * (3 - len(fields))
    return np.stack(fields, axis=2).astype(np.uint8)


# --- sessions to a dataset --------------------------------------------------------------------


@dataclass(frozen=True)
class Session:
    """One sequence file: its label and its group id (the path below the source folder)."""

    path: Path
    label: str
    group: str


@dataclass
class RenderResult:
    """What :func:`render_sessions` wrote: the folder, the manifest, images per label, sessions skipped."""

    out: Path
    manifest: Path
    counts: dict[str, int]
    sessions: int
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images(self) -> int:
        return sum(self.counts.values())


def find_sessions(root: str | Path) -> list[Session]:
    """Every file below ``root/<label>/`` (recursively, sorted) as a session of that label."""
    root = Path(root)
    if not root.is_dir():
        raise ImgtuneError(f"{root}: no such folder; pass a folder with one subfolder of session files per label")
    sessions = []
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in sorted(label_dir.rglob("*")):
            if path.is_file() and not any(part.startswith(".") for part in path.relative_to(root).parts):
                sessions.append(Session(path, label_dir.name, path.relative_to(root).as_posix()))
    if not sessions:
        loose = any(p.is_file() for p in root.iterdir())
        hint = ("move them into one subfolder per label" if loose
                else "put the session files of each label in a subfolder named after it")
        raise ImgtuneError(f"{root}: no session files in label subfolders; {hint}")
    return sessions


def render_sessions(
    sessions: Sequence[Session],
    out: str | Path,
    *,
    kind: str = "mouse",
    size: int = DEFAULT_SIZE,
    window: float = DEFAULT_WINDOW,
    overlap: float = DEFAULT_OVERLAP,
    unit: str = "events",
    style: str = "line",
    columns: Sequence[str] | None = None,
    time_column: str | None = None,
    workers: int | None = None,
    overwrite: bool = False,
) -> RenderResult:
    """Draw every window of every session into ``out/<label>/`` and write ``out/manifest.csv``.

    Args:
        sessions: the files to draw (see :func:`find_sessions`).
        out: the output folder; it must be new or empty unless ``overwrite`` (which first removes
            the images an earlier manifest in it lists, and nothing else).
        kind: ``"mouse"`` (mouse session CSVs) or ``"series"`` (numeric CSV columns).
        size: image side in pixels.
        window, overlap, unit: see :func:`window_bounds` (``"seconds"`` for series needs ``time_column``).
        style, columns, time_column: for series, see :func:`draw_series_window` and :func:`read_series`.
        workers: processes drawing sessions in parallel (default: one per core).

    Returns:
        A :class:`RenderResult`. The images and the manifest are identical on every run.
    """
    started = time.perf_counter()
    if kind not in KINDS:
        raise ImgtuneError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if kind == "series" and unit == "seconds" and not time_column:
        raise ImgtuneError("windows in seconds need a time column for series; pass --time-col or use events")
    if size < 16:
        raise ImgtuneError(f"image size must be at least 16 pixels, not {size}")
    window_bounds(np.zeros(0), window=window, overlap=overlap, unit=unit)  # check the options before any work
    out = _prepare_out(Path(out), overwrite)
    options = dict(kind=kind, size=size, window=window, overlap=overlap, unit=unit, style=style,
                   columns=tuple(columns) if columns else None, time_column=time_column)
    jobs = [(session, out, options) for session in sessions]
    if workers is None:
        workers = usable_cores()
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
            results = list(pool.map(_render_one, jobs, chunksize=max(1, len(jobs) // (8 * workers))))
    else:
        results = [_render_one(job) for job in jobs]
    rows = [row for session_rows in results for row in session_rows]
    manifest = out / MANIFEST
    with open(manifest, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(MANIFEST_COLUMNS)
        writer.writerows(rows)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row[1]] = counts.get(row[1], 0) + 1
    skipped = [s.group for s, r in zip(sessions, results) if not r]
    return RenderResult(out, manifest, counts, len(sessions) - len(skipped), skipped, time.perf_counter() - started)


def _prepare_out(out: Path, overwrite: bool) -> Path:
    if out.exists() and not out.is_dir():
        raise ImgtuneError(f"{out}: exists and is not a folder; choose another output folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ImgtuneError(f"{out}: folder exists and is not empty; choose another or pass --overwrite")
        old = out / MANIFEST
        if old.is_file():  # remove only what an earlier render wrote, so no stale window is trained on
            with open(old, newline="", encoding="utf-8") as handle:
                listed = [row["file"] for row in csv.DictReader(handle) if row.get("file")]
            inside = out.resolve()
            for name in listed:
                path = (out / name).resolve()
                if path.suffix == ".png" and inside in path.parents:
                    path.unlink(missing_ok=True)
            old.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def _render_one(job: tuple[Session, Path, dict]) -> list[list]:
    """Draw one session's windows; returns its manifest rows (no rows: too short to draw)."""
    session, out, o = job
    try:
        if o["kind"] == "mouse":
            events = read_mouse_session(session.path)
            times = events.t
        else:
            values, series_times, _ = read_series(session.path, columns=o["columns"], time_column=o["time_column"])
            times = series_times if series_times is not None else np.arange(len(values), dtype=float)
    except csv.Error as error:
        raise ImgtuneError(f"{session.path}: not a CSV file ({error})") from None
    bounds = window_bounds(times, window=o["window"], overlap=o["overlap"], unit=o["unit"])
    if not bounds:
        return []
    folder = out / session.label
    folder.mkdir(parents=True, exist_ok=True)
    stem = "__".join(Path(session.group).parts[1:]) or Path(session.group).name
    digits = max(6, len(str(len(times))))
    rows = []
    for start, end in bounds:
        if o["kind"] == "mouse":
            pixels = draw_mouse_window(events.slice(start, end), o["size"])
        else:
            pixels = draw_series_window(values[start:end], o["size"], o["style"])
        name = f"{stem}_{start:0{digits}d}.png"
        Image.fromarray(pixels).save(folder / name)
        rows.append([f"{session.label}/{name}", session.label, session.group, start, end,
                     f"{times[start]:.3f}", f"{times[end - 1]:.3f}"])
    return rows


# --- windows back to sessions -----------------------------------------------------------------


@dataclass
class GroupScores:
    """Session-level predictions: ``log_probs[g, c]`` is the mean over group g's windows of
    log p(class c | window); ``counts[g]`` is its number of windows."""

    groups: list[str]
    classes: list[str]
    log_probs: np.ndarray
    counts: np.ndarray

    @property
    def probs(self) -> np.ndarray:
        """The normalised geometric mean of the window probabilities (softmax of ``log_probs``)."""
        shifted = self.log_probs - self.log_probs.max(axis=1, keepdims=True)
        weights = np.exp(shifted)
        return weights / weights.sum(axis=1, keepdims=True)

    def prob_of(self, labels: Sequence[str]) -> np.ndarray:
        """Each group's probability of the class named in ``labels`` (one label per group)."""
        index = {c: i for i, c in enumerate(self.classes)}
        unknown = sorted(set(labels) - set(index))
        if unknown:
            raise ImgtuneError(f"label {unknown[0]!r} is not one of the model's classes {self.classes}")
        return self.probs[np.arange(len(self.groups)), [index[label] for label in labels]]


def aggregate_windows(probs: np.ndarray, groups: Sequence[str], classes: Sequence[str], *,
                      eps: float = 1e-7) -> GroupScores:
    """Combine window predictions into one prediction per group (session): the mean log-probability.

    Args:
        probs: ``(windows, classes)`` probabilities.
        groups: the group id of each window.
        classes: the class names, in column order.
        eps: probabilities are clipped to at least this before the log, so one confident wrong
            window cannot make a session's score infinite.

    Returns:
        A :class:`GroupScores`, groups in order of first appearance.
    """
    probs = np.asarray(probs, float)
    if probs.ndim != 2 or len(probs) != len(groups) or probs.shape[1] != len(classes):
        raise ImgtuneError(f"need one group per window and one column per class; got probabilities {probs.shape},"
                           f" {len(groups)} groups, {len(classes)} classes")
    names = list(dict.fromkeys(groups))
    index = {g: i for i, g in enumerate(names)}
    rows = np.array([index[g] for g in groups], dtype=int)
    sums = np.zeros((len(names), probs.shape[1]))
    np.add.at(sums, rows, np.log(np.clip(probs, eps, 1.0)))
    counts = np.bincount(rows, minlength=len(names))
    return GroupScores(names, list(classes), sums / counts[:, None], counts)


def read_manifest(path: str | Path) -> dict[Path, str]:
    """A manifest's images (resolved paths) and the group of each."""
    path = Path(path)
    if not path.is_file():
        raise ImgtuneError(f"{path}: manifest not found; pass the manifest.csv that `imgtune render` wrote")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if not {"file", "group"} <= set(reader.fieldnames or []):
            raise ImgtuneError(f"{path}: needs columns file and group (as `imgtune render` writes);"
                               f" found {reader.fieldnames}")
        return {(path.parent / row["file"]).resolve(): row["group"] for row in reader}


def predict_groups(predictor, files: Sequence[str | Path], groups: Sequence[str], *, bs: int = 32
                   ) -> tuple[GroupScores, list[tuple[Path, str]]]:
    """Predict every window file with ``predictor`` (see :func:`imgtune.deploy.predict.load_predictor`) and
    aggregate by group. Returns the scores and the ``(file, error)`` pairs of unreadable files."""
    probs, kept, errors = [], [], []
    for (path, prediction, error), group in zip(predictor.predict_files(list(files), bs=bs), groups):
        if error is not None:
            errors.append((path, error))
            continue
        probs.append(prediction.probs[0])
        kept.append(group)
    if not probs:
        raise ImgtuneError(f"none of the {len(files)} images could be read")
    return aggregate_windows(np.stack(probs), kept, predictor.classes), errors
