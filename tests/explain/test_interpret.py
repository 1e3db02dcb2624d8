"""Interpretation: the confusion statistics on a hand-made example with known answers, predictions from a
learner and from a run folder, flat memory (Grad-CAM: test_gradcam.py)."""

from __future__ import annotations

import math
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from imgtune import ImageData, ImgtuneError, Item, Learner
from imgtune.explain.interpret import Interpretation, TopLoss
from imgtune.train.run import write_split

from conftest import TINY

# --- a hand-made example --------------------------------------------------------------------------
#
# 4 classes, 8 items; "owl" is in the model but neither in the data nor ever predicted.
#   item  actual  probabilities (cat, dog, fox, owl)  predicted  loss = -ln p(actual)
#   0     cat     .7 .2 .1 0                          cat        ln(1/.7)
#   1     cat     .6 .3 .1 0                          cat        ln(1/.6)
#   2     cat     .2 .5 .3 0                          dog        ln 5
#   3     dog     .1 .8 .1 0                          dog        ln(1/.8)
#   4     dog     .3 .3 .4 0                          fox        ln(1/.3)
#   5     dog     .1 .2 .7 0                          fox        ln 5
#   6     fox     .1 .1 .8 0                          fox        ln(1/.8)
#   7     fox     .2 .7 .1 0                          dog        ln 10

CLASSES = ["cat", "dog", "fox", "owl"]
PROBS = [[.7, .2, .1, 0], [.6, .3, .1, 0], [.2, .5, .3, 0], [.1, .8, .1, 0],
         [.3, .3, .4, 0], [.1, .2, .7, 0], [.1, .1, .8, 0], [.2, .7, .1, 0]]
TARGETS = [0, 0, 0, 1, 1, 1, 2, 2]


@pytest.fixture
def hand_made() -> Interpretation:
    return Interpretation(CLASSES, np.array(PROBS), np.array(TARGETS), paths=[f"img{i}.png" for i in range(8)])


def test_losses_default_to_the_cross_entropy_of_the_probabilities(hand_made):
    expected = -np.log([.7, .6, .2, .8, .3, .2, .8, .1])
    np.testing.assert_allclose(hand_made.losses, expected, rtol=1e-6)
    assert hand_made.losses.dtype == np.float32 and hand_made.probs.dtype == np.float32
    assert hand_made.targets.dtype == np.int64


def test_confusion_matrix_has_actual_rows_and_predicted_columns(hand_made):
    expected = [[2, 1, 0, 0],
                [0, 1, 2, 0],
                [0, 1, 1, 0],
                [0, 0, 0, 0]]
    np.testing.assert_array_equal(hand_made.confusion_matrix(), expected)


def test_most_confused_orders_by_count_then_names(hand_made):
    assert hand_made.most_confused() == [("dog", "fox", 2), ("cat", "dog", 1), ("fox", "dog", 1)]
    assert hand_made.most_confused(min_count=2) == [("dog", "fox", 2)]
    assert hand_made.most_confused(min_count=3) == []


def test_accuracy(hand_made):
    assert hand_made.accuracy == 0.5


def test_top_losses_come_highest_first_with_ties_in_order(hand_made):
    assert [t.index for t in hand_made.top_losses(k=8)] == [7, 2, 5, 4, 1, 0, 3, 6]
    worst = hand_made.top_losses(k=3)
    assert len(worst) == 3
    assert worst[0] == TopLoss(index=7, path=Path("img7.png"), actual="fox", predicted="dog",
                               probability=pytest.approx(.7), actual_probability=pytest.approx(.1),
                               loss=pytest.approx(math.log(10), rel=1e-6))
    assert (worst[1].actual, worst[1].predicted, worst[1].loss) == ("cat", "dog", pytest.approx(math.log(5), rel=1e-6))
    assert (worst[2].actual, worst[2].predicted, worst[2].probability) == ("dog", "fox", pytest.approx(.7))


def test_top_losses_keep_the_validation_order_among_equal_losses():
    probs = np.tile([0.3, 0.7], (40, 1))
    probs[::7] = [0.1, 0.9]  # items 0, 7, ..., 35 are the worst
    interp = Interpretation(["a", "b"], probs, np.zeros(40))
    assert [t.index for t in interp.top_losses(k=12)] == [0, 7, 14, 21, 28, 35, 1, 2, 3, 4, 5, 6]


