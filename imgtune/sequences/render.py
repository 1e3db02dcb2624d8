"""Draw a folder of sequence files as a class-folder dataset of window images with a manifest.

Each session file (one CSV) below ``SOURCE/<label>/`` is cut into overlapping windows (see
:mod:`imgtune.sequences.windows`) and every window is drawn as a square PNG (see
:mod:`imgtune.sequences.mouse` and :mod:`imgtune.sequences.series`), so the usual pipeline (transfer
learning, interpretation, export) applies to it. The output is ``OUT/<label>/...png`` plus
``OUT/manifest.csv`` with one row per image: ``file,label,group,start,end,t_start,t_end``; ``group``
names the session the window came from, so ``imgtune train OUT --csv OUT/manifest.csv`` never puts
windows of one session in both train and valid, and :func:`imgtune.sequences.groups.aggregate_windows`
turns window predictions into one score per session.

Beside the manifest, ``OUT/.imgtune-render`` records what the render wrote (each image with its
sha256, and the manifest's). ``overwrite`` deletes only the images that record lists whose bytes are
unchanged, never follows a symbolic link, and refuses a folder whose ``manifest.csv`` imgtune did not
write (a manifest from before the record existed counts as imgtune's when its header and every row
have exactly the shape a render writes). The images are drawn in ``OUT/.imgtune-render.partial/`` and
moved into place at the end, so a render that fails, or would replace a file imgtune did not draw,
stops before touching anything, and an interrupted one leaves no image that no record lists.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from imgtune import __version__
from imgtune.errors import ImgtuneError
from imgtune.files import atomic_write
from imgtune.sequences.canvas import DEFAULT_SIZE
from imgtune.sequences.mouse import draw_mouse_window, read_mouse_session
from imgtune.sequences.series import draw_series_window, read_series
from imgtune.sequences.windows import DEFAULT_OVERLAP, DEFAULT_WINDOW, window_bounds
from imgtune.system import usable_cores

KINDS = ("mouse", "series")
MANIFEST = "manifest.csv"
MANIFEST_COLUMNS = ("file", "label", "group", "start", "end", "t_start", "t_end")
#: The record of what a render wrote (JSON: the manifest's sha256, every image and its sha256):
#: ``overwrite`` deletes only the images it lists, and only while their bytes are unchanged.
RECORD = ".imgtune-render"
#: Where a render draws its images before they replace the earlier render's (removed when it ends).
STAGING = ".imgtune-render.partial"


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
    """Every file below ``root/<label>/`` (recursively, sorted) as a session of that label.

    Args:
        root: a folder with one subfolder of session files per label (hidden files are skipped).

    Returns:
        The sessions, by label then path.

    Raises:
        ImgtuneError: ``root`` is not a folder, or has no session files in label subfolders.
    """
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
        out: the output folder; it must be new or empty unless ``overwrite``, which first removes what
            an earlier render recorded there (see the module docstring) and nothing else.
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
    out = Path(out)
    earlier, staging = _prepare_out(out, overwrite)
    options = _Options(kind, size, window, overlap, unit, style, tuple(columns) if columns else None, time_column)
    jobs = [(session, staging, options) for session in sessions]
    try:
        results = _draw(jobs, usable_cores() if workers is None else workers)
    except BaseException:
        _clear_staging(staging)
        raise
    rows = [row for session_rows in results for row, _ in session_rows]
    images = {row[0]: digest for session_rows in results for row, digest in session_rows}
    manifest = _put_in_place(out, staging, earlier, rows, images)
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


def _draw(jobs: list[tuple[Session, Path, _Options]], workers: int) -> list[list[tuple[list, str]]]:
    """:func:`_render_one` of every job, in ``workers`` processes."""
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
            return list(pool.map(_render_one, jobs, chunksize=max(1, len(jobs) // (8 * workers))))
    return [_render_one(job) for job in jobs]


def _prepare_out(out: Path, overwrite: bool) -> tuple[dict[str, str | None], Path]:
    """Check that ``out`` may be written: new or empty, or (with ``overwrite``) holding no manifest that
    imgtune did not write. Returns the images an earlier render recorded there (see :func:`_earlier_render`)
    and the emptied staging folder the new images are drawn into."""
    if out.exists() and not out.is_dir():
        raise ImgtuneError(f"{out}: exists and is not a folder; choose another output folder")
    earlier: dict[str, str | None] = {}
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ImgtuneError(f"{out}: folder exists and is not empty; choose another or pass `overwrite=True`")
        earlier = _earlier_render(out) or {}
    out.mkdir(parents=True, exist_ok=True)
    staging = out / STAGING
    _clear_staging(staging)
    staging.mkdir()
    return earlier, staging


def _put_in_place(out: Path, staging: Path, earlier: dict[str, str | None], rows: list[list],
                  images: dict[str, str]) -> Path:
    """Replace the earlier render's unchanged images by the new ones drawn in ``staging``; write the
    manifest and the record. Refuses (and keeps everything) if a new image would replace a file that
    imgtune did not draw there."""
    old = {}
    for name, digest in earlier.items():
        path = _own_image(out, name)
        if path is not None and (digest is None or _sha256(path.read_bytes()) == digest):
            old[name] = path
    taken = [name for name in images if name not in old and ((out / name).exists() or (out / name).is_symlink())]
    if taken:
        _clear_staging(staging)
        more = f" (and {len(taken) - 1} more)" if len(taken) > 1 else ""
        raise ImgtuneError(f"{out / taken[0]}: exists and imgtune did not draw it{more}; move it away or choose "
                           f"another output folder")
    for path in old.values():
        path.unlink()
    # The record is written before the images move in: an interrupted move leaves images it lists.
    manifest = _write_manifest(out, rows, images)
    for name in images:
        (out / name).parent.mkdir(exist_ok=True)
        (staging / name).replace(out / name)
    _clear_staging(staging)
    for folder in {path.parent for path in old.values()}:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    return manifest


def _clear_staging(staging: Path) -> None:
    """Remove ``staging`` and the images in it (left there by an interrupted or refused render)."""
    if not (staging.exists() or staging.is_symlink()):
        return
    if staging.is_dir() and not staging.is_symlink():
        for folder in staging.iterdir():
            if folder.is_dir() and not folder.is_symlink():
                for path in folder.glob("*.png"):
                    if not path.is_symlink():
                        path.unlink()
                if not any(folder.iterdir()):
                    folder.rmdir()
        if not any(staging.iterdir()):
            staging.rmdir()
            return
    raise ImgtuneError(f"{staging}: imgtune draws images there, but it holds other files; move them away")


def _earlier_render(out: Path) -> dict[str, str | None] | None:
    """The images an earlier render in ``out`` wrote (name -> sha256, ``None`` for a manifest written
    before the record existed), ``None`` without an earlier render; refuses a manifest not imgtune's."""
    manifest, record = out / MANIFEST, out / RECORD
    if record.is_symlink() or record.exists():
        images, manifest_sha256 = _read_record(record)
        # A manifest shaped as imgtune's is accepted even if changed: a render stopped between writing
        # the manifest and the record leaves one, and the record alone says which images to delete.
        if manifest.is_symlink() or (manifest.exists() and _sha256(manifest.read_bytes()) != manifest_sha256
                                     and _legacy_listing(manifest) is None):
            raise _not_imgtunes(manifest, f"it changed since the render that {RECORD} records")
        return images
    if manifest.is_symlink() or manifest.exists():
        listed = _legacy_listing(manifest)
        if listed is None:
            raise _not_imgtunes(manifest, f"no {RECORD} beside it, and it is not shaped as imgtune's")
        return dict.fromkeys(listed)
    return None


