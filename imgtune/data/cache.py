"""The disk caches that make a second run fast: presized images and frozen-backbone features.

Everything lives under one folder, ``--cache-dir`` (default: ``$IMGTUNE_CACHE``, else
``$XDG_CACHE_HOME/imgtune``, else ``~/.cache/imgtune``)::

    presized/<view>/<ab>/<key>.npy           an image decoded and resized once (uint8, H x W x C)
    features/<model>-<view>/<ab>/<key>.npy   its backbone features (float32, views x F; computed in
                                             bf16 or fp16 on a GPU: <model>-<view>-bf16/ ...)
    activations/<lower body>-<view>/<ab>/<key>.npy   the frozen stages' activation maps (float16,
                                             views x C x H x W) that partial fine-tuning trains on
    onnx/<model>-<size>.onnx                 the frozen backbone exported for fast feature extraction

An entry's key hashes the file's absolute path, byte size and modification time (nanoseconds), so an
edited or replaced image gets a new key and is decoded again; nothing stale is ever served. Entries
are written to a temporary file and renamed into place, so concurrent loader processes and an
interrupted run can never leave a half-written entry behind. The cache only ever holds derived data:
``imgtune cache clear`` deletes it and the next run rebuilds what it needs.

A cache folder that the first entry creates (or finds empty) is marked with a ``CACHEDIR.TAG``
(https://bford.info/cachedir/, which backup tools honour); a folder that already held something is
not, so that backups keep what is yours there. :func:`clear` works only in a tagged folder, and even
there deletes only entries named as above (a file of yours in ``features/`` stays). A cache made
before the tag existed is tagged by :func:`clear` if it holds nothing but the kinds' subfolders (and
downloaded datasets: folders holding ``.extracted``) and they hold nothing but imgtune's entries.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np

from imgtune.errors import ImgtuneError
from imgtune.files import atomic_write, atomic_writer

#: The cache's subfolders, one per kind of entry (what ``imgtune cache clear --only`` accepts).
KINDS = ("presized", "features", "activations", "onnx")

#: The Cache Directory Tagging standard's file, its signature, and the rest of imgtune's tag.
CACHEDIR_TAG = "CACHEDIR.TAG"
TAG_SIGNATURE = "Signature: 8a477f597d28d172789f06886806bc55"
_TAG_TEXT = (f"{TAG_SIGNATURE}\n# This file is a cache directory tag created by imgtune: everything in this folder"
             f" can be rebuilt.\n# For information about cache directory tags see https://bford.info/cachedir/\n")
# An entry (or the temporary file atomic_writer leaves when killed mid-write) as ArrayStore and the
# ONNX export name them; temporary names come from tempfile.mkstemp (letters, digits, underscores).
_ARRAY_ENTRY = re.compile(r"(?P<key>[0-9a-f]{32})\.npy|\.(?P<tmp_key>[0-9a-f]{32})\.npy\.\w+\.tmp")
_ONNX_ENTRY = re.compile(r"[0-9a-f]+-\d+\.onnx|\.[0-9a-f]+-\d+\.onnx\.\w+\.tmp")


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
    """NumPy arrays on disk under ``root``, one ``.npy`` file per key, written atomically.

    A store in a cache folder (``<cache>/presized/<name>`` or ``<cache>/features/<name>``) tags the
    cache folder if its first write creates it or finds it empty (see the module docstring).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._written = False

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
        new_cache = self._new_cache_folder()
        with atomic_writer(self.path(key)) as out:
            np.save(out, np.ascontiguousarray(array), allow_pickle=False)
        if new_cache is not None:
            atomic_write(new_cache / CACHEDIR_TAG, _TAG_TEXT)

    def _new_cache_folder(self) -> Path | None:
        """At the first write only: the cache folder this store lies in if it is missing or empty."""
        if self._written:
            return None
        self._written = True
        folder = self.root.parent.parent
        if self.root.parent.name not in ("presized", "features", "activations"):
            return None
        return folder if not folder.exists() or (folder.is_dir() and not any(folder.iterdir())) else None


def usage(cache_dir: str | Path | None = None) -> dict[str, dict[str, int]]:
    """Files and bytes per kind of entry: ``{"presized": {"files": n, "bytes": b}, ...}``."""
    root = cache_root(cache_dir)
    result = {}
    for kind in KINDS:
        files = [p for p in (root / kind).rglob("*") if p.is_file()] if (root / kind).is_dir() else []
        result[kind] = {"files": len(files), "bytes": sum(p.stat().st_size for p in files)}
    return result


