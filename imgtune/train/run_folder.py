"""The run folder: created for one run only, written atomically, and a manifest of what imgtune wrote.

Two runs never share a folder: a default name (``runs/<data>-<time>``) that is taken gets a suffix
(``-2``, ``-3``, ...), and the manifest ``run.json`` is created exclusively, so a second run writing
to the same ``--out`` at the same time stops at once. Every file goes through
:func:`imgtune.files.atomic_writer` (a reader sees the old file or the whole new one) and is listed in
``run.json``; ``overwrite`` removes exactly the files the manifest lists, never one the user put there.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from imgtune.errors import ImgtuneError
from imgtune.files import FILE_MODE, atomic_write, atomic_writer

MANIFEST_FILE = "run.json"
MANIFEST_FORMAT = 1


def check_out(out: str | Path, *, overwrite: bool = False) -> Path:
    """Fail unless writing a run to ``out`` destroys nothing: it must be new or empty, or ``overwrite``.

    Returns:
        ``out`` as a Path (nothing is created).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ImgtuneError(f"{out}: exists and is not a folder; choose another `out`")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ImgtuneError(f"{out}: folder exists and is not empty; choose another `out` or pass `overwrite=True`")
    return out


def read_manifest(folder: str | Path) -> list[str]:
    """The names of the files imgtune wrote into ``folder`` (from its ``run.json``; none without one)."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        return []
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise ImgtuneError(f"{path}: not a run manifest imgtune wrote; move it away or choose another `out`") from None
    return [name for name in files if _plain_name(name)]


def _plain_name(name) -> bool:
    """A file name inside the folder: no separator, not ``.``/``..`` (a planted manifest cannot reach out)."""
    return isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name and "\\" not in name


class RunFolder:
    """One run's folder and the manifest of the files written into it.

    Build one with :meth:`create` (a new run) or :meth:`reopen` (``resume``); write with :meth:`write`
    or :meth:`writer`, which record the file before it appears.
    """

    def __init__(self, path: Path, files: list[str]):
        self.path = Path(path)
        self.files = list(files)

    @classmethod
    def create(cls, path: str | Path, *, unique: bool = False, overwrite: bool = False) -> RunFolder:
        """Claim ``path`` for a new run.

        Args:
            path: the folder.
            unique: ``path`` is a default name: when it exists, take ``path-2``, ``path-3``, ... instead
                (each made with ``exist_ok=False``, so two runs started in the same second get two folders).
            overwrite: ``path`` may hold an earlier run: the files its ``run.json`` lists are removed
                first; any other file stays.

        Raises:
            ImgtuneError: the folder is not empty (without ``overwrite``), or another run is writing to it.
        """
        path = Path(path)
        if unique:
            path = _new_folder(path)
        else:
            check_out(path, overwrite=overwrite)
            path.mkdir(parents=True, exist_ok=True)
            for name in read_manifest(path) if overwrite else ():
                if name != MANIFEST_FILE and ((path / name).is_file() or (path / name).is_symlink()):
                    (path / name).unlink()  # a link itself, never what it points to
            if overwrite:
                (path / MANIFEST_FILE).unlink(missing_ok=True)
        folder = cls(path, [MANIFEST_FILE])
        try:  # exclusive: of two runs started on one folder, the second stops here
            descriptor = os.open(path / MANIFEST_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        except FileExistsError:
            raise ImgtuneError(f"{path}: another run is writing to this folder; choose another `out`") from None
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(folder._manifest())
        return folder

    @classmethod
    def reopen(cls, path: str | Path) -> RunFolder:
        """An existing run's folder, to go on writing to (``resume``)."""
        path = Path(path)
        return cls(path, read_manifest(path) or [MANIFEST_FILE])

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def record(self, *names: str) -> None:
        """List ``names`` in the manifest (written at once, atomically)."""
        new = [name for name in names if name not in self.files]
        if new:
            self.files += new
            atomic_write(self.path / MANIFEST_FILE, self._manifest())

    def forget(self, name: str) -> None:
        """Remove the file ``name`` and its manifest entry."""
        (self.path / name).unlink(missing_ok=True)
        if name in self.files:
            self.files.remove(name)
            atomic_write(self.path / MANIFEST_FILE, self._manifest())

    def write(self, name: str, data: bytes | str, *, fsync: bool = False) -> Path:
        """Write the file ``name`` atomically and record it; returns its path."""
        self.record(name)
        return atomic_write(self.path / name, data, fsync=fsync)

    @contextlib.contextmanager
    def writer(self, name: str, *, fsync: bool = False) -> Iterator[BinaryIO]:
        """A binary handle whose contents replace the file ``name`` when the block ends (recorded first)."""
        self.record(name)
        with atomic_writer(self.path / name, fsync=fsync) as handle:
            yield handle

    def _manifest(self) -> str:
        manifest = dict(format=MANIFEST_FORMAT, about="the files imgtune wrote for this run; --overwrite removes "
                        "these and only these", files=sorted(self.files))
        return json.dumps(manifest, indent=2) + "\n"


def _new_folder(path: Path) -> Path:
    """Make ``path``, or the first of ``path-2``, ``path-3``, ... that does not exist yet."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for number in range(1, 10_000):
        candidate = path if number == 1 else path.with_name(f"{path.name}-{number}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise ImgtuneError(f"{path}: 10000 runs of this name; choose an `out`")