def test_top_losses_without_paths_have_none():
    interp = Interpretation(CLASSES, np.array(PROBS), np.array(TARGETS))
    assert interp.top_losses(1)[0].path is None


def test_classification_report_per_class_and_macro_average(hand_made):
    rows = hand_made.classification_report()
    assert [r["class"] for r in rows] == ["cat", "dog", "fox", "owl", "macro avg"]
    expected = {
        "cat": (1.0, 2 / 3, 0.8, 3),
        "dog": (1 / 3, 1 / 3, 1 / 3, 3),
        "fox": (1 / 3, 1 / 2, 0.4, 2),
        "owl": (0.0, 0.0, 0.0, 0),
        # over the classes that occur: owl neither occurs nor is predicted
        "macro avg": (5 / 9, 0.5, (0.8 + 1 / 3 + 0.4) / 3, 8),
    }
    for row in rows:
        assert set(row) == {"class", "precision", "recall", "f1", "support"}
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx(expected[row["class"]])


def test_a_class_never_predicted_has_precision_zero():
    interp = Interpretation(["a", "b"], np.array([[.9, .1], [.6, .4]]), np.array([0, 1]))
    a, b, macro = interp.classification_report()
    assert (a["precision"], a["recall"], a["f1"]) == pytest.approx((0.5, 1.0, 2 / 3))
    assert (b["precision"], b["recall"], b["f1"], b["support"]) == (0.0, 0.0, 0.0, 1)
    assert macro["precision"] == pytest.approx(0.25)


def test_predictions_that_do_not_fit_the_classes_are_refused():
    with pytest.raises(ValueError):
        Interpretation(["a", "b", "c"], np.array(PROBS), np.array(TARGETS))
    with pytest.raises(ValueError):
        Interpretation(CLASSES, np.array(PROBS), np.array(TARGETS), paths=["one.png"])


# --- from a learner and from a run ----------------------------------------------------------------


