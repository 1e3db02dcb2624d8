"""Resizing and augmentation: from a presized picture to the normalised tensor a model takes."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from imgtune.errors import ImgtuneError

RESIZE_METHODS = ("crop", "squish", "pad")


class ResizeToFit:
    """Resize so the longer side is ``size`` (keeping the aspect ratio); padding then makes it square."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image):
        width, height = image.size
        scale = self.size / max(width, height)
        new = (max(1, round(height * scale)), max(1, round(width * scale)))
        return v2.functional.resize(image, list(new), antialias=True)


def resize_steps(size: int, resize: str) -> list:
    """The deterministic transforms that make any picture ``size`` x ``size`` by ``resize``
    (one of ``RESIZE_METHODS``)."""
    if resize == "crop":
        return [v2.Resize(size, antialias=True), v2.CenterCrop(size)]
    if resize == "squish":
        return [v2.Resize((size, size), antialias=True)]
    if resize == "pad":
        return [ResizeToFit(size), v2.CenterCrop(size)]  # CenterCrop pads a smaller image with black
    raise ImgtuneError(f"`resize` must be one of {', '.join(RESIZE_METHODS)}, not {resize!r}")


def _to_tensor(mean, std, normalize: bool = True) -> list:
    if not normalize:  # a uint8 tensor, normalised later on the GPU (imgtune.data.loaders.DeviceNormalize)
        return [v2.ToImage()]
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def tensor_transform(mean, std, *, normalize: bool = True) -> v2.Compose:
    """A picture (already presized, see :class:`ImageView`) to a normalised float tensor (``normalize=False``:
    a uint8 tensor)."""
    return v2.Compose(_to_tensor(mean, std, normalize))


def valid_transform(size: int, resize: str, mean, std) -> v2.Compose:
    """Deterministic: resize by ``resize`` to ``size`` x ``size``, then normalise."""
    return v2.Compose(resize_steps(size, resize) + _to_tensor(mean, std))


def train_transform(size: int, resize: str, mean, std, *, normalize: bool = True) -> v2.Compose:
    """Augmented: a random crop of 50-100% of the area (``crop``) or a zoom of up to 1.2x (``squish``,
    ``pad``), a horizontal flip, a rotation of up to 10 degrees, and brightness/contrast of +-20%;
    then normalised (``normalize=False``: a uint8 tensor)."""
    if resize == "crop":
        geometry = [v2.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True)]
    else:
        geometry = resize_steps(size, resize) + [v2.RandomAffine(degrees=0, scale=(1.0, 1.2))]
    return v2.Compose(
        geometry
        + [
            v2.RandomHorizontalFlip(),
            v2.RandomRotation(10),
            v2.ColorJitter(brightness=0.2, contrast=0.2),
        ]
        + _to_tensor(mean, std, normalize)
    )
