"""The body split at a stage: the frozen lower part's activation maps computed once, the upper part trained on them.

Partial fine-tuning (:mod:`imgtune.train.partial`) trains the last ``tune_stages`` stages of a timm
EfficientNet or ResNet (see :func:`imgtune.models.stage_layout`), its final convolution and the head,
and keeps the stages before them frozen. A frozen stage (its BatchNorm layers in eval mode) maps a
picture to the same activations every epoch, so they are computed once per image and view (the picture
and its mirror image, exact rather than a flipped map), stored in float16 in the disk cache
(``activations/<lower body>-<view>/``, see :mod:`imgtune.data.cache`) and read back one batch at a time:
elpv's 2,600 images at Lite0's 14 x 14 x 112 maps take 230 MB on disk, none of it held in memory.

The same pass gives the pooled features the head-only phase trains on (the upper part is still the
pretrained one then), written into the feature cache, so the network runs once over the images, not
twice. On the CPU it runs on ONNX Runtime when installed (checked against PyTorch on the first batch).
"""

from __future__ import annotations

import hashlib
import tempfile
import time
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from imgtune.data.cache import ArrayStore, cache_root, file_key
from imgtune.deploy.export import module_to_onnx
from imgtune.errors import ImgtuneError
from imgtune.models import stage_layout
from imgtune.train.extract import cached_session, eval_mode, has_onnx_runtime, picture_batches

#: Views cached per image (the picture, its mirror image), and pictures per call of the lower body.
VIEWS, BATCH = 2, 16

#: Largest difference between ONNX Runtime's and PyTorch's maps, relative to their largest value.
ONNX_TOLERANCE = 1e-4


class LowerBody(nn.Module):
    """The frozen part: pictures -> the activation maps after stage ``len(stages) - tune_stages``.
    It holds the model's own modules (no copy)."""

    def __init__(self, model: nn.Module, tune_stages: int, arch: str = ""):
        super().__init__()
        layout = stage_layout(model, arch)
        cut = split_index(layout, tune_stages, arch)
        self.names = layout.stem + layout.stages[:cut]
        self.parts = nn.ModuleList(model.get_submodule(name) for name in self.names)
        self.train(model.training)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        for part in self.parts:
            images = part(images)
        return images


class UpperStages(nn.Module):
    """The trained part as a module of activation maps: the last ``tune_stages`` stages, the tail
    (EfficientNet's ``conv_head``), pooling, dropout and the classifier, all the model's own modules,
    so training it trains the model and ``UpperStages(model)(LowerBody(model)(x)) == model(x)``."""

    def __init__(self, model: nn.Module, tune_stages: int, arch: str = ""):
        super().__init__()
        layout = stage_layout(model, arch)
        cut = split_index(layout, tune_stages, arch)
        self.names = layout.stages[cut:] + layout.tail
        self.parts = nn.ModuleList(model.get_submodule(name) for name in self.names)
        self.pool = model.global_pool
        self.drop = nn.Dropout(float(getattr(model, "drop_rate", 0.0) or 0.0))
        self.classifier = model.get_classifier()
        self.train(model.training)  # in the model's mode, as its own modules are

    def pooled(self, maps: torch.Tensor) -> torch.Tensor:
        """The pooled features (what the head-only phase trains the classifier on)."""
        for part in self.parts:
            maps = part(maps)
        return self.pool(maps)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.drop(self.pooled(maps)))


def split_index(layout, tune_stages: int, arch: str = "") -> int:
    """The index of the first trained stage, for ``tune_stages`` trained stages (1 .. all of them)."""
    if not 1 <= tune_stages <= len(layout.stages):
        raise ImgtuneError(f"{arch or 'this model'} has {len(layout.stages)} stages: `tune_stages` must be 0 (the head "
                           f"only) to {len(layout.stages)}, not {tune_stages}")
    return len(layout.stages) - tune_stages


def lower_fingerprint(lower: LowerBody, *extra) -> str:
    """A hash of the lower body's module names, weights and buffers and of ``extra`` (normalisation,
    size): cached maps are valid exactly while it is unchanged."""
    digest = hashlib.sha256("\0".join(lower.names).encode())
    for value in extra:
        digest.update(repr(value).encode())
    for name, tensor in lower.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:24]


class _MapsAndFeatures(nn.Module):
    def __init__(self, lower: LowerBody, upper: UpperStages):
        super().__init__()
        self.lower, self.upper = lower, upper

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.lower(images)
        return maps, self.upper.pooled(maps)


