"""The change log of a dataset, with undo: quarantined files, relabelled files and CSV rows.

``imgtune doctor --fix`` and the page of ``imgtune clean`` change a dataset only through these
functions: :func:`quarantine` and :func:`move_file` rename files (never deleting, never overwriting),
:func:`set_csv_label` rewrites one row of a CSV, and each batch of changes is appended to a
:class:`ChangeLog` in the quarantine folder beside the data, which :func:`undo` replays backwards.

The log is a plain file a person (or another program) can edit, so undo trusts none of its paths:
it moves files only inside the data folder and its quarantine folder, and moves a symbolic link as
a link, never the file it points to. A last line cut off by an interrupted append is set aside with
a warning; any other line that is not JSON stops with an error naming the line.
"""

from __future__ import annotations

import csv
import io
import json
import os
import warnings
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Sequence

from imgtune.errors import ImgtuneError
from imgtune.files import atomic_write

QUARANTINE_SUFFIX = ".quarantine"
LOG_NAME = "changes.jsonl"
#: Where the cut-off last line of a log goes when the next batch is appended (kept for a person to read).
BROKEN_SUFFIX = ".broken"


def quarantine_dir(root: str | Path) -> Path:
    """The quarantine folder beside the data: ``data/bears`` -> ``data/bears.quarantine``."""
    root = Path(root).resolve()
    return root.parent / f"{root.name}{QUARANTINE_SUFFIX}"


