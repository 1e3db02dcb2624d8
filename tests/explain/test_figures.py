"""The figures: each plot_* gives a matplotlib Figure that pyplot does not hold, and figure_png turns any
figure into the PNG bytes (and file) that the report embeds."""

from __future__ import annotations

import io

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

from imgtune.explain.figures import (
    denormalise,
    figure_png,
    plot_confusion_matrix,
    plot_samples,
    plot_training,
)

HISTORY = [dict(epoch=1, phase="frozen", train_loss=1.2, valid_loss=1.0, accuracy=0.5),
           dict(epoch=2, phase="unfrozen", train_loss=0.8, valid_loss=0.7, accuracy=0.75)]


def _picture(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    extrema = image.convert("L").getextrema()
    assert extrema[0] < extrema[1], "blank"
    return image


def test_figures_are_figures_that_pyplot_does_not_hold():
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    figures = [plot_training(HISTORY), plot_confusion_matrix(np.array([[3, 1], [0, 4]]), ["<b>", "a&b"])]
    assert all(isinstance(fig, Figure) for fig in figures)
    assert plt.get_fignums() == before
    assert _picture(figure_png(figures[0])).size == (1000, 380)  # 10 x 3.8 inches at 100 dpi


def test_figure_png_writes_the_file_and_closes_a_pyplot_figure(tmp_path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 2), dpi=100)
    ax.plot([0, 1], [1, 0])
    png = figure_png(fig, tmp_path / "line.png")
    assert (tmp_path / "line.png").read_bytes() == png
    assert _picture(png).size == (300, 200)
    assert fig.number not in plt.get_fignums()


def test_samples_are_drawn_de_normalised():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.2, 0.2)
    pixels = torch.rand(3, 8, 8)
    normalised = (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    back = denormalise(normalised, mean, std)
    assert back.shape == (8, 8, 3) and back.dtype == np.uint8
    np.testing.assert_allclose(back, np.rint(pixels.permute(1, 2, 0).numpy() * 255), atol=1)

    dataset = [(normalised, i % 2) for i in range(5)]
    fig = plot_samples(dataset, ["cat", "dog"], mean, std, n=4)
    titles = sorted(ax.get_title() for ax in fig.axes if ax.get_title())
    assert len(titles) == 4 and set(titles) <= {"cat", "dog"}
    _picture(figure_png(fig))
