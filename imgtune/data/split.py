"""Split items into train and valid: a split the data gives, a seeded random or stratified one, or whole groups."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from imgtune.data.sources import Item
from imgtune.errors import ImgtuneError


def split_items(
    items: Sequence[Item], *, valid_pct: float = 0.2, stratify: bool = False, seed: int = 42
) -> tuple[list[Item], list[Item]]:
    """Split items into train and valid.

    If every item carries a split (class folders under train/valid, or a CSV split column), that
    split is kept. Otherwise a seeded random ``valid_pct`` goes to valid; with ``stratify`` each class
    contributes ``valid_pct`` of its own items (rounded, and at least one each side when it has two).
    When items carry a ``group``, whole groups go to one side, ``valid_pct`` of each class's groups
    (a group's class is its most common label; an item without a group is a group of its own).

    Args:
        items: the items to split.
        valid_pct: the fraction held out, between 0 and 1 (exclusive).
        stratify: hold out ``valid_pct`` of each class rather than of all items.
        seed: seeds the random choice; the same seed and items give the same split.

    Returns:
        ``(train, valid)``, each in the order of ``items``.
    """
    given = [item.split for item in items]
    if all(split is not None for split in given):
        return [i for i in items if i.split == "train"], [i for i in items if i.split == "valid"]
    if any(split is not None for split in given):
        raise ImgtuneError("some items have a train/valid split and some do not; give it for all or none")
    if not 0.0 < valid_pct < 1.0:
        raise ImgtuneError(f"`valid_pct` must be between 0 and 1 (exclusive), not {valid_pct}")
    if any(item.group is not None for item in items):
        return _split_groups(items, valid_pct=valid_pct, seed=seed)
    rng = np.random.default_rng(seed)
    if not stratify:
        order = rng.permutation(len(items))
        n_valid = int(round(valid_pct * len(items)))
        valid_idx = set(order[:n_valid].tolist())
    else:
        by_class: dict[str, list[int]] = {}
        for index, item in enumerate(items):
            by_class.setdefault(item.label, []).append(index)
        valid_idx = _pick_per_class(by_class, valid_pct, rng)
    train = [item for i, item in enumerate(items) if i not in valid_idx]
    valid = [item for i, item in enumerate(items) if i in valid_idx]
    return train, valid


def _split_groups(items: Sequence[Item], *, valid_pct: float, seed: int) -> tuple[list[Item], list[Item]]:
    """Whole groups to valid: ``valid_pct`` of each class's groups, at least one each side when it has two."""
    members: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        members.setdefault(item.group if item.group is not None else f"\0{item.path}", []).append(index)
    by_class: dict[str, list[str]] = {}
    for group, indices in members.items():
        label = Counter(items[i].label for i in indices).most_common(1)[0][0]
        by_class.setdefault(label, []).append(group)
    sorted_groups = {label: sorted(groups) for label, groups in by_class.items()}
    valid_groups = _pick_per_class(sorted_groups, valid_pct, np.random.default_rng(seed))
    in_valid = {i for group in valid_groups for i in members[group]}
    return ([item for i, item in enumerate(items) if i not in in_valid],
            [item for i, item in enumerate(items) if i in in_valid])


def _pick_per_class(by_class: dict[str, list], valid_pct: float, rng: np.random.Generator) -> set:
    """``valid_pct`` of each class's members, drawn at random class by class (in sorted order).

    Each class gives ``valid_pct`` of its members, rounded, but at least one to each side when it
    has two or more; a class of one stays in train.
    """
    chosen = set()
    for label in sorted(by_class):
        members = by_class[label]
        order = rng.permutation(len(members))
        n_valid = int(round(valid_pct * len(members)))
        if len(members) >= 2:
            n_valid = min(max(n_valid, 1), len(members) - 1)
        chosen.update(members[i] for i in order[:n_valid])
    return chosen
