"""Check a dataset before training: unreadable files, tiny or odd images, duplicates, leaks, imbalance.

:func:`diagnose` finds the items as ``imgtune train`` would (:func:`imgtune.data.loaders.find_items`), reads
every file once (content hash, size, colour, a perceptual hash) and returns a :class:`Diagnosis`:
a list of :class:`Problem` of these kinds.

- ``corrupt``: an image file that cannot be decoded; ``not_image``: another file among the data
  (training ignores it).
- ``tiny``: the shorter side under ``min_side`` pixels; ``aspect``: longer/shorter side over ``max_aspect``.
- ``duplicate`` / ``near_duplicate``: the same picture twice in one class and split (the near kind
  by perceptual hash: resized or recompressed copies).
- ``conflict`` / ``near_conflict``: the same picture in two classes: at most one label is right.
- ``leak`` / ``near_leak``: the same picture in train and valid: the validation score flatters.
- ``mixed_mode``: a few grayscale images among colour ones (or the other way round).
- ``mislabel``: images whose label an out-of-fold model finds least likely (see :mod:`imgtune.curate.mislabel`).

:func:`write_outputs` writes ``doctor.json`` and a gallery of the problems (``templates/doctor.html``).
:func:`fix` moves the files of chosen kinds into a quarantine folder beside the data (never deleting,
never overwriting) and records the moves in the change log of :mod:`imgtune.curate.changelog`, whose
:func:`~imgtune.curate.changelog.undo` replays them backwards. The page of ``imgtune clean`` writes
its relabels and quarantines to the same log.
"""

from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from imgtune.curate.changelog import quarantine
from imgtune.curate.hashing import ImageInfo, inspect_image
from imgtune.curate.pages import jpeg_data_uri, render
from imgtune.data.loaders import find_items
from imgtune.data.sources import Item, is_image_file
from imgtune.data.split import split_items
from imgtune.errors import ImgtuneError
from imgtune.system import io_threads

KINDS = {
    "corrupt": "cannot be read as an image",
    "not_image": "not an image file (training ignores it)",
    "tiny": "smaller than the minimum side",
    "aspect": "extreme aspect ratio",
    "conflict": "the same image in two classes",
    "leak": "the same image in train and valid",
    "duplicate": "the same image twice in one class",
    "near_conflict": "near-identical images in two classes",
    "near_leak": "near-identical images in train and valid",
    "near_duplicate": "near-identical images in one class",
    "mixed_mode": "grayscale and colour images mixed",
    "mislabel": "label the model finds unlikely",
}
#: What ``--fix`` moves unless told otherwise: files that can only harm training. Each duplicate
#: keeps its first copy; every copy of a conflict goes, since nothing says which label is right.
DEFAULT_FIX = ("corrupt", "duplicate", "conflict")


@dataclass
class Problem:
    """One finding: its kind (see :data:`KINDS`), the files involved, and those ``fix`` would move."""

    kind: str
    files: list[Path]
    detail: str
    fix: list[Path] = field(default_factory=list)

    def to_json(self, root: Path | None) -> dict:
        return {"kind": self.kind, "files": [_shown(p, root) for p in self.files], "detail": self.detail,
                "fix": [_shown(p, root) for p in self.fix]}