class MapsRunner:
    """The network as a function of normalised pictures -> (maps as float16, pooled features as
    float32), NumPy, on ONNX Runtime (when installed and within :data:`ONNX_TOLERANCE` of PyTorch on
    the first batch) or PyTorch, always in eval mode."""

    def __init__(self, lower: LowerBody, upper: UpperStages, *, size: int, fingerprint: str, cache_dir=None,
                 backend: str = "auto"):
        self.net = _MapsAndFeatures(lower, upper)
        self.size, self.fingerprint, self.cache_dir = size, fingerprint, cache_dir
        self.backend = backend if backend != "auto" else ("onnx" if has_onnx_runtime() else "torch")
        self.session, self.checked, self.difference = None, self.backend == "torch", None

    def __call__(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        if not self.checked:
            self.checked = True
            self.session = self._session()
            (onnx_maps, _), (maps, _) = self._onnx(images[:4]), self._torch(images[:4])
            self.difference = float(np.abs(onnx_maps - maps).max() / max(1.0, float(np.abs(maps).max())))
            if self.difference > ONNX_TOLERANCE:
                warnings.warn(f"ONNX Runtime's activations differ from PyTorch's by {self.difference:.2g};"
                              " computing them with PyTorch instead")
                self.backend, self.session = "torch", None
        maps, features = self._onnx(images) if self.backend == "onnx" else self._torch(images)
        return maps.astype(np.float16), features

    @torch.inference_mode()
    def _torch(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        with eval_mode(self.net):
            maps, features = self.net(images.to(memory_format=torch.channels_last))
        return maps.float().contiguous().numpy(), features.float().numpy()

    def _onnx(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        batch = np.ascontiguousarray(images.contiguous().numpy(), dtype=np.float32)  # no copy of a float32 batch
        maps, features = self.session.run(None, {"images": batch})
        return maps, features

    def _session(self):
        # named as the feature extractor names its graphs, so `imgtune cache clear` knows it
        name = hashlib.sha256(f"maps-{self.fingerprint}".encode()).hexdigest()[:24]
        return cached_session(self._export, cache_dir=self.cache_dir, name=name, size=self.size)

    def _export(self) -> bytes:
        with eval_mode(self.net):
            return module_to_onnx(self.net, torch.zeros(2, 3, self.size, self.size), input_name="images",
                                  output_name=("maps", "features"))


def compute_maps(paths: Sequence, runner: MapsRunner, view, *, mean, std, maps_store: ArrayStore,
                 feature_store: ArrayStore | None, progress=None,
                 need_features: bool = True) -> tuple[torch.Tensor | None, dict]:
    """Store the maps of every file in ``paths`` (both views) and return their pooled features.

    Args:
        paths: image files (already checked readable).
        runner: the network (see :class:`MapsRunner`).
        view: how a file becomes the picture (:class:`imgtune.data.presize.ImageView`).
        mean, std: the input normalisation.
        maps_store: where the maps go, ``(views, C, H, W)`` float16 per file.
        feature_store: where the pooled features go, ``(views, F)`` float32 per file, as
            :func:`imgtune.train.extract.compute_features` stores them (``None``: not cached).
        progress: ``progress(done, total)`` after each batch.
        need_features: without it, a file whose maps are cached is not computed again and the
            features returned are ``None``.

    Returns:
        ``(features (N, views, F) float32, {"cached": n, "computed": n, "seconds": s})``.
    """
    started = time.perf_counter()
    keys = [file_key(path) for path in paths]
    found: dict[int, np.ndarray] = {}
    for index, key in enumerate(keys):
        if not need_features:
            features = np.zeros(0) if key in maps_store else None
        else:
            features = feature_store.get(key) if feature_store is not None else None
        if features is not None and (not need_features or features.shape[0] == VIEWS) and key in maps_store:
            found[index] = features
    missing = [i for i in range(len(paths)) if i not in found]
    chunks = [missing[start:start + BATCH] for start in range(0, len(missing), BATCH)]
    if missing and progress is not None:
        progress(0, len(missing))
    # Two batch buffers, filled in a thread while the network runs (memory: two batches, whatever N).
    for number, (chunk, images) in enumerate(picture_batches(paths, chunks, view, mean=mean, std=std)):
        maps, features = runner(images)  # view-major: the pictures, then their mirrors
        maps = maps.reshape(VIEWS, len(chunk), *maps.shape[1:])
        features = features.reshape(VIEWS, len(chunk), -1)
        for j, index in enumerate(chunk):
            maps_store.put(keys[index], maps[:, j])
            found[index] = np.ascontiguousarray(features[:, j])
            if feature_store is not None:
                feature_store.put(keys[index], found[index])
        if progress is not None:
            progress(min((number + 1) * BATCH, len(missing)), len(missing))
    stacked = torch.from_numpy(np.stack([found[i] for i in range(len(paths))])) if need_features else None
    stats = {"cached": len(paths) - len(missing), "computed": len(missing), "seconds": time.perf_counter() - started}
    return stacked, stats


class MapsDataset(Dataset):
    """(maps, class index) pairs read from a store one item at a time, as float32 ``(C, H, W)``.

    Training (``random_view``) picks the picture or its mirror at random and, with ``shift`` > 0,
    moves the map by up to ``shift`` cells each way (edge cells repeated): a translation of the
    picture by up to ``shift`` x the stage's stride in pixels, the augmentation valid on maps.
    ``all_views`` yields ``(views, C, H, W)`` for test-time augmentation.
    """

    def __init__(self, store: ArrayStore, keys: Sequence[str], targets: Sequence[int], *, random_view: bool,
                 shift: int = 0, seed: int = 0, all_views: bool = False):
        self.store, self.keys, self.targets = store, list(keys), torch.as_tensor(list(targets))
        self.random_view, self.shift, self.all_views = random_view, shift, all_views
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int):
        maps = self.store.get(self.keys[index])
        if maps is None:
            raise ImgtuneError(f"{self.store.root}: cached activations vanished during training (was the cache "
                               "cleared?); run again")
        if self.all_views:
            return torch.from_numpy(maps.astype(np.float32)), self.targets[index]
        view = int(torch.randint(VIEWS, (1,), generator=self.generator)) if self.random_view else 0
        x = maps[view]
        if self.random_view and self.shift > 0:
            # Indices clamped at the edges: replicate padding at a fraction of torch's pad (88 ms a map here).
            dy, dx = (int(v) - self.shift for v in torch.randint(2 * self.shift + 1, (2,), generator=self.generator))
            rows = np.clip(np.arange(x.shape[1]) + dy, 0, x.shape[1] - 1)
            cols = np.clip(np.arange(x.shape[2]) + dx, 0, x.shape[2] - 1)
            x = x[:, rows][:, :, cols]
        return torch.from_numpy(x.astype(np.float32)), self.targets[index]


class ActivationSource:
    """The maps of a learner's train and valid images at one split, made on first use, and loaders
    over them (with the image loaders' batch size, shuffling seed and ``drop_last``).

    ``features`` is the learner's :class:`imgtune.train.features.FeatureSource` (its images, view,
    normalisation and cache settings). Without the disk cache the maps go to a temporary folder,
    removed with this object.
    """

    def __init__(self, features, tune_stages: int, *, arch: str = "", shift: int = 0):
        self.features, self.tune_stages, self.arch, self.shift = features, tune_stages, arch, shift
        self.stats: dict = {}
        self._keys: list[str] | None = None
        self._fingerprint: str | None = None
        self._temporary = None
        self._store: ArrayStore | None = None

    def store(self, fingerprint: str) -> ArrayStore:
        """Where the maps of the lower body ``fingerprint`` are kept."""
        source = self.features
        if source.cache:
            return ArrayStore(cache_root(source.cache_dir) / "activations" / f"{fingerprint}-{source.view.name}")
        if self._temporary is None:
            self._temporary = tempfile.TemporaryDirectory(prefix="imgtune-activations-")
        return ArrayStore(f"{self._temporary.name}/{fingerprint}")

    def prepare(self, model: nn.Module, feature_store: ArrayStore | None, progress=None,
                need_features: bool = True) -> torch.Tensor | None:
        """Compute (or find cached) the maps of every image, and return their pooled features
        ``(N, views, F)`` for the head-only phase (see :func:`compute_maps`; ``None`` without
        ``need_features``)."""
        source = self.features
        lower, upper = LowerBody(model, self.tune_stages, self.arch), UpperStages(model, self.tune_stages, self.arch)
        fingerprint = lower_fingerprint(lower, source.mean, source.std, source.size)
        store = self.store(fingerprint)
        runner = MapsRunner(lower, upper, size=source.size, fingerprint=fingerprint,
                            cache_dir=source.cache_dir if source.cache else False)
        paths = [item.path for item in source.train_ds.items] + [item.path for item in source.valid_ds.items]
        features, stats = compute_maps(paths, runner, source.view, mean=source.mean, std=source.std,
                                       maps_store=store, feature_store=feature_store, progress=progress,
                                       need_features=need_features)
        self.stats = dict(stats, backend=runner.backend, onnx_difference=runner.difference,
                          split=lower.names[-1], tune_stages=self.tune_stages)
        self._keys, self._fingerprint, self._store = [file_key(path) for path in paths], fingerprint, store
        return features

    def loaders(self, model: nn.Module, *, tta: bool = False) -> tuple[DataLoader, DataLoader]:
        """Loaders of maps for ``model``'s :class:`UpperStages`; the lower body must be the one the maps
        were made with (else :class:`ImgtuneError`: its weights changed since)."""
        source = self.features
        fingerprint = lower_fingerprint(LowerBody(model, self.tune_stages, self.arch), source.mean, source.std,
                                        source.size)
        if self._keys is None:  # no head-only phase made them (freeze_epochs=0, or a resumed run)
            self.prepare(model, None, need_features=False)
        elif fingerprint != self._fingerprint:
            raise ImgtuneError("the frozen stages changed since their activations were computed; partial "
                               "fine-tuning needs them frozen (freeze them, or start again)")
        n_train = len(source.train_ds.items)
        index = source.train_ds.class_index
        targets = [index[item.label] for item in [*source.train_ds.items, *source.valid_ds.items]]
        generator = torch.Generator().manual_seed(source.seed)
        train = MapsDataset(self._store, self._keys[:n_train], targets[:n_train], random_view=source.augment,
                            shift=self.shift if source.augment else 0, seed=source.seed)
        valid = MapsDataset(self._store, self._keys[n_train:], targets[n_train:], random_view=False, all_views=tta)
        return (DataLoader(train, batch_size=source.batch_size, shuffle=True, drop_last=source.drop_last,
                           generator=generator),
                DataLoader(valid, batch_size=source.batch_size * 2, shuffle=False))
