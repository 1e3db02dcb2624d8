"""Decode one image file into an upright RGB picture, whatever its mode, or say why it cannot be read."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from imgtune.errors import UnreadableImageError, first_line

#: Above this many pixels a file is refused as a likely decompression bomb (PIL's own limit).
MAX_PIXELS = 89_478_485

#: The background that transparent pixels are composited onto.
BACKGROUND = (255, 255, 255)


def load_image(path: str | Path, *, min_size: int | None = None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open an image file as an upright RGB picture (see :func:`decode_image`).

    Raises:
        UnreadableImageError: the file is missing, empty, truncated, not an image or too large; the
            message starts with the file's name.
    """
    try:
        return decode_image(Path(path), min_size=min_size, max_pixels=max_pixels)
    except UnreadableImageError as error:
        raise UnreadableImageError(f"{path}: {error}", error.kind) from None


def decode_image(
    source: Path | bytes,
    *,
    min_size: int | None = None,
    max_pixels: int = MAX_PIXELS,
    formats: Sequence[str] | None = None,
) -> Image.Image:
    """Decode a file or bytes (an upload) into an upright RGB picture.

    EXIF orientation is applied, transparency is composited onto white and every PIL mode
    (L, LA, P, RGBA, CMYK, I;16, I, F, 1, ...) is turned into 8-bit RGB.

    Args:
        source: a file path or the encoded bytes.
        min_size: when given, a JPEG may be decoded at a reduced scale (in the DCT domain, which is
            much faster) as long as both sides stay at least this many pixels.
        max_pixels: images with more pixels than this are refused from their header, before decoding
            (PIL itself still refuses more than twice ``PIL.Image.MAX_IMAGE_PIXELS``).
        formats: PIL format names to accept (e.g. ``("JPEG", "PNG")``); ``None`` accepts any.

    Returns:
        A loaded ``PIL.Image.Image`` in mode ``RGB``.

    Raises:
        UnreadableImageError: with a ``kind`` (see there) and a one-line reason.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        size, opened = len(source), io.BytesIO(source)
    else:
        if not source.is_file():
            raise UnreadableImageError("no such file", "missing")
        size, opened = source.stat().st_size, source
    if size == 0:
        raise UnreadableImageError("empty file (0 bytes)", "empty")
    try:
        image = Image.open(opened, formats=formats)
    except UnidentifiedImageError:
        allowed = f"not an image in an allowed format ({', '.join(formats)})" if formats else None
        raise UnreadableImageError(allowed or "not an image file PIL can read", "format") from None
    except Image.DecompressionBombError as error:
        raise UnreadableImageError(f"too many pixels ({first_line(error)})", "pixels") from None
    except Exception as error:  # a header PIL cannot parse, whatever the decoder raises
        raise UnreadableImageError(f"cannot decode ({first_line(error)})") from None
    # The pixel limit is checked here, not by turning PIL's DecompressionBombWarning into an error:
    # warnings.catch_warnings() swaps process-wide state and is not thread-safe, and check_images
    # decodes from a thread pool, where it left that "error" filter installed after loading.
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise UnreadableImageError(
                f"{width}x{height} pixels is more than the limit of {max_pixels} (a possible decompression bomb)",
                "pixels",
            )
        try:
            if min_size and image.format == "JPEG":
                image.draft("RGB", (min_size, min_size))
            image.load()
            return to_rgb(ImageOps.exif_transpose(image))
        except Exception as error:  # truncated or corrupt data, in whatever way the decoder says so
            raise UnreadableImageError(f"cannot decode ({first_line(error)})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB without clipping high bit depths or losing transparency."""
    mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _composite(image.convert("RGBA"))
    # A palette index or a colour key marked transparent (PNG tRNS, GIF) is transparency too.
    if mode in ("P", "L", "RGB") and "transparency" in image.info:
        return _composite(image.convert("RGBA"))
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(image), mode), mode="L").convert("RGB")
    return image.convert("RGB")


def _composite(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Scale high-bit-depth pixel values to 0..255.

    16-bit modes are scaled by their bit depth (65535 -> 255), so a dark 16-bit image stays dark.
    32-bit integers are taken as 16-bit data when they fit (PNG 16-bit often opens as mode I).
    Floats in 0..1 are scaled by 255; other floats are clipped.
    """
    values = values.astype(np.float64)
    top = float(values.max(initial=0.0))
    if mode.startswith("I;16"):
        scale = 255.0 / 65535.0
    elif mode == "F":
        scale = 255.0 if top <= 1.0 else 1.0
    elif top <= 255:
        scale = 1.0
    elif top <= 65535:
        scale = 255.0 / 65535.0
    else:
        scale = 255.0 / top
    return np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
