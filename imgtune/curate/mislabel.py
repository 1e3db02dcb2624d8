"""Find images whose label is probably wrong: out-of-fold predictions on cached backbone features.

Each image is predicted by a model that never saw it: the images are cut into ``k`` folds
(stratified by label), and a multinomial logistic regression trained on the other folds' features
gives the probabilities of the held-out fold. An image whose given label gets a low out-of-fold
probability is a suspect: either it is mislabelled, or it is unusual for its class. Logistic
regression on frozen ImageNet features is cheap (seconds for thousands of images once the features
are cached) and, on data a pretrained network separates well, a good judge of labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.nn import functional as F

from imgtune.errors import ImgtuneError


@dataclass
class Suspect:
    """One image and how unlikely the out-of-fold model finds its label."""

    index: int  # position in the features / labels given
    path: Path | None
    given: str
    predicted: str
    given_probability: float
    predicted_probability: float
    probabilities: dict[str, float] = field(default_factory=dict)  # of every class


def out_of_fold_probs(
    features: torch.Tensor,
    labels: Sequence[int] | torch.Tensor,
    *,
    k: int = 5,
    seed: int = 0,
    weight_decay: float = 1e-2,
    max_iter: int = 200,
    num_classes: int | None = None,
) -> torch.Tensor:
    """Class probabilities of every item from a logistic regression trained without it.

    Args:
        features: ``(N, F)`` features, one row per item.
        labels: ``(N,)`` class indices.
        k: folds (at most N); each item is predicted by the model of the other ``k - 1`` folds.
        seed: seeds the assignment of items to folds.
        weight_decay: L2 penalty on the weights (on standardised features), per item.
        max_iter: L-BFGS iterations per fold.
        num_classes: columns of the result (default: the largest label + 1).

    Returns:
        ``(N, C)`` float32 probabilities; row ``i`` never depends on ``labels[i]``.
    """
    x = torch.as_tensor(features).detach().float().cpu()
    y = torch.as_tensor(labels, dtype=torch.long).cpu()
    if x.dim() != 2 or len(x) != len(y):
        raise ValueError(f"features {tuple(x.shape)} and labels ({len(y)},) do not fit: give (N, F) and (N,)")
    n = len(y)
    classes = num_classes if num_classes is not None else (int(y.max()) + 1 if n else 0)
    k = max(2, min(k, n))
    folds = _stratified_folds(y, k, seed)
    probs = torch.zeros(n, classes)
    for fold in range(k):
        held_out = folds == fold
        train = ~held_out
        if not held_out.any():
            continue
        mean, std = x[train].mean(0), x[train].std(0, unbiased=False).clamp_min(1e-6)
        weight, bias = _fit_logistic((x[train] - mean) / std, y[train], classes, weight_decay, max_iter)
        with torch.no_grad():
            probs[held_out] = F.softmax((x[held_out] - mean) / std @ weight + bias, dim=1)
    return probs


def _stratified_folds(y: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """A fold number per item; each class is dealt round the folds in a random order."""
    generator = torch.Generator().manual_seed(seed)
    folds = torch.empty(len(y), dtype=torch.long)
    offset = 0
    for label in torch.unique(y):
        members = torch.nonzero(y == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        folds[members] = (torch.arange(len(members)) + offset) % k
        offset += len(members)  # the next class starts where this one ended, so folds stay even
    return folds


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, classes: int, weight_decay: float, max_iter: int):
    weight = torch.zeros(x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def rank_suspects(
    probs: torch.Tensor,
    labels: Sequence[int] | torch.Tensor,
    classes: Sequence[str] | None = None,
    paths: Sequence[str | Path] | None = None,
) -> list[Suspect]:
    """Every item, the least likely given label first (ties in the order given).

    Args:
        probs: ``(N, C)`` out-of-fold probabilities (see :func:`out_of_fold_probs`).
        labels: ``(N,)`` given class indices.
        classes: class names for the columns (default: their numbers).
        paths: the items' files, if known.

    Returns:
        A list of :class:`Suspect`, most suspicious first.
    """
    probs = torch.as_tensor(probs).float()
    y = torch.as_tensor(labels, dtype=torch.long)
    names = list(classes) if classes is not None else [str(c) for c in range(probs.shape[1])]
    given = probs[torch.arange(len(y)), y]
    predicted = probs.argmax(1)
    order = sorted(range(len(y)), key=lambda i: (float(given[i]), i))
    return [Suspect(index=i, path=Path(paths[i]) if paths is not None else None, given=names[int(y[i])],
                    predicted=names[int(predicted[i])], given_probability=float(given[i]),
                    predicted_probability=float(probs[i, predicted[i]]),
                    probabilities=dict(zip(names, probs[i].tolist()))) for i in order]


def find_mislabels(
    items: Sequence,
    *,
    features: Callable[[list[Path]], torch.Tensor] | None = None,
    k: int = 5,
    seed: int = 0,
    **feature_options,
) -> list[Suspect]:
    """Rank labelled images (``imgtune.data.sources.Item``) by how unlikely an out-of-fold model finds their label.

    Args:
        items: objects with ``path`` and ``label``.
        features: a function from file paths to ``(N, F)`` features; default
            :func:`imgtune.train.features.imagenet_features` (frozen ImageNet backbone, cached on disk)
            called with ``feature_options`` (``arch``, ``weights``, ``size``, ``progress``, ...).
        k, seed: folds and their seed (see :func:`out_of_fold_probs`).

    Returns:
        Every item as a :class:`Suspect`, most suspicious first.
    """
    if not items:
        return []
    classes = sorted({item.label for item in items})
    if len(classes) < 2:
        raise ImgtuneError("finding mislabels needs at least two classes")
    paths = [Path(item.path) for item in items]
    if features is None:
        from imgtune.train.features import imagenet_features

        values = imagenet_features(paths, **feature_options)
    else:
        values = features(paths)
    index = {c: i for i, c in enumerate(classes)}
    labels = torch.tensor([index[item.label] for item in items])
    probs = out_of_fold_probs(values, labels, k=k, seed=seed, num_classes=len(classes))
    return rank_suspects(probs, labels, classes, paths)
