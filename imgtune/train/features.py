"""Frozen-backbone features: computed once per image, kept on disk, and the head trained on them.

While the body is frozen (its BatchNorm layers in eval mode) it maps a picture to the same features
every epoch, so recomputing them is wasted work: the frozen phase of ``fine_tune`` (and the lr finder
before it) computes the features of every image once, for two views (the picture and its mirror
image, a horizontal flip being the augmentation that survives in feature space), and trains the head
on them. An epoch then costs milliseconds instead of a pass of the whole network, and a second run on
the same images and backbone reads the features from the cache (:mod:`imgtune.data.cache`).

On the CPU the body runs on ONNX Runtime when it is installed (2-4x faster than PyTorch eager for
these networks), after checking that its features match PyTorch's within :data:`FEATURE_TOLERANCE`.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from imgtune.data.cache import ArrayStore, cache_root, file_key
from imgtune.data.presize import ImageView
from imgtune.data.transforms import tensor_transform
from imgtune.deploy.export import module_to_onnx
from imgtune.files import atomic_write
from imgtune.train import distributed

#: Views cached per image: the picture and its mirror image.
FEATURE_VIEWS = 2

#: Largest difference allowed between ONNX Runtime's and PyTorch's features (else PyTorch is used).
FEATURE_TOLERANCE = 1e-4


def supports_features(model: nn.Module) -> bool:
    """Whether ``model`` splits into a body (``forward_features`` + pooling) and a linear classifier
    the way timm's CNNs do (EfficientNet, ResNet, ...), so its head can train on pooled features."""
    return all(hasattr(model, name) for name in ("forward_features", "forward_head", "get_classifier"))


class HeadOnFeatures(nn.Module):
    """The model's head as a module of pooled features: dropout, then the classifier.

    It shares the classifier's parameters with the model, so training it trains the model's head.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.drop = nn.Dropout(float(getattr(model, "drop_rate", 0.0) or 0.0))
        self.classifier = model.get_classifier()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.drop(features))


class _Body(nn.Module):
    """The model without its classifier: images to pooled features."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(images), pre_logits=True)


def body_fingerprint(model: nn.Module, *extra) -> str:
    """A hash of the body's weights and buffers (not the classifier's) and of ``extra`` (e.g. the
    input normalisation): features cached under it are valid exactly while it is unchanged."""
    classifier = model.get_classifier()
    prefix = next((name + "." for name, module in model.named_modules() if module is classifier), "\0")
    digest = hashlib.sha256(type(model).__name__.encode())
    for value in extra:
        digest.update(repr(value).encode())
    for name, tensor in model.state_dict().items():
        if name.startswith(prefix):
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:24]