class ChangeLog:
    """An append-only log of changes to a dataset, one JSON line per batch, in the quarantine folder.

    A batch is ``{"batch": n, "time": ..., "by": ..., "changes": [...]}``; its undo appends
    ``{"batch": n, "undone": true, ...}``. Paths are relative to the folder that holds the data
    (so that the data and its quarantine can move together). The changes are

    - ``{"op": "move", "src": ..., "dst": ...}``: a file renamed (quarantined or relabelled);
    - ``{"op": "relabel_csv", "csv": ..., "file": ..., "old": ..., "new": ...}``: a CSV row's label;
    - ``{"op": "keep", "file": ...}``: an image looked at and kept (nothing changes on disk).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.base = self.root.parent
        self.path = quarantine_dir(self.root) / LOG_NAME
        self._warned = False  # about a cut-off last line: once is enough

    def entries(self) -> list[dict]:
        """Every line of the log, oldest first (undo lines too).

        A last line without its newline that is not JSON is what an interrupted append leaves: it is
        skipped with a warning (the changes it was recording cannot be undone from the log).

        Raises:
            ImgtuneError: any other line that is not a JSON object, named by its number.
        """
        if not self.path.is_file():
            return []
        text = self.path.read_text(encoding="utf-8")
        lines = text.split("\n")  # the last item is what follows the last newline ("" when none)
        entries = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as error:
                if number == len(lines):
                    if not self._warned:
                        warnings.warn(f"{self.path}: line {number} was cut off (an interrupted write?); "
                                      f"ignoring it", stacklevel=2)
                    self._warned = True
                    continue
                raise ImgtuneError(f"{self.path}:{number}: not a log entry ({error}); fix or remove that line "
                                   f"(undo needs every complete line)") from None
            if not _well_formed(entry):
                raise ImgtuneError(f"{self.path}:{number}: not a log entry (a batch number and a list of "
                                   f"changes); fix or remove that line")
            entries.append(entry)
        return entries

    def batches(self) -> list[dict]:
        """The batches not undone, oldest first."""
        entries = self.entries()
        undone = {e["batch"] for e in entries if e.get("undone")}
        return [e for e in entries if "changes" in e and e["batch"] not in undone]

    def relative(self, path: str | Path) -> str:
        """``path`` as the log writes it: relative to the folder that holds the data, with ``/`` (a link at
        its end is not followed: the log names the link)."""
        return Path(os.path.relpath(_unfollowed(path), self.base)).as_posix()

    def absolute(self, relative: str) -> Path:
        """The path of a name the log wrote (see :meth:`relative`)."""
        return self.base / relative

    def confined(self, relative: str) -> Path:
        """The path of a name in the log, checked to lie inside the data folder or its quarantine folder,
        without following a symbolic link at its end.

        Raises:
            ImgtuneError: an absolute name, a ``..``, or a path that leads elsewhere (through a link too).
        """
        name = PurePosixPath(str(relative))
        path = self.base / name
        real = _unfollowed(path)  # a link itself, where it sits
        inside = [self.root, quarantine_dir(self.root)]
        if not name.is_absolute() and ".." not in name.parts and path.name and any(
                real.is_relative_to(folder) and real != folder for folder in inside):
            return path
        raise ImgtuneError(f"{self.path}: names {relative!r}, which is not inside {self.root} or "
                           f"{quarantine_dir(self.root)}; nothing was undone (was the log edited?)")

    def record(self, changes: list[dict], by: str) -> int:
        """Append a batch of changes already made; returns its number. A log with a broken line takes
        the batch too (the changes are made; losing their record would be worse)."""
        try:
            entries = self.entries()
        except ImgtuneError:
            entries = [e for e in map(_parsed, self.path.read_text(encoding="utf-8").splitlines()) if e]
        number = max([e["batch"] for e in entries], default=0) + 1
        self._append({"batch": number, "time": _now(), "by": by, "changes": changes})
        return number

    def record_undo(self, number: int) -> None:
        """Append that batch ``number`` was undone."""
        self._append({"batch": number, "undone": True, "time": _now()})

    def _append(self, entry: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._set_aside_cut_line()
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, ensure_ascii=False) + "\n")

    def _set_aside_cut_line(self) -> None:
        """Move a last line left without its newline to ``changes.jsonl.broken``: appended to, it would
        become a broken line in the middle of the log."""
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        if not data or data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1
        with open(self.path.with_name(self.path.name + BROKEN_SUFFIX), "ab") as broken:
            broken.write(data[keep:] + b"\n")
        os.truncate(self.path, keep)
        warnings.warn(f"{self.path}: its cut-off last line was moved to {self.path.name}{BROKEN_SUFFIX}",
                      stacklevel=3)


def move_file(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` only if nothing is at ``dst`` (an atomic rename; never an overwrite)."""
    if os.path.lexists(dst):
        raise ImgtuneError(f"{dst}: already exists; not overwriting it (move it away and try again)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.rename(src, dst)


def free_name(path: Path) -> Path:
    """``path``, or ``name-1.ext``, ``name-2.ext``, ... whichever is free first."""
    candidate, n = path, 1
    while os.path.lexists(candidate):
        candidate, n = path.with_name(f"{path.stem}-{n}{path.suffix}"), n + 1
    return candidate


def quarantine(root: str | Path, paths: Sequence[str | Path], *, by: str = "imgtune doctor --fix") -> list[dict]:
    """Move ``paths`` (files inside ``root``) into the quarantine folder, keeping their relative paths.

    Returns:
        The changes made (also appended to the log as one batch); none when ``paths`` is empty.
    """
    log = ChangeLog(root)
    log.entries()  # a broken log stops here, before anything moves
    target = quarantine_dir(log.root)
    changes = []
    try:
        for path in sorted({_unfollowed(p) for p in paths}):
            if not path.is_relative_to(log.root) or path == log.root:
                raise ImgtuneError(f"{path}: is not inside the data folder {log.root}; not moving it")
            dst = free_name(target / path.relative_to(log.root))
            move_file(path, dst)
            changes.append({"op": "move", "src": log.relative(path), "dst": log.relative(dst)})
    finally:
        if changes:  # what was moved before an error is logged too, so that it can be undone
            log.record(changes, by)
    return changes


def undo(root: str | Path, batches: int | None = None, *, csv_path: str | Path | None = None) -> list[dict]:
    """Undo the newest ``batches`` batches of the change log of ``root`` (all when ``None``), newest first.

    Every change of a batch is checked before any is undone: a file moved since, a name taken since,
    or a path outside the data folder and its quarantine (a log edited by hand) stops the undo with
    an error and changes nothing of that batch.

    Args:
        root: the data folder whose log it is.
        batches: how many batches to undo, newest first (``None``: all).
        csv_path: the CSV whose rows the cleaner relabelled, when it is not inside the folder that
            holds ``root`` (a relabelled row of another CSV is refused).

    Returns:
        The changes undone, in the order they were undone.
    """
    log = ChangeLog(root)
    extra = [Path(csv_path).resolve()] if csv_path is not None else []
    todo = log.batches()[::-1][:batches]
    undone = []
    for batch in todo:
        changes = batch["changes"][::-1]
        for change in changes:
            _check_undo(log, change, extra)
        for change in changes:
            _undo_one(log, change)
        log.record_undo(batch["batch"])
        undone += changes
    _remove_empty_dirs(quarantine_dir(log.root))
    return undone


def _check_undo(log: ChangeLog, change: dict, extra: Sequence[Path]) -> None:
    if change.get("op") == "move":
        src, dst = log.confined(change.get("src", "")), log.confined(change.get("dst", ""))
        if not os.path.lexists(dst):  # lexists: a quarantined link whose target went is still there
            raise ImgtuneError(f"cannot undo: {dst} is gone (moved or deleted since); nothing was undone")
        if os.path.lexists(src):
            raise ImgtuneError(f"cannot undo: {src} exists again; move it away first; nothing was undone")
    elif change.get("op") == "relabel_csv":
        csv_file = log.absolute(str(change.get("csv", ""))).resolve()
        if csv_file not in extra and not (csv_file.is_relative_to(log.base) and csv_file.suffix.lower() == ".csv"):
            raise ImgtuneError(f"{log.path}: names the CSV {change.get('csv')!r}, which is not inside {log.base}; "
                               f"nothing was undone (give the CSV the cleaner changed as `csv_path`)")


def _undo_one(log: ChangeLog, change: dict) -> None:
    if change.get("op") == "move":
        move_file(log.absolute(change["dst"]), log.absolute(change["src"]))
    elif change.get("op") == "relabel_csv":
        set_csv_label(log.absolute(change["csv"]), change["file"], change["new"], change["old"])


def _parsed(line: str) -> dict | None:
    """One line of the log, or ``None`` when it is not a log entry."""
    try:
        entry = json.loads(line)
    except json.JSONDecodeError:
        return None
    return entry if _well_formed(entry) else None


def _well_formed(entry) -> bool:
    """Whether a parsed line is a log entry: an object with a batch number and, if any, a list of changes."""
    if not isinstance(entry, dict) or not isinstance(entry.get("batch"), int):
        return False
    changes = entry.get("changes", [])
    return isinstance(changes, list) and all(isinstance(change, dict) for change in changes)


def _unfollowed(path: str | Path) -> Path:
    """``path`` made absolute through its folders' links, but not through a link at its end: moving
    a link moves the link."""
    path = Path(path)
    return path.parent.resolve() / path.name


def set_csv_label(csv_path: Path, file: str, old: str, new: str) -> None:
    """Rewrite the label of ``file``'s row from ``old`` to ``new``; the CSV is replaced atomically."""
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.reader(handle))
    header = [c.strip().lower() for c in rows[0]] if rows else []
    if "file" not in header or "label" not in header:
        raise ImgtuneError(f"{csv_path}: needs a header with columns file,label")
    file_col, label_col = header.index("file"), header.index("label")
    matches = [r for r in rows[1:] if len(r) > label_col and r[file_col].strip() == file]
    if len(matches) != 1 or matches[0][label_col].strip() != old:
        raise ImgtuneError(f"{csv_path}: no single row for {file} labelled {old!r}; was the CSV edited since?")
    matches[0][label_col] = new
    text = io.StringIO(newline="")
    csv.writer(text).writerows(rows)
    atomic_write(csv_path, text.getvalue())  # the user asked for this edit; the old labels are in the log


def _remove_empty_dirs(folder: Path) -> None:
    if not folder.is_dir():
        return
    for path in sorted(folder.rglob("*"), key=lambda p: -len(p.parts)):
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
