"""The CPU feature path's batches: preallocated buffers, bit for bit the tensors the transforms give."""

from __future__ import annotations

import numpy as np
import torch
from conftest import noisy_image
from PIL import Image

from imgtune.data.cache import ArrayStore, file_key
from imgtune.data.presize import ImageView
from imgtune.data.transforms import tensor_transform
from imgtune.train.extract import FEATURE_VIEWS, _threaded_features, compute_features

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Recording:
    """A stand-in body: keeps a copy of every batch it is given; its features are a few pixels."""

    backend, device = "onnx", torch.device("cpu")

    def __init__(self):
        self.batches = []

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.batches.append(images.clone())
        return images.flatten(1)[:, :5] * 2


def _pictures(tmp_path, count: int = 7):
    paths = []
    for i in range(count):
        path = tmp_path / f"p{i}.png"
        image = noisy_image((30 * i, 100, 200), 40, seed=i).resize((48, 40))
        (image.convert("L") if i % 3 == 0 else image).save(path)  # grey pictures are cached in one channel
        paths.append(path)
    return paths


def test_the_batches_are_the_pictures_and_mirrors_the_transforms_make(tmp_path):
    paths = _pictures(tmp_path)
    view = ImageView(32, cache_dir=tmp_path / "cache")
    chunks = [[0, 1, 2], [3, 4, 5], [6]]  # the last one smaller
    body = Recording()
    out = list(_threaded_features(paths, chunks, body, view, mean=MEAN, std=STD))
    to_tensor = tensor_transform(MEAN, STD)
    for chunk, batch, (got_chunk, features) in zip(chunks, body.batches, out):
        pictures = torch.stack([to_tensor(view(paths[i])) for i in chunk])
        assert torch.equal(batch, torch.cat([pictures, pictures.flip(-1)]))  # bit for bit
        assert got_chunk == chunk and features.shape == (len(chunk), FEATURE_VIEWS, 5)
        assert np.array_equal(features[:, 1], (pictures.flip(-1).flatten(1)[:, :5] * 2).numpy())


def test_features_fill_one_table_and_a_misshapen_cached_entry_is_recomputed(tmp_path):
    paths = _pictures(tmp_path, 5)
    view = ImageView(32, cache_dir=tmp_path / "cache")
    store = ArrayStore(tmp_path / "cache" / "features" / "recording")
    first, stats = compute_features(paths, Recording(), view, mean=MEAN, std=STD, store=store, batch_size=2)
    assert stats == dict(stats, cached=0, computed=5) and first.shape == (5, FEATURE_VIEWS, 5)
    store.put(file_key(paths[1]), np.zeros((3, 5), np.float32))  # three views: not what is cached now
    store.put(file_key(paths[3]), np.zeros((FEATURE_VIEWS, 4), np.float32))  # another width
    again, stats = compute_features(paths, Recording(), view, mean=MEAN, std=STD, store=store)
    assert (stats["cached"], stats["computed"]) == (3, 2) and torch.equal(again, first)
    empty, _ = compute_features([], Recording(), view, mean=MEAN, std=STD)
    assert empty.shape == (0, FEATURE_VIEWS, 0)


def test_a_presized_array_is_the_picture_the_view_gives(tmp_path):
    paths = _pictures(tmp_path, 4)
    for cache in (tmp_path / "cache", False):
        view = ImageView(32, cache_dir=cache)
        for path in paths:
            array = view.array(path)
            grey = array.shape[-1] == 1
            picture = Image.fromarray(array[..., 0], "L").convert("RGB") if grey else Image.fromarray(array)
            assert np.array_equal(np.asarray(picture), np.asarray(view(path)))
