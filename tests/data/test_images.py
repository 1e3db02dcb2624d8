"""load_image: every PIL mode becomes upright 8-bit RGB with the right pixel values, or a clear error."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from imgtune.data.sources import Item
from imgtune.data.loaders import check_images
from imgtune.errors import UnreadableImageError
from imgtune.data.images import load_image

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


def saved(tmp_path, image: Image.Image, name: str, **options):
    path = tmp_path / name
    image.save(path, **options)
    return path


def palette_image() -> Image.Image:
    """Two pixels: palette index 0 (red), index 1 (blue)."""
    image = Image.new("P", (2, 1))
    image.putpalette(list(RED) + list(BLUE) + [0] * (3 * 254))
    image.putpixel((1, 0), 1)
    return image


# --- modes ------------------------------------------------------------------------------------------


def test_rgb_is_returned_unchanged(tmp_path):
    values = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    loaded = load_image(saved(tmp_path, Image.fromarray(values), "rgb.png"))
    assert loaded.size == (7, 5)
    np.testing.assert_array_equal(np.asarray(loaded), values)


def test_grey_l_is_copied_to_three_channels(tmp_path):
    loaded = pixels(load_image(saved(tmp_path, Image.fromarray(np.array([[10, 200]], np.uint8)), "l.png")))
    np.testing.assert_array_equal(loaded, [[[10, 10, 10], [200, 200, 200]]])


def test_grey_with_alpha_la_is_composited_onto_white(tmp_path):
    image = Image.new("LA", (3, 1))
    image.putdata([(10, 255), (10, 0), (0, 128)])  # opaque dark, fully transparent, half-transparent black
    with Image.open(saved(tmp_path, image, "la.png")) as check:
        assert check.mode == "LA"
    loaded = pixels(load_image(tmp_path / "la.png"))
    np.testing.assert_array_equal(loaded[0, 0], [10, 10, 10])
    np.testing.assert_array_equal(loaded[0, 1], WHITE)
    assert np.all(np.abs(loaded[0, 2] - 127) <= 1)


def test_palette_without_transparency(tmp_path):
    loaded = pixels(load_image(saved(tmp_path, palette_image(), "p.png")))
    np.testing.assert_array_equal(loaded, [[RED, BLUE]])


@pytest.mark.parametrize("name", ["p.png", "p.gif"])
def test_palette_transparent_index_becomes_white(tmp_path, name):
    path = saved(tmp_path, palette_image(), name, transparency=1)
    with Image.open(path) as check:
        assert check.mode == "P" and "transparency" in check.info
    np.testing.assert_array_equal(pixels(load_image(path)), [[RED, WHITE]])


def test_rgba_transparent_pixels_are_composited_onto_white(tmp_path):
    image = Image.new("RGBA", (3, 1))
    image.putdata([(255, 0, 0, 255), (0, 255, 0, 0), (0, 0, 0, 128)])
    loaded = pixels(load_image(saved(tmp_path, image, "rgba.png")))
    np.testing.assert_array_equal(loaded[0, 0], RED)
    np.testing.assert_array_equal(loaded[0, 1], WHITE)  # not the hidden green, not black
    assert np.all(np.abs(loaded[0, 2] - 127) <= 1)


@pytest.mark.parametrize("mode, key", [("RGB", (10, 20, 30)), ("L", 77)])
def test_colour_key_transparency_is_composited_onto_white(tmp_path, mode, key):
    """A PNG tRNS colour key on an RGB or grey image marks those pixels transparent."""
    image = Image.new(mode, (2, 1), 0)
    image.putpixel((1, 0), key)
    loaded = pixels(load_image(saved(tmp_path, image, "key.png", transparency=key)))
    np.testing.assert_array_equal(loaded, [[(0, 0, 0), WHITE]])


@pytest.mark.parametrize("name", ["cmyk.jpg", "cmyk.tif"])
def test_cmyk_is_converted_to_rgb(tmp_path, name):
    path = saved(tmp_path, Image.new("CMYK", (4, 4), (0, 255, 255, 0)), name)  # no cyan, full magenta+yellow
    with Image.open(path) as check:
        assert check.mode == "CMYK"
    loaded = pixels(load_image(path))
    assert np.all(np.abs(loaded - RED) <= 3)


def test_16_bit_png_is_scaled_by_bit_depth_not_clipped(tmp_path):
    values = np.array([[65535, 4096, 0]], np.uint16)
    path = saved(tmp_path, Image.fromarray(values), "deep.png")
    with Image.open(path) as check:
        assert check.mode.startswith("I")  # a real 16-bit file, not an 8-bit one
    loaded = pixels(load_image(path))
    np.testing.assert_array_equal(loaded[0, 0], WHITE)
    np.testing.assert_array_equal(loaded[0, 1], [16, 16, 16])  # 4096 / 65535 * 255, dark, not 255
    np.testing.assert_array_equal(loaded[0, 2], [0, 0, 0])


def test_dark_16_bit_image_stays_dark(tmp_path):
    """Scaling uses the bit depth, not the image's own maximum: a dim picture is not stretched."""
    path = saved(tmp_path, Image.fromarray(np.full((3, 3), 4096, np.uint16)), "dim.png")
    np.testing.assert_array_equal(pixels(load_image(path)), np.full((3, 3, 3), 16))


