"""Test-time augmentation in the predictors: the mean of the softmax of each picture and its mirror."""

import json

import numpy as np
import pytest
import torch
from conftest import noisy_image
from PIL import Image
from torch import nn

from imgtune import ImgtuneError, Predictor
from imgtune.deploy.export import export_onnx
from imgtune.deploy.predict import OnnxPredictor, load_predictor

META = dict(classes=["a", "b", "c"], size=16, resize="squish", mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])


class LeftHalf(nn.Module):
    """Logits from the left half of the picture only: its mirror gives other logits."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 3)

    def forward(self, x):
        return self.linear(x[..., : x.shape[-1] // 2].mean((2, 3)))


class Pooled(nn.Module):
    """Logits from the whole picture's mean colour: its mirror gives the same."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 3)

    def forward(self, x):
        return self.linear(x.mean((2, 3)))


def pictures():
    return [noisy_image((200, 40 * i, 30), size=16, seed=i) for i in range(5)]


def with_gradient(image):
    """The picture brighter on its left than its right (so the halves differ)."""
    pixels = np.asarray(image).astype(float) * np.linspace(1.0, 0.2, image.width)[None, :, None]
    return pixels.astype(np.uint8)


def test_tta_of_a_mirror_symmetric_model_is_plain_prediction():
    torch.manual_seed(0)
    model = Pooled()
    plain = Predictor(model, META).predict(pictures()).probs
    np.testing.assert_allclose(Predictor(model, META, tta="flip").predict(pictures()).probs, plain, atol=1e-6)


def test_flip_tta_is_the_mean_of_the_softmax_of_picture_and_mirror():
    torch.manual_seed(0)
    model = LeftHalf()
    images = [with_gradient(p) for p in pictures()]
    plain, flip = Predictor(model, META, tta="none"), Predictor(model, META, tta="flip")
    batch = torch.stack([plain.transform(plain._as_image(image)) for image in images])
    with torch.no_grad():
        expected = (model(batch).softmax(1) + model(batch.flip(-1)).softmax(1)) / 2
    got = flip.predict(images, bs=2).probs
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-6)
    assert np.abs(got - plain.predict(images).probs).max() > 1e-3
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-6)


def test_predict_files_applies_tta(tmp_path):
    torch.manual_seed(0)
    model = LeftHalf()
    paths = []
    for i, image in enumerate(pictures()):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(with_gradient(image)).save(paths[-1])
    flip = Predictor(model, META, tta="flip")
    rows = np.concatenate([prediction.probs for _, prediction, _ in flip.predict_files(paths, bs=2)])
    np.testing.assert_allclose(rows, flip.predict(paths).probs, atol=1e-6)


def test_the_bundles_tta_is_the_default_and_can_be_overridden(tiny_learner, tmp_path):
    tiny_learner.save(tmp_path / "run")
    assert Predictor.load(tmp_path / "run").tta == "none"
    meta_path = tmp_path / "run" / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["tta"] = "flip"
    meta_path.write_text(json.dumps(meta))
    export_onnx(tmp_path / "run")
    assert Predictor.load(tmp_path / "run").tta == "flip"
    onnx = load_predictor(tmp_path / "run")
    assert isinstance(onnx, OnnxPredictor) and onnx.tta == "flip"
    assert load_predictor(tmp_path / "run", tta="none").tta == "none"
    paths = [item.path for item in tiny_learner.valid_dl.dataset.items]
    np.testing.assert_allclose(onnx.predict(paths).probs, Predictor.load(tmp_path / "run").predict(paths).probs,
                               atol=1e-4)
    with pytest.raises(ImgtuneError, match="unknown tta 'mirror'"):
        load_predictor(tmp_path / "run", tta="mirror")
    meta["tta"] = "sideways"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ImgtuneError, match="unknown tta 'sideways'"):
        Predictor.load(tmp_path / "run")
