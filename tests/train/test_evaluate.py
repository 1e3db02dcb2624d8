"""Evaluation: the macro metrics on hand-made confusions, and test-time augmentation (picture + mirror)."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from imgtune import ImgtuneError, Learner
from imgtune.train import evaluate
from imgtune.train.device import Precision
from imgtune.train.features import FeatureDataset

CPU = dict(device=torch.device("cpu"), memory_format=torch.contiguous_format, precision=Precision(torch.device("cpu")))


def one_hot(preds: list[int], classes: int) -> torch.Tensor:
    return nn.functional.one_hot(torch.tensor(preds), classes).float()


def test_a_class_never_predicted_pulls_the_macro_figures_down():
    # Class 2 (two images) is never predicted: accuracy 75%, but the classes' mean recall is 2/3.
    targets = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    probs = one_hot([0, 0, 0, 0, 1, 1, 0, 0], 3)
    scores = evaluate.metrics(probs, targets, torch.zeros(8))
    assert scores["accuracy"] == pytest.approx(0.75) and scores["error_rate"] == pytest.approx(0.25)
    assert scores["balanced_accuracy"] == pytest.approx((1 + 1 + 0) / 3)
    # F1: class 0 precision 4/6 recall 1 -> 0.8; class 1 -> 1; class 2 -> 0.
    assert scores["macro_f1"] == pytest.approx((0.8 + 1 + 0) / 3)
    rows = evaluate.class_report(probs, targets, ["a", "b", "c"])
    assert [r["class"] for r in rows] == ["a", "b", "c", "macro avg"]
    assert [r["recall"] for r in rows[:3]] == pytest.approx([1, 1, 0])
    assert [r["precision"] for r in rows[:3]] == pytest.approx([4 / 6, 1, 0])
    assert [r["support"] for r in rows] == [4, 2, 2, 8]


def test_balanced_accuracy_leaves_out_a_class_without_validation_items():
    # Class 2 has no validation image but is predicted once: its recall is undefined, not 0 (as
    # scikit-learn's balanced_accuracy_score); macro F1 counts it (F1 0), as the classification report does.
    targets = torch.tensor([0, 0, 1, 1])
    probs = one_hot([0, 2, 1, 1], 3)
    scores = evaluate.metrics(probs, targets, torch.zeros(4))
    assert scores["balanced_accuracy"] == pytest.approx((0.5 + 1) / 2)
    assert scores["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)


def test_a_perfect_model_scores_one_everywhere():
    targets = torch.tensor([2, 0, 1, 1])
    scores = evaluate.metrics(one_hot([2, 0, 1, 1], 3), targets, torch.zeros(4))
    assert scores["balanced_accuracy"] == 1.0 and scores["macro_f1"] == 1.0 and scores["accuracy"] == 1.0


def test_class_lines_show_the_macro_figures_and_each_class():
    metrics = dict(balanced_accuracy=0.5, macro_f1=0.4,
                   per_class=[dict(**{"class": "likely_defective"}, precision=0.0, recall=0.0, f1=0.0, support=12),
                              dict(**{"class": "ok"}, precision=0.9, recall=1.0, f1=0.947, support=30)])
    lines = evaluate.class_lines(metrics)
    assert lines[0] == "balanced accuracy 50.00% (mean recall per class), macro F1 0.400"
    assert lines[2].split() == ["likely_defective", "0.000", "0.000", "0.000", "12"]
    assert lines[3].split() == ["ok", "0.900", "1.000", "0.947", "30"]
    assert evaluate.class_lines({"valid_accuracy": 1.0}) == []


class Pooled(nn.Module):
    """Global average pooling then a linear layer: the same output for a picture and its mirror."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 4)

    def forward(self, x):
        return self.linear(x.mean((2, 3)))


def picture_loader(n: int = 10, classes: int = 4) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, 8, 8, generator=generator)
    return DataLoader(TensorDataset(images, torch.arange(n) % classes), batch_size=4)


def test_tta_of_a_flip_invariant_model_is_its_plain_prediction():
    torch.manual_seed(0)
    model, dl = Pooled(), picture_loader()
    plain = evaluate.predict(model, dl, **CPU)
    flipped = evaluate.predict(model, dl, **CPU, tta=True)
    for a, b in zip(plain, flipped):
        assert torch.allclose(a, b, atol=1e-6)


def test_tta_averages_the_probabilities_of_a_picture_and_its_mirror():
    torch.manual_seed(0)
    model, dl = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4)), picture_loader()
    images, targets = dl.dataset.tensors
    with torch.no_grad():
        expected = (model(images).softmax(1) + model(images.flip(3)).softmax(1)) / 2
    probs, got_targets, losses = evaluate.predict(model, dl, **CPU, tta=True)
    assert torch.allclose(probs, expected, atol=1e-6) and torch.equal(got_targets, targets)
    assert torch.allclose(losses, -expected[torch.arange(len(targets)), targets].log(), atol=1e-5)
    plain = evaluate.predict(model, dl, **CPU)[0]
    assert not torch.allclose(plain, expected, atol=1e-3)  # the mirror does change this model's answer


def test_tta_on_cached_features_averages_the_two_views():
    torch.manual_seed(0)
    features, targets = torch.randn(6, 2, 5), [0, 1, 2, 0, 1, 2]
    head = nn.Linear(5, 3)
    both = DataLoader(FeatureDataset(features, targets, random_view=False, all_views=True), batch_size=4)
    with torch.no_grad():
        expected = (head(features[:, 0]).softmax(1) + head(features[:, 1]).softmax(1)) / 2
        first_view = head(features[:, 0]).softmax(1)
    assert torch.allclose(evaluate.predict(head, both, **CPU, tta=True)[0], expected, atol=1e-6)
    one = DataLoader(FeatureDataset(features, targets, random_view=False), batch_size=4)
    assert torch.allclose(evaluate.predict(head, one, **CPU)[0], first_view, atol=1e-6)


def test_tta_refuses_to_flip_what_is_not_a_picture_batch():
    one = DataLoader(FeatureDataset(torch.randn(4, 2, 5), [0, 1, 0, 1], random_view=False), batch_size=4)
    with pytest.raises(ImgtuneError, match="flips picture batches"):
        evaluate.predict(nn.Linear(5, 2), one, **CPU, tta=True)


@pytest.mark.parametrize("feature_cache", [True, False])
def test_a_learner_with_tta_validates_on_picture_and_mirror(tiny_data, feature_cache):
    learner = Learner.from_data(tiny_data, **TINY, tta=True, feature_cache=feature_cache)
    model = learner.model.eval()
    images = torch.stack([learner.valid_dl.dataset[i][0] for i in range(len(learner.valid_dl.dataset))]).float()
    with torch.no_grad():
        expected = (model(images).softmax(1) + model(images.flip(3)).softmax(1)) / 2
    probs, _, _ = learner.get_preds()
    # The cached features of the mirror come from ONNX Runtime or the flipped presized picture: close, not equal.
    assert torch.allclose(probs, expected, atol=1e-4)
    assert learner.config.tta == "flip" and "balanced_accuracy" in learner.validate()
    learner.tta = False
    assert not torch.allclose(learner.get_preds()[0], expected, atol=1e-6)