@pytest.mark.parametrize(
    "values, expected",
    [
        ([[200, 10]], [200, 10]),  # 8-bit data in a 32-bit container is kept
        ([[65535, 4096]], [255, 16]),  # 16-bit data in a 32-bit container is scaled by 65535
        ([[1 << 20, 0]], [255, 0]),  # wider data is scaled by its maximum
    ],
)
def test_32_bit_integer_mode_i(tmp_path, values, expected):
    path = saved(tmp_path, Image.fromarray(np.array(values, np.int32)), "i.tif")
    with Image.open(path) as check:
        assert check.mode == "I"
    loaded = pixels(load_image(path))
    np.testing.assert_array_equal(loaded[0, :, 0], expected)
    np.testing.assert_array_equal(loaded[..., 0], loaded[..., 2])


@pytest.mark.parametrize(
    "values, expected",
    [
        ([[1.0, 0.5, 0.0]], [255, 128, 0]),  # floats in 0..1 are scaled by 255
        ([[300.0, 100.0, -5.0]], [255, 100, 0]),  # other floats are taken as 0..255 and clipped
    ],
)
def test_float_mode_f(tmp_path, values, expected):
    path = saved(tmp_path, Image.fromarray(np.array(values, np.float32)), "f.tif")
    with Image.open(path) as check:
        assert check.mode == "F"
    np.testing.assert_array_equal(pixels(load_image(path))[0, :, 1], expected)


def float64_reference(values: np.ndarray, mode: str) -> np.ndarray:
    """The conversion as it was done before strips and float32: the whole array at once in float64."""
    values = values.astype(np.float64)
    top = float(values.max(initial=0.0))
    if mode.startswith("I;16"):
        scale = 255.0 / 65535.0
    elif mode == "F":
        scale = 255.0 if top <= 1.0 else 1.0
    else:
        scale = 1.0 if top <= 255 else 255.0 / 65535.0 if top <= 65535 else 255.0 / top
    return np.clip(np.rint(values * scale), 0, 255).astype(int)


def high_bit_depth_cases() -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(4)
    every_16_bit_value = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    # Values whose scaled product lies next to a .5 boundary, where float32 may round differently.
    halves = (np.arange(255, dtype=np.float64) + 0.5) / 255
    near_halves = np.concatenate([halves, np.nextafter(halves, 0), np.nextafter(halves, 1)])
    floats_01 = np.concatenate([near_halves, [0.0, 1.0], rng.random(65536 - 767)]).astype(np.float32)
    floats_255 = np.concatenate([rng.uniform(-20, 300, 256 * 255), [255.0] * 256]).astype(np.float32)
    return [
        ("png I;16", every_16_bit_value),
        ("tif F 0..1", floats_01[: 256 * 256].reshape(256, 256)),
        ("tif F 0..255", floats_255.reshape(256, 256)),
        ("tif I 16-bit", rng.integers(0, 65536, (256, 256)).astype(np.int32)),
        ("tif I wide", rng.integers(-5, 1 << 30, (256, 256)).astype(np.int32)),
    ]