def _not_imgtunes(manifest: Path, why: str) -> ImgtuneError:
    return ImgtuneError(f"{manifest}: not written by imgtune render ({why}); `overwrite=True` deletes only what "
                        f"imgtune wrote, so choose another output folder")


def _read_record(record: Path) -> tuple[dict[str, str], str]:
    """The images a render recorded (name -> sha256) and its manifest's sha256."""
    try:
        if record.is_symlink():
            raise ValueError("a symbolic link")
        data = json.loads(record.read_text(encoding="utf-8"))
        images, manifest_sha256 = data["images"], data["manifest_sha256"]
        if not (isinstance(images, dict) and isinstance(manifest_sha256, str)
                and all(isinstance(k, str) and isinstance(v, str) for k, v in images.items())):
            raise ValueError("unexpected contents")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ImgtuneError(f"{record}: not a render record imgtune can read ({error}); "
                           f"choose another output folder") from None
    return images, manifest_sha256


def _legacy_listing(manifest: Path) -> list[str] | None:
    """The images listed by a manifest that a render wrote before :data:`RECORD` existed, or ``None``
    if ``manifest`` is not exactly such a file (its header, and every row's name made of its label,
    session and start as :func:`_render_one` makes it)."""
    try:
        if manifest.is_symlink():
            return None
        with open(manifest, newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            if tuple(next(reader, ())) != MANIFEST_COLUMNS:
                return None
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    listed = []
    for row in rows:
        if len(row) != len(MANIFEST_COLUMNS):
            return None
        name, label, group, start = row[:4]
        stem = _image_stem(label, group)
        index = name[len(stem):-len(".png")]
        if (PurePosixPath(group).parts[:1] != (label,) or not name.startswith(stem) or not name.endswith(".png")
                or len(index) < 6 or not index.isdigit() or not start.isdigit() or int(index) != int(start)):
            return None
        listed.append(name)
    return listed


def _own_image(out: Path, name: str) -> Path | None:
    """``out/<label>/<file>.png`` named by ``name`` if it is a plain file in a plain folder of ``out``
    (what a render writes), else ``None``: nothing outside ``out`` or behind a link."""
    parts = PurePosixPath(name).parts
    if len(parts) != 2 or any(part in (".", "..") or "\\" in part for part in parts) or not name.endswith(".png"):
        return None
    folder = out / parts[0]
    path = folder / parts[1]
    if folder.is_symlink() or not folder.is_dir() or path.is_symlink() or not path.is_file():
        return None
    return path


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_manifest(out: Path, rows: list[list], images: dict[str, str]) -> Path:
    """Write ``out/manifest.csv`` and then the record of it and of ``images`` (name -> sha256)."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS)
    writer.writerows(rows)
    manifest = atomic_write(out / MANIFEST, text.getvalue())
    record = {"written_by": f"imgtune {__version__} render", "manifest_sha256": _sha256(manifest.read_bytes()),
              "images": images}
    atomic_write(out / RECORD, json.dumps(record, indent=0, sort_keys=True) + "\n")
    return manifest


def _render_one(job: tuple[Session, Path, _Options]) -> list[tuple[list, str]]:
    """Draw one session's windows; returns its manifest rows, each with its image's sha256 (no rows:
    too short to draw)."""
    session, out, options = job
    times, draw = _read_session(session, options)
    bounds = window_bounds(times, window=options.window, overlap=options.overlap, unit=options.unit)
    if not bounds:
        return []
    (out / session.label).mkdir(parents=True, exist_ok=True)
    digits = max(6, len(str(len(times))))
    rows = []
    for start, end in bounds:
        name = f"{_image_stem(session.label, session.group)}{start:0{digits}d}.png"
        buffer = io.BytesIO()
        Image.fromarray(draw(start, end)).save(buffer, format="PNG")
        (out / name).write_bytes(buffer.getvalue())
        rows.append(([name, session.label, session.group, start, end, f"{times[start]:.3f}", f"{times[end - 1]:.3f}"],
                     _sha256(buffer.getvalue())))
    return rows


def _image_stem(label: str, group: str) -> str:
    """``<label>/<the session's path below its label folder, / as __>_``: a window's file name
    without its start index and suffix."""
    stem = "__".join(PurePosixPath(group).parts[1:]) or PurePosixPath(group).name
    return f"{label}/{stem}_"


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
