"""Splitting items into train and valid: seeded, stratified, given by the data, or by whole groups."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from imgtune.data.sources import Item
from imgtune.data.split import split_items
from imgtune.errors import ImgtuneError


def items(labels: dict[str, int]) -> list[Item]:
    """Fake items (no files): ``n`` per label."""
    return [Item(Path(f"{label}_{i}.png"), label) for label, n in labels.items() for i in range(n)]


def test_random_split_is_seeded():
    found = items({"a": 30, "b": 20})
    first = split_items(found, valid_pct=0.2, seed=7)
    assert split_items(found, valid_pct=0.2, seed=7) == first
    assert split_items(found, valid_pct=0.2, seed=8)[1] != first[1]


@pytest.mark.parametrize("n, valid_pct", [(50, 0.2), (10, 0.25), (7, 0.5), (3, 0.1), (101, 0.33)])
def test_random_split_holds_out_round_valid_pct_of_the_items(n, valid_pct):
    found = items({"a": n - n // 2, "b": n // 2})
    train, valid = split_items(found, valid_pct=valid_pct, seed=0)
    assert len(valid) == round(valid_pct * n)
    assert sorted(map(str, (i.path for i in train + valid))) == sorted(str(i.path) for i in found)


def test_stratified_split_gives_each_class_its_share():
    found = items({"a": 10, "b": 20, "c": 5, "d": 2, "e": 1})
    train, valid = split_items(found, valid_pct=0.2, stratify=True, seed=3)
    # round(20% of each class), but at least one on each side for a class of two; a single image trains.
    assert Counter(i.label for i in valid) == {"a": 2, "b": 4, "c": 1, "d": 1}
    assert Counter(i.label for i in train) == {"a": 8, "b": 16, "c": 4, "d": 1, "e": 1}
    assert split_items(found, valid_pct=0.2, stratify=True, seed=3) == (train, valid)
    assert split_items(found, valid_pct=0.2, stratify=True, seed=4) != (train, valid)


def test_given_split_is_kept():
    found = [Item(Path(f"{i}.png"), "ab"[i % 2], "valid" if i < 3 else "train") for i in range(10)]
    train, valid = split_items(found, valid_pct=0.5, stratify=True, seed=1)
    assert [i.path.name for i in valid] == ["0.png", "1.png", "2.png"]
    assert len(train) == 7 and all(i.split == "train" for i in train)


def test_mixed_given_and_missing_split_is_an_error():
    found = items({"a": 3, "b": 3}) + [Item(Path("x.png"), "a", "train")]
    with pytest.raises(ImgtuneError, match="some items"):
        split_items(found)


@pytest.mark.parametrize("valid_pct", [0.0, 1.0, -0.1, 1.5])
def test_invalid_valid_pct_is_an_error(valid_pct):
    with pytest.raises(ImgtuneError, match="`valid_pct`"):
        split_items(items({"a": 5, "b": 5}), valid_pct=valid_pct)


def test_group_split_never_leaks_a_session():
    items = [Item(Path(f"u{u}_s{s}_w{w}.png"), f"u{u}", group=f"u{u}/s{s}")
             for u in range(4) for s in range(5) for w in range(1 + (u + s) % 4)]
    for seed in range(20):
        train, valid = split_items(items, valid_pct=0.2, seed=seed)
        assert len(train) + len(valid) == len(items)
        assert not {i.group for i in train} & {i.group for i in valid}
        # stratified: one of each user's five sessions held out
        assert sorted(i.label for i in {i.group: i for i in valid}.values()) == ["u0", "u1", "u2", "u3"]
    assert split_items(items, valid_pct=0.2, seed=3) == split_items(items, valid_pct=0.2, seed=3)


def test_items_without_groups_split_as_before():
    items = [Item(Path(f"{i}.png"), "ab"[i % 2]) for i in range(20)]
    train, valid = split_items(items, valid_pct=0.25, seed=1)
    rng = np.random.default_rng(1)
    expected = {items[i] for i in rng.permutation(20)[:5]}
    assert set(valid) == expected and len(train) == 15
