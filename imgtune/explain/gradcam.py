"""Grad-CAM: where in an image the evidence for a class lies, and that heatmap drawn over the image.

:func:`grad_cam` hooks one layer of a model, runs one image forward and takes the gradient of a class
score with respect to that layer's activations; :func:`overlay` blends the heatmap over the picture.
:class:`~imgtune.explain.interpret.Interpretation` uses both with its model, transform and layer.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from imgtune.errors import ImgtuneError


def grad_cam(model: torch.nn.Module, layer: torch.nn.Module, x: torch.Tensor, class_index: int | None = None,
             *, name: str = "the model") -> np.ndarray:
    """Grad-CAM of one image: ``relu(sum_k w_k A_k)`` over the activations ``A_k`` of ``layer``.

    Each weight ``w_k`` is the spatial mean of the class score's gradient with respect to ``A_k``; the
    map is upsampled bilinearly to the input size and scaled to [0, 1] (all zeros when it is flat).

    The model is run in eval mode and each module's mode is restored afterwards; no hook stays
    behind, no parameter gets a ``.grad`` and no ``requires_grad`` flag changes.

    Args:
        model: the classifier; its output is ``(1, C)`` logits.
        layer: a module of ``model`` whose output is a 4-D ``(1, K, h, w)`` tensor.
        x: one transformed image, ``(3, H, W)``; it is moved to the model's device.
        class_index: the class to explain (default: the predicted class).
        name: what to call the model in an error message (its architecture).

    Returns:
        An ``(H, W)`` float32 array in [0, 1].

    Raises:
        ImgtuneError: the layer's output is not a 4-D tensor, or ``class_index`` is out of range.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = x.unsqueeze(0).to(device, memory_format=torch.channels_last)
    # The input asks for gradients so the activations have some even when the whole model is frozen.
    x.requires_grad_(True)
    captured = []

    def keep_activations(module, inputs, output):
        if not isinstance(output, torch.Tensor) or output.dim() != 4:
            raise ImgtuneError(f"{name}: the Grad-CAM layer gives {type(output).__name__}, not a 4-D tensor")
        captured.append(output)
        return output.clone()  # later in-place ops (an inplace ReLU) then cannot alter the captured tensor

    modes = {module: module.training for module in model.modules()}
    handle = layer.register_forward_hook(keep_activations)
    try:
        model.eval()
        with torch.enable_grad():
            logits = model(x)
            if class_index is None:
                class_index = int(logits[0].argmax())
            if not 0 <= class_index < logits.shape[1]:
                raise ImgtuneError(f"class_index {class_index} is out of range for {logits.shape[1]} classes")
            activations = captured[-1]
            # autograd.grad, unlike backward(), leaves every parameter's .grad untouched.
            (gradients,) = torch.autograd.grad(logits[0, class_index], activations)
    finally:
        handle.remove()
        for module, training in modes.items():
            module.training = training
    return _heatmap(activations, gradients, x.shape[-2:])


def _heatmap(activations: torch.Tensor, gradients: torch.Tensor, size) -> np.ndarray:
    """The weighted, rectified sum of the activations, upsampled to ``size`` and scaled to [0, 1]."""
    with torch.no_grad():
        weights = gradients.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * activations).sum(1, keepdim=True)).float()
        cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[0, 0]
        cam = cam - cam.min()
        top = cam.max()
        cam = cam / top if top > 0 else torch.zeros_like(cam)
    return cam.cpu().numpy().astype(np.float32)


def overlay(picture: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45, *, cmap: str = "jet") -> Image.Image:
    """``heatmap`` coloured with ``cmap`` and blended over ``picture``.

    Args:
        picture: an ``(H, W, 3)`` uint8 array, e.g. the image as the model saw it.
        heatmap: an ``(h, w)`` array in [0, 1] (values outside are clipped); resized bilinearly to
            ``(H, W)`` when it differs.
        alpha: the heatmap's weight in the blend (0 shows the picture alone).
        cmap: a matplotlib colormap name.

    Returns:
        An RGB PIL image of the picture's size.
    """
    from matplotlib import colormaps

    heatmap = np.clip(np.asarray(heatmap, dtype=np.float32), 0.0, 1.0)
    colours = (colormaps[cmap](heatmap)[..., :3] * 255).astype(np.uint8)
    if colours.shape[:2] != picture.shape[:2]:
        colours = np.asarray(Image.fromarray(colours).resize(picture.shape[1::-1], Image.BILINEAR))
    blended = (1 - alpha) * picture.astype(np.float32) + alpha * colours.astype(np.float32)
    return Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8), mode="RGB")
