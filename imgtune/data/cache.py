"""The disk caches that make a second run fast: presized images and frozen-backbone features.

Everything lives under one folder, ``--cache-dir`` (default: ``$IMGTUNE_CACHE``, else
``$XDG_CACHE_HOME/imgtune``, else ``~/.cache/imgtune``)::

    presized/<view>/<ab>/<key>.npy           an image decoded and resized once (uint8, H x W x C)
    features/<model>-<view>/<ab>/<key>.npy   its backbone features (float32, views x F)
    onnx/<model>-<size>.onnx                 the frozen backbone exported for fast feature extraction

An entry's key hashes the file's absolute path, byte size and modification time (nanoseconds), so an
edited or replaced image gets a new key and is decoded again; nothing stale is ever served. Entries
are written to a temporary file and renamed into place, so concurrent loader processes and an
interrupted run can never leave a half-written entry behind. The cache only ever holds derived data:
``imgtune cache clear`` deletes it and the next run rebuilds what it needs.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np

from imgtune.files import atomic_writer

#: The cache's subfolders, one per kind of entry (what ``imgtune cache clear --only`` accepts).
KINDS = ("presized", "features", "onnx")


def default_cache_dir() -> Path:
    """Where downloads and extracted datasets live: ``$IMGTUNE_CACHE``, else ``$XDG_CACHE_HOME/imgtune``,
    else ``~/.cache/imgtune``."""
    if os.environ.get("IMGTUNE_CACHE"):
        return Path(os.environ["IMGTUNE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "imgtune"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir`` if given, else the default cache folder (see the module docstring)."""
    if cache_dir is not None:
        return Path(cache_dir)
    return default_cache_dir()


def file_key(path: str | Path) -> str:
    """A key that changes whenever the file at ``path`` is edited, replaced or moved."""
    path = Path(path).resolve()
    stat = path.stat()
    return hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:32]


class ArrayStore:
    """NumPy arrays on disk under ``root``, one ``.npy`` file per key, written atomically."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npy"

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()

    def get(self, key: str) -> np.ndarray | None:
        """The array stored under ``key``, or ``None`` (also for an unreadable entry, which is then rebuilt)."""
        try:
            return np.load(self.path(key), allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None

    def put(self, key: str, array: np.ndarray) -> None:
        with atomic_writer(self.path(key)) as out:
            np.save(out, np.ascontiguousarray(array), allow_pickle=False)


def usage(cache_dir: str | Path | None = None) -> dict[str, dict[str, int]]:
    """Files and bytes per kind of entry: ``{"presized": {"files": n, "bytes": b}, ...}``."""
    root = cache_root(cache_dir)
    result = {}
    for kind in KINDS:
        files = [p for p in (root / kind).rglob("*") if p.is_file()] if (root / kind).is_dir() else []
        result[kind] = {"files": len(files), "bytes": sum(p.stat().st_size for p in files)}
    return result


def clear(cache_dir: str | Path | None = None, kinds=KINDS) -> dict[str, dict[str, int]]:
    """Delete the cached entries of ``kinds`` (downloaded datasets are kept); returns what was removed."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown cache kinds {sorted(unknown)}; choose from {', '.join(KINDS)}")
    root = cache_root(cache_dir)
    removed = {kind: stats for kind, stats in usage(root).items() if kind in kinds}
    for kind in kinds:
        shutil.rmtree(root / kind, ignore_errors=True)
    return removed
