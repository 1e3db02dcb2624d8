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


class ToNormalizedTensor:
    """A picture (PIL image, HxWxC uint8 array or CxHxW uint8 tensor) to a normalised float32 CxHxW tensor.

    The values of ``ToImage, ToDtype(float32, scale=True), Normalize(mean, std)`` to float rounding
    (about 1e-7), as one multiply and one add in place instead of three passes that each make a tensor
    through torchvision's tv_tensor dispatch: 0.37-0.54 ms instead of 0.7-1.4 ms for a 224 x 224 picture on
    one of our cores (``bench/speed.py deploy``, its ``preprocess_to_tensor_*`` figures).
    """

    def __init__(self, mean, std):
        mean = torch.as_tensor(mean, dtype=torch.float64).view(-1, 1, 1)
        std = torch.as_tensor(std, dtype=torch.float64).view(-1, 1, 1)
        if (std <= 0).any():
            raise ImgtuneError(f"normalisation std must be positive, not {std.flatten().tolist()}")
        self.scale = (1 / (255 * std)).float()  # (x / 255 - mean) / std = x * scale + shift
        self.shift = (-mean / std).float()

    def __call__(self, picture) -> torch.Tensor:
        return self.normalize(v2.functional.to_image(picture).as_subclass(torch.Tensor).contiguous())

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels (C x H x W, or a batch N x C x H x W, on any device) to normalised float32 there,
        in the pixels' memory format (channels_last stays so)."""
        return self.normalize_(pixels.to(torch.float32))

    def normalize_(self, values: torch.Tensor) -> torch.Tensor:
        """Float32 pixel values 0..255 normalised in place (and returned): the one definition of the
        arithmetic, so that every path (pictures, batches on a GPU, the feature extractor's buffers)
        gives the same bits."""
        if values.device != self.scale.device:
            self.scale, self.shift = self.scale.to(values.device), self.shift.to(values.device)
        return values.mul_(self.scale).add_(self.shift)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scale={self.scale.flatten().tolist()}, shift={self.shift.flatten().tolist()})"


def _to_tensor(mean, std, normalize: bool = True) -> list:
    if not normalize:  # a uint8 tensor, normalised later on the GPU (imgtune.data.loaders.DeviceNormalize)
        return [v2.ToImage()]
    return [ToNormalizedTensor(mean, std)]


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