@pytest.mark.parametrize("case, values", high_bit_depth_cases(), ids=[c for c, _ in high_bit_depth_cases()])
def test_high_bit_depth_matches_a_float64_conversion_within_one_grey_level(tmp_path, monkeypatch, case, values):
    """Converted a strip of rows at a time in float32: within one grey level of the float64 result,
    with the scale taken from the whole image (the largest value sits in the last strip only)."""
    from imgtune.data import images

    monkeypatch.setattr(images, "STRIP_PIXELS", 256 * 7, raising=False)  # 7 rows a strip, the last shorter
    values = values.copy()
    if values.dtype != np.uint16:
        # Every strip but the last (rows 252..255) in the 0..1 or 0..255 range: scaled strip by strip,
        # they would come out 255 times too bright, or not dimmed at all.
        small = 1.0 if values.dtype.kind == "f" else 255.0
        values[:-4] = (values[:-4] * (small / float(values.max()))).astype(values.dtype)
    path = saved(tmp_path, Image.fromarray(values), "deep.png" if case.startswith("png") else "deep.tif")
    with Image.open(path) as check:
        mode = check.mode
        assert mode == case.split()[1]
    loaded = pixels(load_image(path))
    difference = np.abs(loaded[..., 0] - float64_reference(values, mode))
    assert difference.max() <= (0 if mode == "I;16" else 1)  # 16-bit levels go through a float64 table
    assert (difference > 0).mean() < 0.01  # the rare products next to .5, not a shifted scale
    np.testing.assert_array_equal(loaded[..., 0], loaded[..., 2])


def test_nan_pixels_become_black_and_do_not_change_the_scale(tmp_path):
    values = np.array([[0.5, np.nan, 1.0]], np.float32)
    loaded = pixels(load_image(saved(tmp_path, Image.fromarray(values), "nan.tif")))
    np.testing.assert_array_equal(loaded[0, :, 0], [128, 0, 255])


def test_high_bit_depth_conversion_needs_little_more_than_its_output(monkeypatch):
    """A 3-megapixel 16-bit picture: the numpy memory of the conversion stays under twice the 8-bit
    result (one uint8 plane and one strip), where the whole-array float64 conversion took ~24 bytes a pixel.
    tracemalloc sees numpy's buffers (and not Pillow's, which are the decoded and the RGB pictures)."""
    import tracemalloc

    from imgtune.data import images

    monkeypatch.setattr(images, "STRIP_PIXELS", 1 << 16, raising=False)  # raising: the old code had none
    width, height = 2048, 1536
    picture = Image.fromarray(np.random.default_rng(5).integers(0, 65536, (height, width)).astype(np.uint16))
    assert picture.mode == "I;16"
    tracemalloc.start()
    try:
        converted = images.to_rgb(picture)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert converted.mode == "RGB" and converted.size == (width, height)
    assert peak < 2 * width * height, f"{peak / 1e6:.1f} MB for a {width * height / 1e6:.1f} MB 8-bit plane"


@pytest.mark.parametrize("name", ["one.png", "one.bmp"])
def test_one_bit_mode(tmp_path, name):
    image = Image.new("1", (2, 1), 0)
    image.putpixel((0, 0), 1)
    path = saved(tmp_path, image, name)
    with Image.open(path) as check:
        assert check.mode == "1"
    np.testing.assert_array_equal(pixels(load_image(path)), [[WHITE, (0, 0, 0)]])


# --- orientation and draft ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "orientation, size, red_corner",
    [
        (1, (60, 40), (0, 0)),  # as stored: red top-left
        (3, (60, 40), (-1, -1)),  # rotated 180: bottom-right
        (6, (40, 60), (0, -1)),  # rotated 90 clockwise: top-right
        (8, (40, 60), (-1, 0)),  # rotated 90 counter-clockwise: bottom-left
    ],
)
def test_exif_orientation_is_applied(tmp_path, orientation, size, red_corner):
    stored = np.full((40, 60, 3), 128, np.uint8)  # 60 wide, 40 high
    stored[:10, :10] = RED
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = saved(tmp_path, Image.fromarray(stored), "photo.jpg", exif=exif, quality=95)
    loaded = load_image(path)
    assert loaded.size == size
    array = pixels(loaded)
    corners = {(0, 0): array[2, 2], (0, -1): array[2, -3], (-1, 0): array[-3, 2], (-1, -1): array[-3, -3]}
    for corner, value in corners.items():
        is_red = np.all(np.abs(value - RED) < 30)
        assert is_red == (corner == red_corner), f"corner {corner} is {value}"


