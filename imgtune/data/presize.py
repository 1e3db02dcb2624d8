"""How a file becomes the picture the transforms start from, decoded and resized once (and cached)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision.transforms import v2

from imgtune.data.cache import ArrayStore, cache_root, file_key
from imgtune.data.images import MAX_PIXELS, load_image
from imgtune.data.transforms import resize_steps
from imgtune.errors import UnreadableImageError

#: The training view keeps this much more than the training size, so random crops stay sharp.
TRAIN_PRESIZE = 1.25


class ImageView:
    """How a file becomes the picture the transforms start from, decoded and resized once.

    ``kind="valid"``: exactly what the deterministic resize of ``resize`` gives (``size`` x ``size``),
    so a cached picture gives bit-identical tensors to decoding the file. ``kind="train"``: the image
    shrunk so its shorter side is ``TRAIN_PRESIZE * size`` (never enlarged), the start of the random
    crops of augmentation. JPEGs are decoded at a reduced scale (in the DCT domain) while both sides
    stay at least the size needed.

    ``cache_dir``: ``False`` decodes every time; ``None`` keeps pictures in the default cache folder;
    a path keeps them there (see :mod:`imgtune.data.cache`).
    """

    def __init__(self, size: int, resize: str = "crop", *, kind: str = "valid", cache_dir=None):
        if kind not in ("valid", "train"):
            raise ValueError(f"kind must be 'valid' or 'train', not {kind!r}")
        self.size, self.resize, self.kind = size, resize, kind
        self.min_side = size if kind == "valid" else math.ceil(TRAIN_PRESIZE * size)
        self.resizer = v2.Compose(resize_steps(size, resize)) if kind == "valid" else None
        self.name = f"{kind}-{size}-{resize}" if kind == "valid" else f"train-{self.min_side}"
        self.store = None if cache_dir is False else ArrayStore(cache_root(cache_dir) / "presized" / self.name)

    def __call__(self, path: str | Path) -> Image.Image:
        """The presized picture of the file at ``path`` (from the cache when there)."""
        if self.store is None:
            return self.make(load_image(path, min_size=self.min_side))
        return _from_array(self.array(path))

    def array(self, path: str | Path) -> np.ndarray:
        """The presized picture of the file at ``path`` as uint8 H x W x C, C being 3, or 1 for a grey
        picture (as cached; from the cache when there). No PIL image outlives the call: the feature
        extractor copies this straight into its batch buffer."""
        key = file_key(path) if self.store is not None else None
        if key is not None:
            cached = self.store.get(key)
            if cached is not None:
                return cached
        with load_image(path, min_size=self.min_side) as image:
            picture = self.make(image)
            array = _to_array(picture)
            picture.close()
        if key is not None:
            self.store.put(key, array)
        return array

    def ensure(self, path: str | Path, *, max_pixels: int = MAX_PIXELS) -> None:
        """Make sure the file's picture is cached, decoding it only if it is not (raises
        :class:`UnreadableImageError` for a bad file)."""
        if self.store is None:
            load_image(path, min_size=self.min_side, max_pixels=max_pixels)
            return
        try:
            key = file_key(path)
        except OSError:
            raise UnreadableImageError(f"{path}: no such file", "missing") from None
        if key not in self.store:
            with load_image(path, min_size=self.min_side, max_pixels=max_pixels) as image:
                picture = self.make(image)
                self.store.put(key, _to_array(picture))
                picture.close()  # its pixels now, not whenever the garbage collector gets to them

    def make(self, image: Image.Image) -> Image.Image:
        """The presized picture of a decoded ``image`` (see the class docstring)."""
        if self.resizer is not None:
            return self.resizer(image)
        short = min(image.size)
        if short <= self.min_side:
            return image
        return v2.functional.resize(image, [self.min_side], antialias=True)


def _to_array(picture: Image.Image) -> np.ndarray:
    """H x W x 3, or H x W x 1 for a grey picture (a third of the disk)."""
    array = np.asarray(picture)
    if (array[..., 0] == array[..., 1]).all() and (array[..., 0] == array[..., 2]).all():
        return array[..., :1].copy()  # not a view that keeps the three channels alive
    return array


def _from_array(array: np.ndarray) -> Image.Image:
    if array.shape[-1] == 1:
        return Image.fromarray(array[..., 0], mode="L").convert("RGB")
    return Image.fromarray(array, mode="RGB")