@dataclass
class Diagnosis:
    """The result of :func:`diagnose`: problems, class counts, and where the data lives."""

    root: Path | None
    description: str
    counts: dict[str, dict[str, int]]
    problems: list[Problem]
    n_files: int
    settings: dict = field(default_factory=dict)

    def by_kind(self) -> Counter:
        return Counter(p.kind for p in self.problems)

    @property
    def imbalance(self) -> float:
        """Images in the largest class over the smallest (inf when a class has none)."""
        totals = [sum(c.values()) for c in self.counts.values()]
        return max(totals) / min(totals) if totals and min(totals) else float("inf")

    def summary(self) -> str:
        """The terminal report: counts per class, then each kind of problem with a few examples."""
        lines = [f"data: {self.description}: {self.n_files} files, {len(self.counts)} classes"]
        width = max([len(c) for c in self.counts] + [5])
        for label, count in self.counts.items():
            lines.append(f"  {label:<{width}}  {count['train']:>6} train  {count['valid']:>6} valid")
        if len(self.counts) > 1:
            warn = "  (over 3: consider more images of the small classes)" if self.imbalance > 3 else ""
            lines.append(f"  imbalance (largest/smallest class): {self.imbalance:.1f}{warn}")
        kinds = self.by_kind()
        if not kinds:
            lines.append("no problems found")
        for kind in KINDS:
            if kinds[kind]:
                lines.append(f"{kinds[kind]} {kind}: {KINDS[kind]}")
                for problem in [p for p in self.problems if p.kind == kind][:3]:
                    files = ", ".join(_shown(p, self.root) for p in problem.files[:3])
                    lines.append(f"    {files}: {problem.detail}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"data": self.description, "root": str(self.root) if self.root else None, "files": self.n_files,
                "counts": self.counts, "imbalance": self.imbalance if np.isfinite(self.imbalance) else None,
                "problem_counts": dict(self.by_kind()), "settings": self.settings,
                "problems": [p.to_json(self.root) for p in self.problems]}


def diagnose(
    source: str | Path | None = None,
    *,
    label_re: str | None = None,
    csv_path: str | Path | None = None,
    data_dir: str | Path | None = None,
    valid_pct: float = 0.2,
    stratify: bool = False,
    seed: int = 42,
    min_side: int = 64,
    max_aspect: float = 4.0,
    near_distance: int = 4,
    mislabels: int = 20,
    features=None,
    workers: int | None = None,
) -> Diagnosis:
    """Examine a dataset (any source ``imgtune train`` accepts) and list its problems.

    Args:
        source, label_re, csv_path, data_dir: where the images are, as for :func:`imgtune.data.loaders.load_data`.
        valid_pct, stratify, seed: the split ``train`` would make when the data gives none (for leaks).
        min_side: images whose shorter side is under this many pixels are ``tiny``.
        max_aspect: images whose longer side is more than this many times the shorter are ``aspect``.
        near_distance: perceptual hashes (64 bits) at most this many bits apart are near duplicates
            (-1: do not look). Resized or recompressed copies measured 0-4 bits apart; distinct pictures
            of very uniform subjects (elpv's solar cells) can come as close, so such data gets many reports.
        mislabels: how many suspected mislabels to list (0: do not look, which needs no model).
        features: a function ``paths -> (N, F) tensor`` for the mislabel finder
            (default: :func:`imgtune.train.features.imagenet_features`).
        workers: threads reading files.

    Returns:
        A :class:`Diagnosis`.
    """
    found = find_items(source, label_re=label_re, csv_path=csv_path, data_dir=data_dir)
    root = data_root(source, csv_path)
    workers = workers or io_threads()
    with ThreadPoolExecutor(workers) as pool:
        infos = list(pool.map(inspect_image, found.items))
    readable = [info for info in infos if info.error is None]
    if readable and any(info.item.split is None for info in readable):
        train, valid = split_items([i.item for i in readable], valid_pct=valid_pct, stratify=stratify, seed=seed)
        split_of = {id(item): "train" for item in train} | {id(item): "valid" for item in valid}
        for info in readable:
            info.item = Item(info.item.path, info.item.label, split_of[id(info.item)])
    problems = [Problem("corrupt", [i.item.path], i.error, [i.item.path]) for i in infos if i.error is not None]
    problems += [Problem("not_image", [p], "not an image file", [p]) for p in _other_files(root, source, csv_path,
                                                                                           label_re)]
    for info in readable:
        short, long = sorted((info.width, info.height))
        if short < min_side:
            problems.append(Problem("tiny", [info.item.path], f"{info.width}x{info.height} pixels", [info.item.path]))
        if long > max_aspect * short:
            problems.append(Problem("aspect", [info.item.path], f"{info.width}x{info.height} pixels "
                                    f"(ratio {long / short:.1f})", [info.item.path]))
    problems += _exact_duplicates(readable) + _near_duplicates(readable, near_distance) + _mixed_modes(readable)
    if mislabels and len({i.item.label for i in readable}) > 1:
        problems += _mislabel_problems(readable, mislabels, features, seed)
    labels = sorted({info.item.label for info in infos})
    counts = {label: {"train": 0, "valid": 0} for label in labels}
    for info in readable:
        counts[info.item.label][info.item.split] += 1
    settings = dict(min_side=min_side, max_aspect=max_aspect, near_distance=near_distance, mislabels=mislabels,
                    valid_pct=valid_pct, stratify=stratify, seed=seed)
    return Diagnosis(root=root, description=found.description, counts=counts, problems=problems,
                     n_files=len(infos), settings=settings)


