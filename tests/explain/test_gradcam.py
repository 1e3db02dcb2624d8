"""Grad-CAM, through Interpretation and on its own: it finds the patch that decides the class, matches the
formula computed by hand, leaves the model as it was, and the overlay blends the heatmap over the picture."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from imgtune import ImageData, ImgtuneError, Item, Learner, create_model
from imgtune.data.transforms import valid_transform
from imgtune.explain import gradcam
from imgtune.explain.interpret import Interpretation

# --- through Interpretation ---------------------------------------------------------------------------------------

PATCH_COLOURS = {"red": (230, 20, 20), "blue": (20, 40, 230)}
QUADRANTS = [(0, 0), (1, 1), (0, 1), (1, 0)]  # (row, column) of 32x32 quadrants of a 64x64 image


def patch_image(colour, quadrant, rng) -> Image.Image:
    """64x64 grey noise with a 16x16 patch of ``colour`` somewhere inside ``quadrant``."""
    pixels = np.clip(128 + rng.normal(0, 30, (64, 64, 3)), 0, 255)
    y, x = quadrant[0] * 32 + rng.integers(0, 17), quadrant[1] * 32 + rng.integers(0, 17)
    pixels[y:y + 16, x:x + 16] = colour
    return Image.fromarray(pixels.astype(np.uint8))


def test_grad_cam_finds_the_patch_that_decides_the_class(tmp_path):
    """The class is the colour of a patch placed anywhere; the heatmap's peak must follow the patch
    into each quadrant. (A class decided by the patch's corner alone is learnt from where the patch
    is *not* as much as from where it is, so its heatmap says little.)"""
    rng = np.random.default_rng(0)
    train, valid = [], []
    for name, colour in PATCH_COLOURS.items():
        for i in range(24):
            path = tmp_path / f"{name}_{i}.png"
            patch_image(colour, QUADRANTS[rng.integers(0, 4)], rng).save(path)
            train.append(Item(path, name, "train"))
        for i in range(8):
            path = tmp_path / f"{name}_valid_{i}.png"
            patch_image(colour, QUADRANTS[i % 4], rng).save(path)
            valid.append(Item(path, name, "valid"))
    data = ImageData(classes=list(PATCH_COLOURS), train=train, valid=valid)
    learner = Learner.from_data(data, arch="test_resnet", weights="none", size=64, bs=8, augment=False,
                                num_workers=0, progress=False, device="cpu", bn_stats="train", seed=0)
    learner.unfreeze()
    learner.fit_one_cycle(6, 1e-2)
    interp = Interpretation.from_learner(learner)
    assert interp.accuracy >= 0.95

    found = []
    for i, item in enumerate(valid):
        heatmap = interp.grad_cam(item.path)
        assert heatmap.shape == (64, 64)
        row, column = np.unravel_index(heatmap.argmax(), heatmap.shape)
        found.append((row // 32, column // 32) == QUADRANTS[i % 4])
    assert sum(found) >= 15, found  # chance would find about 4 of 16

    # The heatmap is Grad-CAM's formula, computed here without hooks: layer4 ends forward_features.
    x = interp.transform(Image.open(valid[0].path).convert("RGB"))
    by_class = [interp.grad_cam(x, class_index) for class_index in range(2)]
    for class_index, heatmap in enumerate(by_class):
        np.testing.assert_allclose(heatmap, _grad_cam_by_hand(learner.model, x, class_index), atol=1e-4)
    np.testing.assert_array_equal(interp.grad_cam(x), by_class[0])  # the predicted class, red
    assert np.abs(by_class[0] - by_class[1]).max() > 0.5  # each class has its own evidence


def _grad_cam_by_hand(model: nn.Module, x: torch.Tensor, class_index: int) -> np.ndarray:
    model.eval()
    features = model.forward_features(x[None]).detach().requires_grad_(True)
    (gradients,) = torch.autograd.grad(model.forward_head(features.clone())[0, class_index], features)
    cam = (gradients.mean(dim=(2, 3))[0, :, None, None] * features[0].detach()).sum(0).clamp(min=0)
    cam = nn.functional.interpolate(cam[None, None], size=x.shape[1:], mode="bilinear", align_corners=False)[0, 0]
    cam = cam - cam.min()
    return (cam / cam.max() if cam.max() > 0 else cam).numpy()


@pytest.mark.parametrize("arch, layer", [("efficientnet_lite0", "conv_head"), ("resnet34", "layer4"),
                                         ("test_efficientnet", "blocks.4"), ("resnet10t", "layer4")])
def test_grad_cam_works_for_each_family(arch, layer):
    torch.manual_seed(0)
    model = create_model(arch, 3, weights="none").eval()
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    interp = Interpretation(["a", "b", "c"], np.zeros((0, 3)), np.zeros(0), model=model, arch=arch,
                            transform=valid_transform(32, "crop", mean, std), meta=dict(size=32, mean=mean, std=std))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    for class_index in (None, 2):
        heatmap = interp.grad_cam(image, class_index)
        assert heatmap.shape == (32, 32) and heatmap.dtype == np.float32
        assert heatmap.min() >= 0.0 and heatmap.max() <= 1.0 and np.isfinite(heatmap).all()
    assert not model.get_submodule(layer)._forward_hooks
    with pytest.raises(ImgtuneError, match="out of range"):
        interp.grad_cam(image, 3)


class ShiftInPlace(nn.Module):
    def forward(self, x):
        return x.sub_(x.mean())


def test_grad_cam_sees_the_layer_output_before_later_in_place_operations():
    torch.manual_seed(0)
    model = create_model("resnet10t", 3, weights="none").eval()
    model.global_pool = nn.Sequential(ShiftInPlace(), model.global_pool)  # alters layer4's output in place
    interp = Interpretation(["a", "b", "c"], np.zeros((0, 3)), np.zeros(0), model=model, arch="resnet10t")
    x = torch.randn(3, 64, 64)
    predicted = int(model(x[None]).argmax())
    np.testing.assert_allclose(interp.grad_cam(x), _grad_cam_by_hand(model, x, predicted), atol=1e-4)


def _no_hooks(model: nn.Module) -> bool:
    return not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                   for m in model.modules())


def test_grad_cam_leaves_the_model_as_it_was(tiny_learner, tiny_data):
    interp = Interpretation.from_learner(tiny_learner)
    model = interp.model
    model.train()  # a mode that differs from the eval mode Grad-CAM runs in
    model.get_submodule("bn1").eval()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    assert not all(flags) and any(flags)  # the learner starts with a frozen body
    modes = [m.training for m in model.modules()]

    path = tiny_data.valid[0].path
    with torch.no_grad():  # Grad-CAM needs gradients even when the caller turned them off
        heatmap = interp.grad_cam(path)

    assert heatmap.shape == (32, 32) and 0.0 <= heatmap.min() and heatmap.max() <= 1.0
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items())  # BatchNorm statistics included
    assert [p.requires_grad for p in model.parameters()] == flags
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())
    assert _no_hooks(model)


def test_grad_cam_takes_a_path_an_image_or_a_tensor_alike(tiny_learner, tiny_data):
    interp = Interpretation.from_learner(tiny_learner)
    path = tiny_data.valid[0].path
    from_path = interp.grad_cam(path)
    np.testing.assert_allclose(interp.grad_cam(Image.open(path)), from_path, atol=1e-5)
    np.testing.assert_allclose(interp.grad_cam(interp.transform(Image.open(path).convert("RGB"))), from_path, atol=1e-5)
    assert interp.grad_cam(path, class_index=0).shape == (32, 32)


def test_overlay_draws_the_heatmap_over_the_image_the_model_saw(tiny_learner, tiny_data, tmp_path):
    interp = Interpretation.from_learner(tiny_learner)
    path = tiny_data.valid[0].path  # 32x32, the model's size: the model sees it unchanged
    heatmap = np.tile(np.linspace(0, 1, 32, dtype=np.float32), (32, 1))
    picture = interp.overlay(path, heatmap)
    assert picture.mode == "RGB" and picture.size == (32, 32)
    plain = np.asarray(interp.overlay(path, heatmap, alpha=0.0)).astype(int)
    original = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert np.abs(plain - original).max() <= 1  # de-normalised correctly
    assert np.abs(np.asarray(picture).astype(int) - plain).mean() > 10

    red = np.asarray(interp.overlay(path, np.ones((32, 32)), alpha=0.25)).astype(float)
    jet_top = np.array([127.5, 0.0, 0.0])  # the "jet" colormap at 1.0 is dark red
    assert np.abs(red - (0.75 * plain + 0.25 * jet_top)).max() <= 1.0

    big = tmp_path / "big.png"
    Image.fromarray(np.full((60, 90, 3), 200, dtype=np.uint8)).save(big)
    assert interp.overlay(big, interp.grad_cam(big), cmap="inferno").size == (32, 32)


# --- the functions on their own --------------------------------------------------------------------


def test_grad_cam_of_a_model_and_layer_given_directly():
    torch.manual_seed(0)
    model = create_model("resnet10t", 3, weights="none").eval()
    x = torch.randn(3, 64, 64)
    for class_index in (0, 2):
        heatmap = gradcam.grad_cam(model, model.layer4, x, class_index)
        np.testing.assert_allclose(heatmap, _grad_cam_by_hand(model, x, class_index), atol=1e-4)
    assert _no_hooks(model)


def test_grad_cam_refuses_a_layer_whose_output_is_not_a_feature_map():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ImgtuneError, match="tiny: the Grad-CAM layer gives Tensor, not a 4-D tensor"):
        gradcam.grad_cam(model, model[2], torch.randn(3, 16, 16), name="tiny")
    assert _no_hooks(model)


def test_overlay_blends_and_resizes_the_heatmap_to_the_picture():
    picture = np.full((20, 30, 3), 100, dtype=np.uint8)
    assert np.array_equal(np.asarray(gradcam.overlay(picture, np.zeros((8, 8)), alpha=0.0)), picture)
    blended = gradcam.overlay(picture, np.ones((8, 8)), alpha=0.5)
    assert blended.mode == "RGB" and blended.size == (30, 20)
    np.testing.assert_allclose(np.asarray(blended)[0, 0], [113.75, 50, 50], atol=1)  # half jet's dark red