class FeatureExtractor:
    """The frozen body as a function of a batch of normalised images -> (B, F) float32 on the CPU.

    ``cache_dir``: where the exported graph is kept (``False``: in memory only).
    ``backend``: ``"onnx"`` (ONNX Runtime, CPU), ``"torch"``, or ``"auto"``: ONNX Runtime on the CPU
    when installed and its features match PyTorch's on the first batch, else PyTorch (channels_last,
    inference mode, autocast on CUDA).
    """

    def __init__(self, model: nn.Module, *, size: int, device: torch.device, fingerprint: str,
                 backend: str = "auto", cache_dir=None):
        self.body = _Body(model)
        self.size, self.device, self.fingerprint = size, torch.device(device), fingerprint
        self.cache_dir = cache_dir
        self.backend = backend if backend != "auto" else ("onnx" if self.device.type == "cpu" and _has_ort() else "torch")
        self.session = None
        self.checked = self.backend == "torch"
        self.difference: float | None = None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.backend == "onnx" and self.session is None:
            self.session = self._session()
        if not self.checked:
            self.checked = True
            self.difference = float((self._onnx(images[:4]) - self._torch(images[:4])).abs().max())
            if self.difference > FEATURE_TOLERANCE:
                warnings.warn(f"ONNX Runtime's features differ from PyTorch's by {self.difference:.2g};"
                              " computing them with PyTorch instead")
                self.backend, self.session = "torch", None
        return self._onnx(images) if self.backend == "onnx" else self._torch(images)

    @torch.inference_mode()
    def _torch(self, images: torch.Tensor) -> torch.Tensor:
        model = self.body.model
        was_training = model.training
        model.eval()
        try:
            images = images.to(self.device, memory_format=torch.channels_last)
            autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()
            with autocast:
                return self.body(images).float().cpu()
        finally:
            model.train(was_training)

    def _onnx(self, images: torch.Tensor) -> torch.Tensor:
        (features,) = self.session.run(None, {"images": images.contiguous().numpy().astype(np.float32)})
        return torch.from_numpy(features)

    def _session(self):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        if self.cache_dir is False:  # nothing on disk: the graph stays in memory
            model = _export_body(self.body, self.size)
        else:
            path = cache_root(self.cache_dir) / "onnx" / f"{self.fingerprint}-{self.size}.onnx"
            if not path.is_file():
                atomic_write(path, _export_body(self.body, self.size))
            model = str(path)
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _export_body(body: _Body, size: int) -> bytes:
    """The body as an ONNX graph (dynamic batch)."""
    model = body.model
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        return module_to_onnx(body, torch.zeros(2, 3, size, size, device=device), input_name="images",
                              output_name="features")
    finally:
        model.train(was_training)


def _has_ort() -> bool:
    try:
        import onnx  # noqa: F401  (the exporter needs it)
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def compute_features(
    paths: Sequence[str | Path],
    extractor: FeatureExtractor,
    view: ImageView,
    *,
    mean,
    std,
    store: ArrayStore | None = None,
    batch_size: int = 16,
    progress=None,
) -> tuple[torch.Tensor, dict]:
    """The features of every file in ``paths``, for :data:`FEATURE_VIEWS` views (picture, mirror).

    Args:
        paths: image files (already checked readable).
        extractor: the frozen body.
        view: how a file becomes the picture (its presize cache is used).
        mean, std: the input normalisation.
        store: where features are cached (``None``: not cached).
        batch_size: pictures per extractor call (twice as many images with the mirrors; on 2 CPU
            cores ONNX Runtime runs 32 images at 96/s, 128 at 60/s).
        progress: a callable ``progress(done, total)`` called after each batch.

    Returns:
        ``(features, stats)``: a float32 tensor (N, views, F) and ``{"cached": hits, "computed": misses,
        "seconds": ...}``.
    """
    started = time.perf_counter()
    keys = [file_key(path) for path in paths]
    found: dict[int, np.ndarray] = {}
    if store is not None:
        for index, key in enumerate(keys):
            array = store.get(key)
            if array is not None and array.shape[0] == FEATURE_VIEWS:
                found[index] = array
    missing = [i for i in range(len(paths)) if i not in found]
    to_tensor = tensor_transform(mean, std)
    if missing and progress is not None:
        progress(0, len(missing))
    chunks = [missing[start : start + batch_size] for start in range(0, len(missing), batch_size)]

    def load(chunk: list[int]) -> torch.Tensor:
        return torch.stack([to_tensor(view(paths[i])) for i in chunk])

    # The next chunk's pictures load in a thread while the body runs on this one (ONNX Runtime and
    # PyTorch release the GIL), so loading costs no wall time once the presize cache is warm.
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(load, chunks[0]) if chunks else None
        for number, chunk in enumerate(chunks):
            images = pending.result()
            if number + 1 < len(chunks):
                pending = pool.submit(load, chunks[number + 1])
            batch = torch.cat([images, images.flip(-1)])  # the views of the chunk, view-major
            features = extractor(batch).reshape(FEATURE_VIEWS, len(chunk), -1).transpose(0, 1).numpy()
            for index, array in zip(chunk, features):
                found[index] = array
                if store is not None:
                    store.put(keys[index], array)
            if progress is not None:
                progress(min((number + 1) * batch_size, len(missing)), len(missing))
    stacked = torch.from_numpy(np.stack([found[i] for i in range(len(paths))])) if paths else torch.empty(0, FEATURE_VIEWS, 0)
    stats = dict(cached=len(paths) - len(missing), computed=len(missing), seconds=time.perf_counter() - started)
    return stacked, stats