@pytest.fixture
def big_jpeg(tmp_path):
    values = np.random.default_rng(1).integers(0, 256, (400, 600, 3), dtype=np.uint8)
    return saved(tmp_path, Image.fromarray(values), "big.jpg")


@pytest.mark.parametrize("min_size", [50, 100, 150, 224, 400])
def test_jpeg_draft_keeps_both_sides_at_least_min_size(big_jpeg, min_size):
    loaded = load_image(big_jpeg, min_size=min_size)
    assert min(loaded.size) >= min_size
    assert loaded.size[0] * 400 == loaded.size[1] * 600  # aspect ratio kept


def test_jpeg_draft_reduces_size_when_it_can(big_jpeg):
    assert load_image(big_jpeg).size == (600, 400)
    assert load_image(big_jpeg, min_size=100).size == (150, 100)  # decoded at 1/4 scale


def test_jpeg_draft_with_exif_rotation_keeps_both_sides(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    values = np.random.default_rng(2).integers(0, 256, (400, 600, 3), dtype=np.uint8)
    path = saved(tmp_path, Image.fromarray(values), "rotated.jpg", exif=exif)
    loaded = load_image(path, min_size=100)
    assert loaded.size == (100, 150)


def test_grey_jpeg_draft_is_still_rgb(tmp_path):
    loaded = load_image(saved(tmp_path, Image.new("L", (600, 400), 90), "grey.jpg"), min_size=100)
    assert loaded.mode == "RGB" and min(loaded.size) >= 100
    assert np.all(np.abs(pixels(loaded) - 90) <= 2)


# --- unreadable files -----------------------------------------------------------------------------


def truncated_copy(tmp_path, fmt: str) -> str:
    values = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    full = saved(tmp_path, Image.fromarray(values), f"full.{fmt}")
    data = full.read_bytes()
    cut = tmp_path / f"cut.{fmt}"
    cut.write_bytes(data[: len(data) // 2])
    return cut.name


def zero_bytes(tmp_path) -> str:
    (tmp_path / "empty.jpg").write_bytes(b"")
    return "empty.jpg"


def text_named_jpg(tmp_path) -> str:
    (tmp_path / "notes.jpg").write_text("not a picture\n")
    return "notes.jpg"


@pytest.mark.parametrize(
    "make, reason",
    [
        (zero_bytes, "empty"),
        (text_named_jpg, "not an image"),
        (lambda tmp_path: truncated_copy(tmp_path, "jpg"), "truncated"),
        (lambda tmp_path: truncated_copy(tmp_path, "png"), "truncated"),
    ],
    ids=["zero-bytes", "text-as-jpg", "truncated-jpg", "truncated-png"],
)
def test_unreadable_files_raise_with_the_file_name(tmp_path, make, reason):
    name = make(tmp_path)
    with pytest.raises(UnreadableImageError, match=reason) as error:
        load_image(tmp_path / name)
    assert name in str(error.value)


def test_missing_file_raises_unreadable(tmp_path):
    with pytest.raises(UnreadableImageError, match="missing.png"):
        load_image(tmp_path / "missing.png")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_is_refused(tmp_path):
    path = saved(tmp_path, Image.new("1", (10_000, 10_000)), "bomb.png")  # 10^8 pixels in ~12 kB
    assert path.stat().st_size < 100_000
    with pytest.raises(UnreadableImageError, match="bomb") as error:
        load_image(path)
    assert "bomb.png" in str(error.value)


def test_max_pixels_refuses_before_decoding(tmp_path):
    path = saved(tmp_path, Image.new("RGB", (20, 10)), "small.png")
    assert load_image(path, max_pixels=200).size == (20, 10)
    with pytest.raises(UnreadableImageError, match="20x10") as error:
        load_image(path, max_pixels=199)
    assert "small.png" in str(error.value)


def test_loading_in_threads_leaves_warning_filters_alone(tmp_path):
    """check_images decodes in a thread pool; global warning filters must be unchanged afterwards."""
    path = saved(tmp_path, Image.new("RGB", (4, 4)), "tiny.png")
    before = list(warnings.filters)
    for _ in range(5):
        good, bad = check_images([Item(path, "a")] * 300, workers=8)
        assert len(good) == 300 and not bad
    assert warnings.filters == before