def _exact_duplicates(infos: Sequence[ImageInfo]) -> list[Problem]:
    groups: dict[str, list[ImageInfo]] = {}
    for info in infos:
        groups.setdefault(info.sha256, []).append(info)
    problems = []
    for group in groups.values():
        if len(group) > 1:
            problems += _copies(sorted(group, key=lambda i: str(i.item.path)), "")
    return problems


def _copies(group: list[ImageInfo], near: str) -> list[Problem]:
    """The problems of one set of copies: a conflict, or duplicates within a split and a leak across."""
    paths = [i.item.path for i in group]
    labels = sorted({i.item.label for i in group})
    how = "near-identical" if near else "identical"
    if len(labels) > 1:
        return [Problem(f"{near}conflict", paths, f"{how}, labelled {' and '.join(labels)}", paths)]
    problems = []
    for split in ("train", "valid"):
        same = [i.item.path for i in group if i.item.split == split]
        if len(same) > 1:
            problems.append(Problem(f"{near}duplicate", same, f"{how}, {len(same)} copies in {split}", same[1:]))
    valid = [i.item.path for i in group if i.item.split == "valid"]
    if valid and len(valid) < len(group):
        problems.append(Problem(f"{near}leak", paths, f"{how}, in train and valid", valid))
    return problems


def _near_duplicates(infos: Sequence[ImageInfo], distance: int) -> list[Problem]:
    """Pairs whose perceptual hashes differ in at most ``distance`` bits (exact copies left out)."""
    hashed = [i for i in infos if i.phash is not None]
    if len(hashed) < 2 or distance < 0:
        return []
    bits = np.unpackbits(np.array([i.phash for i in hashed], dtype=">u8").view(np.uint8).reshape(-1, 8), axis=1)
    bits = bits.astype(np.float32)  # float: the products run on BLAS; counts up to 64 are exact
    problems = []
    for start in range(0, len(hashed), 256):  # (256, N) differences at a time keeps the memory small
        block = bits[start:start + 256]
        differing = block @ (1 - bits).T + (1 - block) @ bits.T
        for a, b in zip(*np.nonzero(differing <= distance)):
            first, second = hashed[start + a], hashed[b]
            if start + a < b and first.sha256 != second.sha256:
                problems += _copies([first, second], "near_")
    return problems


def _mixed_modes(infos: Sequence[ImageInfo]) -> list[Problem]:
    gray = [i.item.path for i in infos if i.grayscale]
    colour = [i.item.path for i in infos if not i.grayscale]
    if not gray or not colour:
        return []
    few, what = (gray, "grayscale") if len(gray) <= len(colour) else (colour, "colour")
    detail = f"{what}: {len(few)} of {len(infos)} images ({len(gray)} grayscale, {len(colour)} colour)"
    return [Problem("mixed_mode", sorted(few), detail, [])]


def _mislabel_problems(infos: Sequence[ImageInfo], top: int, features, seed: int) -> list[Problem]:
    from imgtune.curate.mislabel import find_mislabels

    suspects = find_mislabels([i.item for i in infos], features=features, seed=seed)
    return [Problem("mislabel", [s.path], f"labelled {s.given} ({100 * s.given_probability:.0f}%), "
                    f"looks like {s.predicted} ({100 * s.predicted_probability:.0f}%)", [])
            for s in suspects if s.predicted != s.given][:top]


