"""Feature extraction's memory is that of a batch, not of the data set: twice the images, no more memory.

Measured on this process's own resident memory (Linux ``/proc/self``): the peak is reset before each
call (``/proc/self/clear_refs``), so the test reads what that call alone added. Other processes on a
busy machine do not change this process's memory, so the bounds hold on a noisy CI machine; they
are generous (a quarter of what each image's float32 views weigh) and still fail for memory kept
per image.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import pytest
import torch
from conftest import noisy_image

from imgtune.data.presize import ImageView
from imgtune.models import create_model
from imgtune.train.extract import FEATURE_VIEWS, FeatureExtractor, compute_features

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
SIZE = 96  # large enough that a picture's float32 views (221 KB) dwarf the allocator's noise
FILES, FEW, MANY = 24, 200, 400  # the FEW and MANY images are the FILES repeated (each decoded from the cache)
#: The picture and its mirror in float32, the per-image buffers the extractor used to make.
VIEWS_BYTES = FEATURE_VIEWS * 3 * SIZE * SIZE * 4
#: Extra peak memory allowed for the MANY - FEW more images: a quarter of their float32 views (11 MB);
#: memory that stays per image (a uint8 copy of each picture is already 55 KB) goes over it, while
#: batch buffers, ONNX Runtime's arena and the allocator's slack do not depend on the count.
BOUND = (MANY - FEW) * VIEWS_BYTES // 4

pytestmark = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _peak_growth(function) -> int:
    """How far this process's resident memory rose above where it stood while ``function()`` ran."""
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from the current size
    before = _status("VmRSS")
    function()
    return _status("VmHWM") - before


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    folder = tmp_path_factory.mktemp("memory")
    paths = []
    for i in range(FILES):
        path = folder / f"picture_{i}.jpg"
        noisy_image((40 + 8 * i, 120, 200 - 4 * i), 160, seed=i).resize((160, 120)).save(path, quality=90)
        paths.append(path)
    torch.manual_seed(0)
    model = create_model("test_efficientnet", 3, weights="none").eval()
    extractor = FeatureExtractor(model, size=SIZE, device="cpu", fingerprint="memory", cache_dir=folder / "cache")
    view = ImageView(SIZE, cache_dir=folder / "cache")
    compute_features(paths * (FEW // FILES + 1), extractor, view, mean=MEAN, std=STD)  # warm-up: the ONNX
    return paths, extractor, view  # export and session, its arena, the presize cache


def _features(setting, count: int) -> int:
    """Compute the features of ``count`` images (not cached) and return the bytes of the result."""
    paths, extractor, view = setting
    features, stats = compute_features([paths[i % len(paths)] for i in range(count)], extractor, view,
                                       mean=MEAN, std=STD, store=None)
    assert stats["computed"] == count and features.shape[:2] == (count, FEATURE_VIEWS)
    return features.numel() * 4


def test_twice_the_images_take_no_more_memory_than_a_batch(setting):
    sizes = {}
    few = _peak_growth(lambda: sizes.setdefault(FEW, _features(setting, FEW)))
    many = _peak_growth(lambda: sizes.setdefault(MANY, _features(setting, MANY)))
    # The (N, views, F) result itself grows with N, by design (a few KB an image): not counted.
    extra = many - few - (sizes[MANY] - sizes[FEW])
    assert extra < BOUND, f"{MANY} images peaked {extra / 2**20:.1f} MB above {FEW} (bound {BOUND / 2**20:.0f} MB)"


def test_the_measure_catches_memory_kept_per_image(setting, monkeypatch):
    """The bound is meaningful: keeping as many bytes per image as its float32 views (four times the
    bound's share) fails it."""
    paths, extractor, view = setting
    kept = []
    original = ImageView.array

    def keeping(self, path):
        # A fresh anonymous mapping, its pages touched: new resident memory whatever the allocator holds
        # (a NumPy array of ones this size could be served from freed, still resident heap pages after the other
        # tests of a full run, and once measured 3.5 MB for the 44 MB kept).
        block = mmap.mmap(-1, VIEWS_BYTES)
        block.write(b"\x01" * VIEWS_BYTES)
        kept.append(block)
        return original(self, path)

    monkeypatch.setattr(ImageView, "array", keeping)
    sizes = {}
    few = _peak_growth(lambda: sizes.setdefault(FEW, _features(setting, FEW)))
    many = _peak_growth(lambda: sizes.setdefault(MANY, _features(setting, MANY)))
    assert many - few - (sizes[MANY] - sizes[FEW]) >= BOUND
    assert len(kept) == FEW + MANY
