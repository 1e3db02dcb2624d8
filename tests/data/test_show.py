"""ImageData.show_batch: the training pictures as the model sees them, seeded, without touching torch's
global generator or pyplot."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from imgtune.data.show import image_grid


def _pictures(fig) -> list[np.ndarray]:
    return [np.asarray(image.get_array()) for ax in fig.axes for image in ax.get_images()]


def test_show_batch_titles_each_picture_with_its_label(tiny_data):
    fig = tiny_data.show_batch(5, size=24)
    assert isinstance(fig, Figure)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    pictures = _pictures(fig)
    assert len(titles) == 5 == len(pictures)
    assert set(titles) <= set(tiny_data.classes)
    assert all(p.shape == (24, 24, 3) and p.dtype == np.uint8 for p in pictures)


def test_show_batch_is_seeded_and_leaves_the_global_generator_alone(tiny_data):
    state = torch.get_rng_state()
    first, again = tiny_data.show_batch(4, size=24, seed=3), tiny_data.show_batch(4, size=24, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    for a, b in zip(_pictures(first), _pictures(again)):
        np.testing.assert_array_equal(a, b)
    other = tiny_data.show_batch(4, size=24, seed=4)
    assert any(not np.array_equal(a, b) for a, b in zip(_pictures(first), _pictures(other)))


def test_show_batch_without_augmentation_is_the_resized_picture(tiny_data):
    fig = tiny_data.show_batch(len(tiny_data.train), augmented=False, size=32)  # the pictures are 32 px
    from imgtune.data.images import load_image

    originals = {tuple(np.asarray(load_image(item.path)).ravel()[:48]) for item in tiny_data.train}
    assert all(tuple(p.ravel()[:48]) in originals for p in _pictures(fig))
    augmented = tiny_data.show_batch(len(tiny_data.train), size=32)
    assert any(tuple(p.ravel()[:48]) not in originals for p in _pictures(augmented))


def test_the_grid_has_the_panels_asked_for():
    fig, axes = image_grid(7, columns=3)
    assert len(axes) == 9 and fig.get_size_inches().tolist() == pytest.approx([6.0, 6.6])
    assert not any(ax.axison for ax in axes)