class FeatureDataset(Dataset):
    """(features, class index) pairs; training picks one of the cached views at random each time."""

    def __init__(self, features: torch.Tensor, targets: Sequence[int], *, random_view: bool, seed: int = 0):
        self.features, self.targets = features, torch.as_tensor(list(targets))
        self.random_view = random_view
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        view = int(torch.randint(self.features.shape[1], (1,), generator=self.generator)) if self.random_view else 0
        return self.features[index, view], self.targets[index]


class FeatureSource:
    """The features of a learner's train and valid images, made on first use, and loaders over them.

    Build one with :meth:`from_loaders` from the image loaders; :meth:`loaders` gives feature loaders
    with the same batch size, shuffling seed and ``drop_last`` as the image loaders.
    """

    def __init__(self, train_ds, valid_ds, *, batch_size: int, drop_last: bool, seed: int, mean, std, size: int,
                 cache: bool = True, cache_dir=None, augment: bool = True):
        self.train_ds, self.valid_ds = train_ds, valid_ds
        self.augment = augment
        self.batch_size, self.drop_last, self.seed = batch_size, drop_last, seed
        self.mean, self.std, self.size = list(mean), list(std), size
        self.cache, self.cache_dir = cache, cache_dir
        self.view = valid_ds.view
        self.stats: dict = {}
        self._made: tuple[str, DataLoader, DataLoader] | None = None

    @classmethod
    def from_loaders(cls, train_dl: DataLoader, valid_dl: DataLoader, *, seed: int, mean, std, size: int,
                     cache: bool = True, cache_dir=None, augment: bool = True) -> FeatureSource | None:
        """``None`` when the loaders are not over image files (e.g. tensors the caller made). Without
        ``augment`` the head trains on the pictures' own view only (no mirror images: for data where a
        flip changes the meaning, such as drawn mouse paths)."""
        if not all(hasattr(dl.dataset, "items") and hasattr(dl.dataset, "view") for dl in (train_dl, valid_dl)):
            return None
        return cls(train_dl.dataset, valid_dl.dataset, batch_size=train_dl.batch_size, drop_last=train_dl.drop_last,
                   seed=seed, mean=mean, std=std, size=size, cache=cache, cache_dir=cache_dir, augment=augment)

    def loaders(self, model: nn.Module, device: torch.device, progress=None) -> tuple[DataLoader, DataLoader]:
        """Feature loaders for ``model``'s current body (recomputed only if the body's weights changed)."""
        fingerprint = body_fingerprint(model, self.mean, self.std, self.size)
        if self._made is not None and self._made[0] == fingerprint:
            return self._made[1], self._made[2]
        store = None
        if self.cache:
            store = ArrayStore(cache_root(self.cache_dir) / "features" / f"{fingerprint}-{self.view.name}")
        extractor = FeatureExtractor(model, size=self.size, device=device, fingerprint=fingerprint,
                                     cache_dir=self.cache_dir if self.cache else False)
        paths = [item.path for item in self.train_ds.items] + [item.path for item in self.valid_ds.items]
        features, stats = compute_features(paths, extractor, self.view, mean=self.mean, std=self.std, store=store,
                                           progress=progress)
        self.stats = dict(stats, backend=extractor.backend, onnx_difference=extractor.difference)
        n_train = len(self.train_ds.items)
        index = self.train_ds.class_index
        train_targets = [index[item.label] for item in self.train_ds.items]
        valid_targets = [index[item.label] for item in self.valid_ds.items]
        generator = torch.Generator().manual_seed(self.seed)
        train_dl = DataLoader(FeatureDataset(features[:n_train], train_targets, random_view=self.augment, seed=self.seed),
                              batch_size=self.batch_size, shuffle=True, drop_last=self.drop_last, generator=generator)
        valid_dl = DataLoader(FeatureDataset(features[n_train:], valid_targets, random_view=False),
                              batch_size=self.batch_size * 2, shuffle=False)
        self._made = (fingerprint, train_dl, valid_dl)
        return train_dl, valid_dl


