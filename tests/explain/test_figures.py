"""The figures: each plot_* gives a matplotlib Figure that pyplot does not hold, and figure_png turns any
figure into the PNG bytes (and file) that the report embeds."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from imgtune import ImgtuneError
from imgtune.explain.figures import (
    can_cam,
    denormalise,
    figure_png,
    plot_cam,
    plot_confusion_matrix,
    plot_results,
    plot_samples,
    plot_top_losses,
    plot_training,
)
from imgtune.explain.interpret import Interpretation

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


# --- the notebook figures: one per display method, drawn from a tiny random model ---------------


def _titles(fig) -> list[str]:
    return [ax.get_title() for ax in fig.axes if ax.get_title()]


def _images(fig) -> int:
    return sum(len(ax.get_images()) for ax in fig.axes)


@pytest.fixture
def tiny_interp(tiny_learner) -> Interpretation:
    return Interpretation.from_learner(tiny_learner)


def test_confusion_matrix_normalized_shows_fractions_of_each_actual_class():
    matrix = np.array([[3, 1], [0, 4]])
    counts = plot_confusion_matrix(matrix, ["a", "b"])
    fractions = plot_confusion_matrix(matrix, ["a", "b"], normalize=True)
    assert sorted(t.get_text() for t in counts.axes[0].texts) == ["1", "3", "4"]
    assert sorted(t.get_text() for t in fractions.axes[0].texts) == ["0.25", "0.75", "1.00"]
    np.testing.assert_allclose(fractions.axes[0].get_images()[0].get_array(), [[0.75, 0.25], [0, 1]])
    assert "fraction" in fractions.axes[0].get_title() and "fraction" not in counts.axes[0].get_title()


def test_training_curves_refuse_an_empty_history():
    with pytest.raises(ImgtuneError, match="no epoch trained yet"):
        plot_training([])


def test_top_losses_with_and_without_grad_cam(tiny_interp):
    assert can_cam(tiny_interp)
    with_cam = tiny_interp.plot_top_losses(4)
    assert isinstance(with_cam, Figure) and _images(with_cam) == 8  # picture + overlay per item
    assert _titles(with_cam).count("Grad-CAM") == 4
    worst = tiny_interp.top_losses(4)
    assert [t for t in _titles(with_cam) if t != "Grad-CAM"] == [
        f"{t.actual} / {t.predicted}\nloss {t.loss:.2f}, p {t.probability:.2f}" for t in worst]
    without = tiny_interp.plot_top_losses(4, cam=False)
    assert _images(without) == 4 and "Grad-CAM" not in _titles(without)
    assert _picture(figure_png(with_cam))


def test_top_losses_fall_back_to_pictures_when_the_model_has_no_cam_layer(tiny_interp):
    tiny_interp.arch = "not_a_registered_arch"
    tiny_interp.model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(3))  # no 4-D layer
    assert not can_cam(tiny_interp)
    assert _images(plot_top_losses(tiny_interp, 3)) == 3


def test_figures_of_images_need_the_image_paths(tiny_interp):
    tiny_interp.paths = []
    with pytest.raises(ImgtuneError, match="no image paths"):
        tiny_interp.plot_top_losses()
    with pytest.raises(ImgtuneError, match="no image paths"):
        plot_results(tiny_interp)


def test_results_title_predicted_and_actual_and_mark_the_wrong_ones_red(tiny_interp):
    fig = plot_results(tiny_interp, n=5, seed=1)
    titled = [ax for ax in fig.axes if ax.get_title()]
    assert len(titled) == 5 == _images(fig)
    picks = np.random.default_rng(1).permutation(len(tiny_interp.paths))[:5]
    for ax, i in zip(titled, picks):
        predicted, actual = tiny_interp.classes[tiny_interp.preds[i]], tiny_interp.classes[tiny_interp.targets[i]]
        assert ax.title.get_text() == f"{predicted} / {actual}"
        wrong = predicted != actual
        assert (ax.title.get_color() == "red") == wrong
        assert (ax.spines["left"].get_edgecolor() == (1.0, 0.0, 0.0, 1.0) and ax.axison) == wrong


def test_cam_shows_the_picture_and_the_overlay_of_the_class_asked_for(tiny_interp):
    path = tiny_interp.paths[0]
    probs = tiny_interp.probabilities(path)
    assert probs.shape == (3,) and probs.sum() == pytest.approx(1, abs=1e-5)
    predicted = int(probs.argmax())
    fig = tiny_interp.plot_cam(path)
    assert _images(fig) == 2
    assert _titles(fig) == [f"predicted {tiny_interp.classes[predicted]} ({probs[predicted]:.2f})",
                            f"Grad-CAM for {tiny_interp.classes[predicted]} ({probs[predicted]:.2f})"]
    other = (predicted + 1) % 3
    assert _titles(plot_cam(tiny_interp, path, other))[1].startswith(f"Grad-CAM for {tiny_interp.classes[other]} ")
    overlay = fig.axes[1].get_images()[0].get_array()
    assert overlay.shape[:2] == (32, 32)  # the model's input size
    assert _picture(figure_png(fig))


def test_learner_plot_losses_and_show_results(tiny_learner):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    tiny_learner.fit_one_cycle(2, 1e-2)
    fig = tiny_learner.plot_losses()
    loss_ax, acc_ax = fig.axes
    assert [line.get_label() for line in loss_ax.get_lines()] == ["train loss", "valid loss"]
    np.testing.assert_allclose(loss_ax.get_lines()[1].get_ydata(), [h["valid_loss"] for h in tiny_learner.history])
    np.testing.assert_allclose(acc_ax.get_lines()[0].get_ydata(), [100 * h["accuracy"] for h in tiny_learner.history])
    results = tiny_learner.show_results(4)
    assert len(_titles(results)) == 4 == _images(results)
    assert plt.get_fignums() == before
