"""The mislabel finder: flipped labels rank first, and each item is judged by a model that never saw it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import noisy_image
from imgtune.data.sources import Item
from imgtune.curate.mislabel import _fit_logistic, find_mislabels, out_of_fold_probs, rank_suspects

COLOURS4 = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "grey": (128, 128, 128)}
FLIPPED = [3, 57, 101, 150, 199]


def colour_items(tmp_path, n_per_class=50, size=16) -> list[Item]:
    """200 files, 4 easily separable classes; the labels of FLIPPED are changed to the next class."""
    names = list(COLOURS4)
    items = []
    for k, (name, colour) in enumerate(COLOURS4.items()):
        for i in range(n_per_class):
            path = tmp_path / f"{name}_{i}.png"
            noisy_image(colour, size, seed=1000 * k + i).save(path)
            items.append(Item(path, name))
    for index in FLIPPED:
        item = items[index]
        items[index] = Item(item.path, names[(names.index(item.label) + 1) % len(names)])
    return items


def image_statistics(paths) -> torch.Tensor:
    """Per-channel mean and standard deviation: enough to tell the colours apart."""
    rows = []
    for path in paths:
        from PIL import Image

        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255
        rows.append(np.concatenate([pixels.mean((0, 1)), pixels.std((0, 1))]))
    return torch.tensor(np.array(rows))


def test_flipped_labels_rank_in_the_top_ten(tmp_path):
    items = colour_items(tmp_path)
    suspects = find_mislabels(items, features=image_statistics, seed=0)
    assert len(suspects) == len(items)
    top = {s.index for s in suspects[:10]}
    assert set(FLIPPED) <= top
    first = suspects[0]
    assert first.index in FLIPPED and first.predicted != first.given and first.given_probability < 0.5
    assert first.path == items[first.index].path


def test_flipped_labels_rank_first_with_a_tiny_random_network(tmp_path):
    pytest.importorskip("imgtune.train.features")
    items = colour_items(tmp_path)
    suspects = find_mislabels(items, arch="test_efficientnet", weights="none", size=32, seed=0)
    assert set(FLIPPED) <= {s.index for s in suspects[:10]}


def test_probabilities_are_out_of_fold():
    # 60 random points in 100 dimensions with random labels: a model can fit any labelling of them,
    # so in-sample predictions are right; predictions from models that never saw an item are chance.
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(60, 100, generator=generator)
    y = torch.randint(0, 2, (60,), generator=generator)
    probs = out_of_fold_probs(x, y, k=5, seed=0, weight_decay=1e-4)
    assert probs.shape == (60, 2) and torch.allclose(probs.sum(1), torch.ones(60))
    assert (probs.argmax(1) == y).float().mean() < 0.7
    weight, bias = _fit_logistic(x, y, 2, 1e-4, 200)  # the same model, fitted on every item
    assert ((x @ weight + bias).argmax(1) == y).float().mean() > 0.95


def test_rank_suspects_orders_by_the_given_labels_probability():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    suspects = rank_suspects(probs, [0, 0, 1], classes=["cat", "dog"])
    assert [s.index for s in suspects] == [1, 2, 0]
    assert suspects[0].given == "cat" and suspects[0].predicted == "dog"
    assert suspects[0].given_probability == pytest.approx(0.2)
    assert suspects[0].predicted_probability == pytest.approx(0.8)


def test_bad_input_is_refused(tmp_path):
    with pytest.raises(ValueError, match="do not fit"):
        out_of_fold_probs(torch.zeros(3, 2), [0, 1])
    from imgtune.errors import ImgtuneError

    with pytest.raises(ImgtuneError, match="two classes"):
        find_mislabels([Item(tmp_path / "a.png", "a")], features=image_statistics)


@pytest.mark.slow
def test_flipped_labels_rank_first_with_real_imagenet_features(tmp_path):
    items = colour_items(tmp_path, size=64)
    suspects = find_mislabels(items, weights="imagenet", seed=0)  # efficientnet_lite0, offline weights
    assert set(FLIPPED) <= {s.index for s in suspects[:10]}