def data_root(source: str | Path | None, csv_path: str | Path | None = None) -> Path | None:
    """The folder the data lives in, resolved (``None`` for a named dataset, which is read-only)."""
    if csv_path is not None:
        return Path(source if source is not None else Path(csv_path).parent).resolve()
    if source is not None and Path(source).is_dir():
        return Path(source).resolve()
    return None


def _other_files(root: Path | None, source, csv_path, label_re) -> list[Path]:
    """Files in a folder of class folders that are not images (a CSV lists its own files)."""
    if root is None or csv_path is not None:
        return []
    found = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).parts
        if any(part.startswith(".") for part in relative) or not path.is_file() or is_image_file(path):
            continue
        if len(relative) > 1 or label_re:  # loose files beside class folders are not data
            found.append(path)
    return found


def _shown(path: Path, root: Path | None) -> str:
    try:
        return Path(path).resolve().relative_to(root).as_posix() if root else str(path)
    except ValueError:
        return str(path)


# --- the outputs: doctor.json and the HTML gallery --------------------------------------------------


def write_outputs(diagnosis: Diagnosis, out: str | Path, *, max_per_kind: int = 100) -> tuple[Path, Path]:
    """Write ``doctor.json`` and ``doctor.html`` (a self-contained gallery of the problems) into ``out``.

    Returns:
        The two paths.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out / "doctor.json", out / "doctor.html"
    json_path.write_text(json.dumps(diagnosis.to_json(), indent=1))
    html_path.write_text(gallery(diagnosis, max_per_kind=max_per_kind), encoding="utf-8")
    return json_path, html_path


def gallery(diagnosis: Diagnosis, *, max_per_kind: int = 100, thumb: int = 128) -> str:
    """The problems as one HTML page (``templates/doctor.html``), thumbnails embedded as JPEG data
    URIs so that nothing is fetched.

    Args:
        diagnosis: what :func:`diagnose` found.
        max_per_kind: problems shown of each kind (all are in ``doctor.json``).
        thumb: the thumbnails' longest side, in pixels.

    Returns:
        The page's HTML.
    """
    kinds = diagnosis.by_kind()
    sections = []
    for kind in [k for k in KINDS if kinds[k]]:
        shown = [p for p in diagnosis.problems if p.kind == kind][:max_per_kind]
        problems = [dict(detail=problem.detail, figures=[_figure(path, diagnosis.root, path in problem.fix, thumb)
                                                         for path in problem.files[:6]]) for problem in shown]
        sections.append(dict(kind=kind, count=kinds[kind], meaning=KINDS[kind], problems=problems,
                             more=max(0, kinds[kind] - max_per_kind)))
    return render("doctor.html", description=diagnosis.description, n_files=diagnosis.n_files,
                  counts=diagnosis.counts, sections=sections)


def _figure(path: Path, root: Path | None, fixed: bool, thumb: int) -> dict:
    """One picture of the gallery: its thumbnail (``None`` when unreadable), its name, whether --fix moves it."""
    return dict(src=jpeg_data_uri(path, thumb), caption=_shown(path, root), fixed=fixed)


# --- fixing: quarantine what the problems name ----------------------------------------------------


def fix(diagnosis: Diagnosis, kinds: Sequence[str] = DEFAULT_FIX) -> list[dict]:
    """Quarantine the files that the problems of ``kinds`` name to be moved (see :attr:`Problem.fix`).

    Returns:
        The moves made, as logged.
    """
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ImgtuneError(f"unknown problem kind {unknown[0]!r}; choose from {', '.join(KINDS)}")
    if diagnosis.root is None:
        raise ImgtuneError("a named dataset is read-only: copy its images into a folder to fix them")
    files = {path for p in diagnosis.problems if p.kind in kinds for path in p.fix}
    return quarantine(diagnosis.root, sorted(files), by=f"imgtune doctor --fix {','.join(kinds)}")
