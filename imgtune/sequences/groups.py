"""Window predictions back to sessions: read a render manifest, predict its windows, score each group."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgtune.errors import ImgtuneError


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
    """A manifest's images and the group of each.

    Args:
        path: a ``manifest.csv`` with columns ``file`` (relative to its folder) and ``group``.

    Returns:
        ``{resolved image path: group}``.
    """
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
    """Predict every window file and combine the predictions of each group (see :func:`aggregate_windows`).

    Args:
        predictor: anything with ``classes`` and ``predict_files(files, bs=)``, such as the
            predictors of :func:`imgtune.deploy.predict.load_predictor`.
        files: the window images.
        groups: the group of each file.
        bs: images per batch.

    Returns:
        ``(scores, errors)``: the :class:`GroupScores` and the ``(file, error)`` pairs of unreadable files.
    """
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
