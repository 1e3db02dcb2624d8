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

#: Pixels of a high-bit-depth image converted to 8 bits at a time (see :func:`_high_bit_depth_to_uint8`).
STRIP_PIXELS = 1 << 20


def load_image(path: str | Path, *, min_size: int | None = None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open an image file as an upright RGB picture (see :func:`decode_image`).

    Args:
        path: the image file.
        min_size: decode a JPEG at a reduced scale whose shorter side is still at least this (faster).
        max_pixels: refuse larger images (decompression bombs).

    Returns:
        A PIL image in RGB mode, EXIF orientation applied.

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
            # In place: without an EXIF orientation a copy of the whole picture would be made for
            # nothing. Leaving `with` closes only the file, so `image` itself may be returned.
            ImageOps.exif_transpose(image, in_place=True)
            return to_rgb(image)
        except Exception as error:  # truncated or corrupt data, in whatever way the decoder says so
            raise UnreadableImageError(f"cannot decode ({first_line(error)})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB without clipping high bit depths or losing transparency."""
    mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _composite(image if mode == "RGBA" else image.convert("RGBA"))
    # A palette index or a colour key marked transparent (PNG tRNS, GIF) is transparency too.
    if mode in ("P", "L", "RGB") and "transparency" in image.info:
        return _composite(image.convert("RGBA"))
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_high_bit_depth_to_uint8(image)).convert("RGB")  # uint8 2-D: mode L
    return image.convert("RGB")


def _composite(rgba: Image.Image) -> Image.Image:
    # Pasting with the alpha channel as the mask blends in place into the RGB result: the same
    # values as Image.alpha_composite onto an opaque background, without its two RGBA copies.
    background = Image.new("RGB", rgba.size, BACKGROUND)
    background.paste(rgba, mask=rgba)
    return background


def _high_bit_depth_to_uint8(image: Image.Image) -> np.ndarray:
    """The grey levels 0..255 of an I, I;16 or F image, converted a strip of rows at a time.

    Memory: the uint8 result plus a few MB for one strip, whatever the image's size (converting the
    whole array at once in float64 took 8 bytes per pixel several times over: about 1.1 GB above the
    decoded picture for a 40 megapixel 16-bit PNG). Unsigned 16-bit values give exactly the float64
    result; 32-bit integers and floats are within one grey level of it (see :func:`_to_uint8`).
    """
    width, height = image.size
    rows = max(1, STRIP_PIXELS // max(width, 1))
    strips = [(top, min(top + rows, height)) for top in range(0, height, rows)]

    def strip(top: int, bottom: int) -> np.ndarray:
        return np.asarray(image.crop((0, top, width, bottom)))

    scale = _scale(image.mode, lambda: max((_largest(strip(*span)) for span in strips), default=0.0))
    # Unsigned 16-bit values (16-bit PNG and TIFF) go through a table of all 65536 levels, computed in
    # float64: the same result as converting every pixel in float64, in one cheap pass.
    table = np.clip(np.rint(np.arange(65536) * scale), 0, 255).astype(np.uint8)
    levels = np.empty((height, width), np.uint8)
    for top, bottom in strips:
        values = strip(top, bottom)
        if values.dtype.kind == "u" and values.dtype.itemsize == 2:
            np.take(table, values, out=levels[top:bottom])
        else:
            _to_uint8(values, scale, out=levels[top:bottom])
    return levels


def _largest(values: np.ndarray) -> float:
    """The largest value, NaN ignored (a NaN pixel becomes black and does not change the scale)."""
    if values.dtype.kind == "f":
        values = values[~np.isnan(values)]
    return float(values.max(initial=0.0))


def _scale(mode: str, largest) -> float:
    """The factor that maps a high-bit-depth mode's values to 0..255; ``largest()`` gives the image's maximum.

    16-bit modes are scaled by their bit depth (65535 -> 255), so a dark 16-bit image stays dark.
    32-bit integers are taken as 16-bit data when they fit (PNG 16-bit often opens as mode I).
    Floats in 0..1 are scaled by 255; other floats are taken as 0..255 (and clipped).
    """
    if mode.startswith("I;16"):
        return 255.0 / 65535.0
    top = largest()
    if mode == "F":
        return 255.0 if top <= 1.0 else 1.0
    if top <= 255:
        return 1.0
    if top <= 65535:
        return 255.0 / 65535.0
    return 255.0 / top


def _to_uint8(values: np.ndarray, scale: float, *, out: np.ndarray) -> None:
    """Write ``values * scale``, rounded and clipped to 0..255, into the uint8 array ``out``.

    float32 is exact for integers up to 2**24 and its rounding of the product moves a result by at
    most one grey level from a float64 conversion (only where the product is within ~1e-5 of .5).
    """
    work = values.astype(np.float32)
    np.multiply(work, np.float32(scale), out=work)
    np.rint(work, out=work)
    np.clip(work, 0, 255, out=work)
    np.nan_to_num(work, copy=False, nan=0.0)
    out[...] = work