def test_from_learner(tiny_learner, tiny_data):
    interp = Interpretation.from_learner(tiny_learner)
    n, c = len(tiny_data.valid), len(tiny_data.classes)
    assert interp.classes == tiny_data.classes
    assert interp.probs.shape == (n, c) and interp.targets.shape == (n,) and interp.losses.shape == (n,)
    np.testing.assert_allclose(interp.probs.sum(1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(interp.targets, [tiny_data.classes.index(i.label) for i in tiny_data.valid])
    picked = interp.probs[np.arange(n), interp.targets]
    np.testing.assert_allclose(interp.losses, -np.log(picked), rtol=1e-4, atol=1e-6)
    assert interp.paths == [item.path for item in tiny_data.valid]
    assert interp.accuracy == pytest.approx(tiny_learner.validate()["accuracy"])
    assert interp.arch == TINY["arch"]
    config = tiny_learner.config
    assert interp.meta == dict(size=32, resize="crop", mean=config["mean"], std=config["std"])
    assert interp.transform(Image.open(interp.paths[0])).shape == (3, 32, 32)
    assert interp.model is tiny_learner.model and not interp.model.training


@pytest.fixture
def run_dir(tiny_learner, tiny_data, tmp_path) -> Path:
    """A bundle of a briefly trained tiny learner, with its split.csv."""
    tiny_learner.unfreeze()
    tiny_learner.fit_one_cycle(1, 1e-2)
    tiny_learner.save(tmp_path / "run")
    write_split(tiny_data, tmp_path / "run" / "split.csv")
    return tmp_path / "run"


def test_from_run_matches_from_learner(run_dir, tiny_learner):
    expected = Interpretation.from_learner(tiny_learner)
    interp = Interpretation.from_run(run_dir, bs=4)
    assert interp.classes == expected.classes
    np.testing.assert_allclose(interp.probs, expected.probs, atol=1e-5)
    np.testing.assert_array_equal(interp.targets, expected.targets)
    np.testing.assert_allclose(interp.losses, expected.losses, atol=1e-4)
    assert [p.resolve() for p in interp.paths] == [p.resolve() for p in expected.paths]
    assert interp.meta == expected.meta and interp.arch == expected.arch
    assert not interp.model.training


def test_from_run_maps_a_subset_of_classes_in_another_order(run_dir, tiny_learner, tiny_data):
    expected = Interpretation.from_learner(tiny_learner)
    keep = [i for i, item in enumerate(tiny_data.valid) if item.label != "green"]
    data = ImageData(classes=["red", "blue"], train=[], valid=[tiny_data.valid[i] for i in keep])
    interp = Interpretation.from_run(run_dir, data)
    assert interp.classes == tiny_data.classes  # the model's classes, in its order
    np.testing.assert_array_equal(interp.targets, expected.targets[keep])
    np.testing.assert_allclose(interp.probs, expected.probs[keep], atol=1e-5)


def test_from_run_refuses_classes_the_model_lacks(run_dir, tiny_data):
    item = tiny_data.valid[0]
    data = ImageData(classes=[item.label, "zebra"], train=[], valid=[item, Item(item.path, "zebra", "valid")])
    with pytest.raises(ImgtuneError, match="not trained on: zebra"):
        Interpretation.from_run(run_dir, data)


def test_from_run_without_split_csv_says_so(run_dir):
    (run_dir / "split.csv").unlink()
    with pytest.raises(ImgtuneError, match="split.csv"):
        Interpretation.from_run(run_dir)


# --- memory -------------------------------------------------------------------------------------------


class NoiseImages(Dataset):
    """``n`` random 16x16 images made on the fly; batches are NumPy-backed so tracemalloc sees them."""

    def __init__(self, n: int):
        self.items = [Item(Path(f"image_{i}.png"), "ab"[i % 2]) for i in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return np.random.default_rng(index).random((3, 16, 16), dtype=np.float32), index % 2


def _collate(batch):
    images, labels = zip(*batch)
    return torch.from_numpy(np.stack(images)), torch.tensor(labels)


def _peak_memory(learner, n: int) -> tuple[int, Interpretation]:
    loader = DataLoader(NoiseImages(n), batch_size=50, collate_fn=_collate)
    tracemalloc.start()
    try:
        interp = Interpretation.from_learner(learner, loader)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak, interp


def test_memory_stays_flat_as_the_validation_set_grows():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    learner = Learner(model, None, None, classes=["a", "b"], device="cpu")
    small, _ = _peak_memory(learner, 150)
    large, interp = _peak_memory(learner, 600)
    all_images = 600 * 3 * 16 * 16 * 4  # 1.8 MB; a batch is 150 kB
    assert large < all_images / 2, (small, large)
    assert large < 1.5 * small, (small, large)  # holding the images would make it ~4x
    assert interp.probs.shape == (600, 2) and interp.losses.shape == (600,) and len(interp.paths) == 600
    arrays = [v for v in vars(interp).values() if isinstance(v, (np.ndarray, torch.Tensor))]
    assert sum(a.nbytes for a in arrays) == 600 * (2 * 4 + 8 + 4)


def test_most_confused_is_a_list_that_a_notebook_shows_as_an_escaped_table():
    classes = ["<script>x</script>", "b&c"]
    interp = Interpretation(classes, np.array([[0.2, 0.8], [0.9, 0.1], [0.3, 0.7]]), np.array([0, 1, 0]))
    pairs = interp.most_confused()
    assert pairs == [("<script>x</script>", "b&c", 2), ("b&c", "<script>x</script>", 1)]
    assert isinstance(pairs, list) and pairs[0][2] == 2 and pairs[:1] == [("<script>x</script>", "b&c", 2)]
    page = pairs._repr_html_()
    assert "<script>" not in page and page.count("&lt;script&gt;x&lt;/script&gt;") == 2
    assert page.count("b&amp;c") == 2 and ">2</td>" in page and ">1</td>" in page
    import json

    assert json.loads(json.dumps(pairs)) == [list(p) for p in pairs]


def test_the_figure_methods_return_figures(hand_made):
    from matplotlib.figure import Figure

    fig = hand_made.plot_confusion_matrix(normalize=True)
    assert isinstance(fig, Figure)
    assert fig.axes[0].get_images()[0].get_array()[1].tolist() == pytest.approx([0, 1 / 3, 2 / 3, 0])
    with pytest.raises(ImgtuneError, match="has no model"):
        hand_made.plot_cam(torch.zeros(3, 8, 8))