def clear(cache_dir: str | Path | None = None, kinds=KINDS) -> dict[str, dict[str, int]]:
    """Delete imgtune's cached entries of ``kinds`` (downloaded datasets, and files imgtune did not write,
    are kept).

    Args:
        cache_dir: the cache folder (default: see the module docstring); it must carry imgtune's
            ``CACHEDIR.TAG``, or be a cache from before the tag existed (which is then tagged).
        kinds: some of :data:`KINDS`.

    Returns:
        Files and bytes removed per kind, as :func:`usage` counts them.

    Raises:
        ImgtuneError: the folder is not an imgtune cache.
    """
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown cache kinds {sorted(unknown)}; choose from {', '.join(KINDS)}")
    root = cache_root(cache_dir)
    removed = {kind: {"files": 0, "bytes": 0} for kind in KINDS if kind in kinds}
    if not root.exists():
        return removed
    _check_cache(root)
    for kind, stats in removed.items():
        entries, _ = _entries(root / kind, kind)
        for path in entries:
            try:
                size = path.stat().st_size
                path.unlink()
            except FileNotFoundError:  # another process cleared it, or renamed its temporary file
                continue
            stats["files"] += 1
            stats["bytes"] += size
        _remove_empty_folders({path.parent for path in entries}, root / kind)
    return removed


def is_imgtune_cache(root: str | Path) -> bool:
    """Whether ``root`` carries the ``CACHEDIR.TAG`` imgtune writes (a plain file, not a link)."""
    tag = Path(root) / CACHEDIR_TAG
    try:
        text = "" if tag.is_symlink() else tag.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return text.startswith(TAG_SIGNATURE) and "imgtune" in text


def _check_cache(root: Path) -> None:
    """Refuse ``root`` unless it is an imgtune cache; tag an untagged one from before the tag existed."""
    if is_imgtune_cache(root):
        return
    kinds_only_entries = all(not _entries(root / kind, kind)[1] for kind in KINDS)
    is_cache = any((root / kind).is_dir() for kind in KINDS) or root.resolve() == default_cache_dir().resolve()
    if not (kinds_only_entries and is_cache and _tag_if_own(root)):
        raise ImgtuneError(f"{root}: not an imgtune cache (no CACHEDIR.TAG of imgtune's); pass the cache folder "
                           f"imgtune made")


def _tag_if_own(root: Path) -> bool:
    """Tag ``root`` as a cache if it holds nothing but imgtune's subfolders and downloaded datasets
    (folders holding ``.extracted``); returns whether it is tagged."""
    if not root.is_dir():
        return False
    for child in root.iterdir():
        plain_folder = child.is_dir() and not child.is_symlink()
        if not plain_folder or not (child.name in KINDS or (child / ".extracted").is_file()):
            return False
    atomic_write(root / CACHEDIR_TAG, _TAG_TEXT)
    return True


def _entries(folder: Path, kind: str) -> tuple[list[Path], list[Path]]:
    """imgtune's entries below ``folder`` (``<cache>/<kind>``) and everything else there (files, links),
    without following links."""
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        return [], [folder]
    ours, others = [], []
    for where, folders, files in os.walk(folder):
        here = Path(where)
        others += [here / name for name in folders if (here / name).is_symlink()]
        for name in files:
            path = here / name
            parts = path.relative_to(folder).parts
            (ours if not path.is_symlink() and _is_entry(parts, kind) else others).append(path)
    return ours, others


def _is_entry(parts: tuple[str, ...], kind: str) -> bool:
    """Whether a file at ``parts`` below ``<cache>/<kind>`` is named as imgtune names its entries."""
    if kind == "onnx":
        return len(parts) == 1 and _ONNX_ENTRY.fullmatch(parts[0]) is not None
    match = _ARRAY_ENTRY.fullmatch(parts[-1])
    return len(parts) == 3 and match is not None and (match["key"] or match["tmp_key"])[:2] == parts[1]


def _remove_empty_folders(folders: set[Path], top: Path) -> None:
    """Remove each of ``folders`` and its parents up to ``top`` (included) while they are empty."""
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        while True:
            try:
                folder.rmdir()
            except OSError:  # not empty (or gone already)
                break
            if folder == top:
                break
            folder = folder.parent
