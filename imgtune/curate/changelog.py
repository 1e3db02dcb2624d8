"""The change log of a dataset, with undo: quarantined files, relabelled files and CSV rows.

``imgtune doctor --fix`` and the page of ``imgtune clean`` change a dataset only through these
functions: :func:`quarantine` and :func:`move_file` rename files (never deleting, never overwriting),
:func:`set_csv_label` rewrites one row of a CSV, and each batch of changes is appended to a
:class:`ChangeLog` in the quarantine folder beside the data, which :func:`undo` replays backwards.
"""

from __future__ import annotations

import csv
import io
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from imgtune.errors import ImgtuneError
from imgtune.files import atomic_write

QUARANTINE_SUFFIX = ".quarantine"
LOG_NAME = "changes.jsonl"


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

    def entries(self) -> list[dict]:
        """Every line of the log, oldest first (undo lines too)."""
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def batches(self) -> list[dict]:
        """The batches not undone, oldest first."""
        entries = self.entries()
        undone = {e["batch"] for e in entries if e.get("undone")}
        return [e for e in entries if "changes" in e and e["batch"] not in undone]

    def relative(self, path: str | Path) -> str:
        """``path`` as the log writes it: relative to the folder that holds the data, with ``/``."""
        return Path(os.path.relpath(Path(path).resolve(), self.base)).as_posix()

    def absolute(self, relative: str) -> Path:
        """The path of a name the log wrote (see :meth:`relative`)."""
        return self.base / relative

    def record(self, changes: list[dict], by: str) -> int:
        """Append a batch of changes already made; returns its number."""
        number = max([e["batch"] for e in self.entries()], default=0) + 1
        self._append({"batch": number, "time": _now(), "by": by, "changes": changes})
        return number

    def record_undo(self, number: int) -> None:
        """Append that batch ``number`` was undone."""
        self._append({"batch": number, "undone": True, "time": _now()})

    def _append(self, entry: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, ensure_ascii=False) + "\n")


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
    target = quarantine_dir(log.root)
    changes = []
    try:
        for path in sorted({Path(p).resolve() for p in paths}):
            if not path.is_relative_to(log.root):
                raise ImgtuneError(f"{path}: is not inside the data folder {log.root}; not moving it")
            dst = free_name(target / path.relative_to(log.root))
            move_file(path, dst)
            changes.append({"op": "move", "src": log.relative(path), "dst": log.relative(dst)})
    finally:
        if changes:  # what was moved before an error is logged too, so that it can be undone
            log.record(changes, by)
    return changes


def undo(root: str | Path, batches: int | None = None) -> list[dict]:
    """Undo the newest ``batches`` batches of the change log of ``root`` (all when ``None``), newest first.

    Every change of a batch is checked before any is undone: a file moved since, or a name taken
    since, stops the undo with an error and changes nothing.

    Returns:
        The changes undone, in the order they were undone.
    """
    log = ChangeLog(root)
    todo = log.batches()[::-1][:batches]
    undone = []
    for batch in todo:
        changes = batch["changes"][::-1]
        for change in changes:
            _check_undo(log, change)
        for change in changes:
            _undo_one(log, change)
        log.record_undo(batch["batch"])
        undone += changes
    _remove_empty_dirs(quarantine_dir(log.root))
    return undone


def _check_undo(log: ChangeLog, change: dict) -> None:
    if change["op"] == "move":
        src, dst = log.absolute(change["src"]), log.absolute(change["dst"])
        if not dst.is_file():
            raise ImgtuneError(f"cannot undo: {dst} is gone (moved or deleted since); nothing was undone")
        if os.path.lexists(src):
            raise ImgtuneError(f"cannot undo: {src} exists again; move it away first; nothing was undone")


def _undo_one(log: ChangeLog, change: dict) -> None:
    if change["op"] == "move":
        move_file(log.absolute(change["dst"]), log.absolute(change["src"]))
    elif change["op"] == "relabel_csv":
        set_csv_label(log.absolute(change["csv"]), change["file"], change["new"], change["old"])


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
