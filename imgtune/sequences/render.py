"""Draw a folder of sequence files as a class-folder dataset of window images with a manifest.

Each session file (one CSV) below ``SOURCE/<label>/`` is cut into overlapping windows (see
:mod:`imgtune.sequences.windows`) and every window is drawn as a square PNG (see
:mod:`imgtune.sequences.mouse` and :mod:`imgtune.sequences.series`), so the usual pipeline (transfer
learning, interpretation, export) applies to it. The output is ``OUT/<label>/...png`` plus
``OUT/manifest.csv`` with one row per image: ``file,label,group,start,end,t_start,t_end``; ``group``
names the session the window came from, so ``imgtune train OUT --csv OUT/manifest.csv`` never puts
windows of one session in both train and valid, and :func:`imgtune.sequences.groups.aggregate_windows`
turns window predictions into one score per session.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from imgtune.errors import ImgtuneError
from imgtune.sequences.canvas import DEFAULT_SIZE
from imgtune.sequences.mouse import draw_mouse_window, read_mouse_session
from imgtune.sequences.series import draw_series_window, read_series
from imgtune.sequences.windows import DEFAULT_OVERLAP, DEFAULT_WINDOW, window_bounds
from imgtune.system import usable_cores

KINDS = ("mouse", "series")
MANIFEST = "manifest.csv"
MANIFEST_COLUMNS = ("file", "label", "group", "start", "end", "t_start", "t_end")


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
        window, overlap, unit: see :func:`~imgtune.sequences.windows.window_bounds` (``"seconds"``
            for series needs ``time_column``).
        style, columns, time_column: for series, see :func:`~imgtune.sequences.series.draw_series_window`
            and :func:`~imgtune.sequences.series.read_series`.
        workers: processes drawing sessions in parallel (default: one per core).

    Returns:
        A :class:`RenderResult`. The images and the manifest are identical on every run.
    """
    started = time.perf_counter()
    if kind not in KINDS:
        raise ImgtuneError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if kind == "series" and unit == "seconds" and not time_column:
        raise ImgtuneError("windows in seconds need a time column for series; pass `time_column` or use events")
    if size < 16:
        raise ImgtuneError(f"image size must be at least 16 pixels, not {size}")
    window_bounds(np.zeros(0), window=window, overlap=overlap, unit=unit)  # check the options before any work
    out = _prepare_out(Path(out), overwrite)
    options = _Options(kind, size, window, overlap, unit, style, tuple(columns) if columns else None, time_column)
    jobs = [(session, out, options) for session in sessions]
    if workers is None:
        workers = usable_cores()
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
            results = list(pool.map(_render_one, jobs, chunksize=max(1, len(jobs) // (8 * workers))))
    else:
        results = [_render_one(job) for job in jobs]
    rows = [row for session_rows in results for row in session_rows]
    manifest = _write_manifest(out / MANIFEST, rows)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row[1]] = counts.get(row[1], 0) + 1
    skipped = [s.group for s, r in zip(sessions, results) if not r]
    return RenderResult(out, manifest, counts, len(sessions) - len(skipped), skipped, time.perf_counter() - started)


@dataclass(frozen=True)
class _Options:
    """What :func:`render_sessions` passes to every worker."""

    kind: str
    size: int
    window: float
    overlap: float
    unit: str
    style: str
    columns: tuple[str, ...] | None
    time_column: str | None


def _prepare_out(out: Path, overwrite: bool) -> Path:
    """Make ``out`` ready: new or empty, or (with ``overwrite``) without the images of an earlier render."""
    if out.exists() and not out.is_dir():
        raise ImgtuneError(f"{out}: exists and is not a folder; choose another output folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ImgtuneError(f"{out}: folder exists and is not empty; choose another or pass `overwrite=True`")
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


def _write_manifest(path: Path, rows: list[list]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(MANIFEST_COLUMNS)
        writer.writerows(rows)
    return path


def _render_one(job: tuple[Session, Path, _Options]) -> list[list]:
    """Draw one session's windows; returns its manifest rows (no rows: too short to draw)."""
    session, out, options = job
    times, draw = _read_session(session, options)
    bounds = window_bounds(times, window=options.window, overlap=options.overlap, unit=options.unit)
    if not bounds:
        return []
    folder = out / session.label
    folder.mkdir(parents=True, exist_ok=True)
    stem = "__".join(Path(session.group).parts[1:]) or Path(session.group).name
    digits = max(6, len(str(len(times))))
    rows = []
    for start, end in bounds:
        name = f"{stem}_{start:0{digits}d}.png"
        Image.fromarray(draw(start, end)).save(folder / name)
        rows.append([f"{session.label}/{name}", session.label, session.group, start, end,
                     f"{times[start]:.3f}", f"{times[end - 1]:.3f}"])
    return rows


def _read_session(session: Session, options: _Options) -> tuple[np.ndarray, Callable[[int, int], np.ndarray]]:
    """A session's event times (seconds, or row numbers for a series without a time column) and
    ``draw(start, end)``, which draws the events ``start`` to ``end`` as an image."""
    try:
        if options.kind == "mouse":
            events = read_mouse_session(session.path)
            return events.t, lambda start, end: draw_mouse_window(events.slice(start, end), options.size)
        values, times, _ = read_series(session.path, columns=options.columns, time_column=options.time_column)
    except csv.Error as error:
        raise ImgtuneError(f"{session.path}: not a CSV file ({error})") from None
    if times is None:
        times = np.arange(len(values), dtype=float)
    return times, lambda start, end: draw_series_window(values[start:end], options.size, options.style)
