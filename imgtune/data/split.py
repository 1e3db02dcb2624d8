"""Split items into train and valid: a split the data gives, a seeded random or stratified one, or whole groups.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np

from imgtune.errors import ImgtuneError
from imgtune.data.sources import Item


def split_items(
    items: Sequence[Item], *, valid_pct: float = 0.2, stratify: bool = False, seed: int = 42
) -> tuple[list[Item], list[Item]]:
    """Split items into train and valid.

    If every item carries a split (class folders under train/valid, or a CSV split column), that
    split is kept. Otherwise a seeded random ``valid_pct`` goes to valid; with ``stratify`` each class
    contributes ``valid_pct`` of its own items (rounded, and at least one each side when it has two).
    When items carry a ``group``, whole groups go to one side, ``valid_pct`` of each class's groups
    (a group's class is its most common label; an item without a group is a group of its own).
    """
    given = [item.split for item in items]
    if all(split is not None for split in given):
        return [i for i in items if i.split == "train"], [i for i in items if i.split == "valid"]
    if any(split is not None for split in given):
        raise ImgtuneError("some items have a train/valid split and some do not; give it for all or none")
    if not 0.0 < valid_pct < 1.0:
        raise ImgtuneError(f"--valid-pct must be between 0 and 1 (exclusive), not {valid_pct}")
    if any(item.group is not None for item in items):
        return _split_groups(items, valid_pct=valid_pct, seed=seed)
    rng = np.random.default_rng(seed)
    if not stratify:
        order = rng.permutation(len(items))
        n_valid = int(round(valid_pct * len(items)))
        valid_idx = set(order[:n_valid].tolist())
    else:
        valid_idx = set()
        by_class: dict[str, list[int]] = {}
        for index, item in enumerate(items):
            by_class.setdefault(item.label, []).append(index)
        for label in sorted(by_class):
            indices = by_class[label]
            order = rng.permutation(len(indices))
            n_valid = int(round(valid_pct * len(indices)))
            if len(indices) >= 2:
                n_valid = min(max(n_valid, 1), len(indices) - 1)
            valid_idx.update(indices[i] for i in order[:n_valid])
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
    rng = np.random.default_rng(seed)
    valid_groups = set()
    for label in sorted(by_class):
        groups = sorted(by_class[label])
        order = rng.permutation(len(groups))
        n_valid = int(round(valid_pct * len(groups)))
        if len(groups) >= 2:
            n_valid = min(max(n_valid, 1), len(groups) - 1)
        valid_groups.update(groups[i] for i in order[:n_valid])
    in_valid = {i for group in valid_groups for i in members[group]}
    return ([item for i, item in enumerate(items) if i not in in_valid],
            [item for i, item in enumerate(items) if i in in_valid])
