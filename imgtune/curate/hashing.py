"""What one read of an image file tells the doctor: its content hash, size, colour and perceptual hash.

The content hash (SHA-256 of the bytes) finds exact copies; the perceptual hash (a 64-bit DCT
hash) finds resized or recompressed ones: such copies differ in few of its bits, different pictures
in about half.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from imgtune.data.images import decode_image
from imgtune.data.sources import Item
from imgtune.errors import UnreadableImageError

HASH_BITS = 64


@dataclass
class ImageInfo:
    """What one read of a file tells: content hash, size, colour, perceptual hash, or why it failed."""

    item: Item
    sha256: str = ""
    error: str | None = None
    width: int = 0
    height: int = 0
    grayscale: bool = False
    phash: int | None = None  # None for unreadable or flat images (their hashes say nothing)


def inspect_image(item: Item) -> ImageInfo:
    """Read one file: its content hash, then decode it for its size, colour and perceptual hash."""
    info = ImageInfo(item)
    try:
        data = item.path.read_bytes()
    except OSError as error:
        info.error = f"cannot read ({error.strerror or error})"
        return info
    info.sha256 = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as header:
            info.width, info.height = header.size
        image = decode_image(data, min_size=64)
    except UnreadableImageError as error:
        info.error = str(error)
        return info
    except Exception as error:  # whatever PIL raises for a header it cannot parse
        info.error = f"not an image file PIL can read ({type(error).__name__})"
        return info
    small = np.asarray(image.resize((32, 32), Image.BILINEAR), dtype=np.int16)
    info.grayscale = bool(np.abs(small[..., 0] - small[..., 1]).max() <= 6
                          and np.abs(small[..., 1] - small[..., 2]).max() <= 6)
    info.phash = perceptual_hash(image)
    return info


def perceptual_hash(image: Image.Image) -> int | None:
    """A 64-bit pHash: the signs of the 8x8 lowest frequencies of a 32x32 grayscale DCT against their median.

    Resizing and recompressing an image changes few of these bits; different pictures differ in
    about half. Returns ``None`` for a flat image (no detail to hash).
    """
    gray = np.asarray(image.convert("L").resize((32, 32), Image.LANCZOS), dtype=np.float64)
    if gray.std() < 1.0:
        return None
    low = (_DCT @ gray @ _DCT.T)[:8, :8].flatten()
    bits = low > np.median(low[1:])  # the DC term (overall brightness) would skew the median
    return int(np.packbits(bits.astype(np.uint8)).view(">u8")[0])


def _dct_matrix(n: int) -> np.ndarray:
    k, i = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    matrix = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
    matrix[0] /= np.sqrt(2.0)
    return matrix


_DCT = _dct_matrix(32)