@contextmanager
def head_on_features(learner):
    """While ``learner``'s body is frozen and it has a :class:`FeatureSource`: its model becomes the head
    (:class:`HeadOnFeatures`) and its loaders serve cached features (computed on first use), so each
    step costs a head's work; the model, loaders and memory format come back when the block ends.

    Nothing changes with the body unfrozen, without features, under torch.distributed (every process
    then runs the body on its shard), or inside another such block.
    """
    if (learner.features is None or isinstance(learner.model, HeadOnFeatures) or not learner.body_frozen()
            or distributed.is_initialized()):
        yield
        return
    saved = learner.model, learner.train_dl, learner.valid_dl, learner.memory_format
    started = time.perf_counter()
    train_dl, valid_dl = learner.features.loaders(learner.model, learner.device,
                                                  progress=lambda done, total: learner.call("on_features", done, total))
    if learner.features.stats.get("computed"):
        learner.timings["features"] = learner.timings.get("features", 0.0) + time.perf_counter() - started
    learner.model = HeadOnFeatures(learner.model)
    learner.train_dl, learner.valid_dl, learner.memory_format = train_dl, valid_dl, torch.contiguous_format
    try:
        yield
    finally:
        learner.model, learner.train_dl, learner.valid_dl, learner.memory_format = saved


def imagenet_features(
    paths: Sequence[str | Path],
    *,
    arch: str | None = None,
    weights: str = "imagenet",
    size: int | None = None,
    resize: str = "crop",
    cache_dir=None,
    cache: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """Pooled backbone features of image files (one row per file, the picture's own view), cached.

    Args:
        paths: readable image files.
        arch: a registry or timm name (default: imgtune's default backbone).
        weights: ``"imagenet"``, ``"none"`` or a weights file (see :func:`imgtune.create_model`).
        size, resize: the input size (default: the backbone's) and resize method.
        cache_dir, cache: where features and presized pictures are cached, and whether to.
        progress: print a progress bar.

    Returns:
        A float32 tensor of shape (len(paths), F).
    """
    from imgtune.models import DEFAULT_ARCH, create_model, get_backbone

    arch = arch or DEFAULT_ARCH
    backbone = get_backbone(arch)
    size = size or backbone.size
    model = create_model(arch, 2, weights=weights).eval()
    if not supports_features(model):
        raise ValueError(f"{arch}: has no timm-style forward_features/forward_head; cannot extract features")
    fingerprint = body_fingerprint(model, list(backbone.mean), list(backbone.std), size)
    view = ImageView(size, resize, cache_dir=cache_dir if cache else False)
    store = ArrayStore(cache_root(cache_dir) / "features" / f"{fingerprint}-{view.name}") if cache else None
    extractor = FeatureExtractor(model, size=size, device=torch.device("cpu"), fingerprint=fingerprint,
                                 cache_dir=cache_dir if cache else False)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(paths), desc="features", unit="img")

    def report(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.n = done
            bar.refresh()

    try:
        features, _ = compute_features(list(paths), extractor, view, mean=backbone.mean, std=backbone.std,
                                       store=store, progress=report)
    finally:
        if bar is not None:
            bar.close()
    return features[:, 0]
