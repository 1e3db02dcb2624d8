"""Frozen-backbone features: computed once per image, kept on disk, and the head trained on them.

While the body is frozen (its BatchNorm layers in eval mode) it maps a picture to the same features
every epoch, so recomputing them is wasted work: the frozen phase of ``fine_tune`` (and the lr finder
before it) computes the features of every image once, for two views (the picture and its mirror
image, a horizontal flip being the augmentation that survives in feature space), and trains the head
on them. An epoch then costs milliseconds instead of a pass of the whole network, and a second run on
the same images and backbone reads the features from the cache (:mod:`imgtune.data.cache`).

The features come from :mod:`imgtune.train.extract` (ONNX Runtime on the CPU, PyTorch on a GPU). A
GPU's bf16 or fp16 features differ from the CPU's float32 ones in the last digits, so they are cached
apart (see :func:`feature_store_name`).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from imgtune.data.cache import ArrayStore, cache_root
from imgtune.data.presize import ImageView
from imgtune.progress import progress_bar
from imgtune.train import distributed, partial
from imgtune.train.activations import ActivationSource, UpperStages
from imgtune.train.extract import FeatureExtractor, compute_features


def feature_store_name(fingerprint: str, view_name: str, precision: str) -> str:
    """The feature cache folder (under ``features/``) of a body, a view and the precision it ran in.

    float32 features (the CPU's, PyTorch or ONNX Runtime alike) keep the name they always had, so
    existing caches stay valid; bf16 and fp16 features (a GPU's) differ from them in the last digits
    and get folders of their own.
    """
    name = f"{fingerprint}-{view_name}"
    return name if precision == "fp32" else f"{name}-{precision}"


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

class FeatureDataset(Dataset):
    """(features, class index) pairs; training picks one of the cached views at random each time.

    With ``all_views`` an item's features are every view, ``(views, F)``: what test-time augmentation
    averages over (see :func:`imgtune.train.evaluate.predict`).
    """

    def __init__(self, features: torch.Tensor, targets: Sequence[int], *, random_view: bool, seed: int = 0,
                 all_views: bool = False):
        self.features, self.targets = features, torch.as_tensor(list(targets))
        self.random_view, self.all_views = random_view, all_views
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        if self.all_views:
            return self.features[index], self.targets[index]
        view = int(torch.randint(self.features.shape[1], (1,), generator=self.generator)) if self.random_view else 0
        return self.features[index, view], self.targets[index]


class FeatureSource:
    """The features of a learner's train and valid images, made on first use, and loaders over them.

    Build one with :meth:`from_loaders` from the image loaders; :meth:`loaders` gives feature loaders
    with the same batch size, shuffling seed and ``drop_last`` as the image loaders.
    """

    def __init__(self, train_ds, valid_ds, *, batch_size: int, drop_last: bool, seed: int, mean, std, size: int,
                 cache: bool = True, cache_dir=None, augment: bool = True, tune_stages: int | str = 0, arch: str = ""):
        self.train_ds, self.valid_ds = train_ds, valid_ds
        # Partial fine-tuning (imgtune.train.partial): what was asked, and once decided, the plan and the maps.
        self.tune_stages, self.arch = partial.parse_tune_stages(tune_stages), arch
        self.partial: partial.PartialPlan | None = None
        self.partial_reason = ""
        self.activations: ActivationSource | None = None
        self._decided = False
        self.augment = augment
        self.batch_size, self.drop_last, self.seed = batch_size, drop_last, seed
        self.mean, self.std, self.size = list(mean), list(std), size
        self.cache, self.cache_dir = cache, cache_dir
        self.view = valid_ds.view
        self.stats: dict = {}
        self._made: tuple[tuple[str, str], DataLoader, DataLoader] | None = None

    @classmethod
    def from_loaders(cls, train_dl: DataLoader, valid_dl: DataLoader, *, seed: int, mean, std, size: int,
                     cache: bool = True, cache_dir=None, augment: bool = True, tune_stages: int | str = 0,
                     arch: str = "") -> FeatureSource | None:
        """``None`` when the loaders are not over image files (e.g. tensors the caller made). Without
        ``augment`` the head trains on the pictures' own view only (no mirror images: for data where a
        flip changes the meaning, such as drawn mouse paths). ``tune_stages``: see :meth:`partial_plan`."""
        if not all(hasattr(dl.dataset, "items") and hasattr(dl.dataset, "view") for dl in (train_dl, valid_dl)):
            return None
        return cls(train_dl.dataset, valid_dl.dataset, batch_size=train_dl.batch_size, drop_last=train_dl.drop_last,
                   seed=seed, mean=mean, std=std, size=size, cache=cache, cache_dir=cache_dir, augment=augment,
                   tune_stages=tune_stages, arch=arch)

    def partial_plan(self, model: nn.Module, device: torch.device) -> partial.PartialPlan | None:
        """The partial fine-tuning plan for ``tune_stages`` (decided once, before any features are made,
        by :func:`imgtune.train.partial.choose`), or ``None``: the head only (or, on a GPU, the usual
        whole-network fine-tuning)."""
        if not self._decided:
            self._decided = True
            self.partial, self.partial_reason = partial.choose(model, self, device, self.tune_stages, arch=self.arch)
            if self.partial is not None:
                self.activations = ActivationSource(self, self.partial.tune_stages, arch=self.arch,
                                                    shift=partial.PARTIAL["shift"])
        return self.partial

    def fix_partial(self, tune_stages: int, epochs: int) -> None:
        """Use ``tune_stages`` stages for ``epochs`` epochs without measuring (a resumed run's plan)."""
        self._decided = False
        self.tune_stages = tune_stages
        self.partial = None
        self.activations = None
        if tune_stages:
            self._decided = True
            self.partial = partial.PartialPlan(tune_stages, epochs, None, "resumed")
            self.activations = ActivationSource(self, tune_stages, arch=self.arch, shift=partial.PARTIAL["shift"])

    def loaders(self, model: nn.Module, device: torch.device, progress=None,
                precision: str = "auto", tta: bool = False) -> tuple[DataLoader, DataLoader]:
        """Feature loaders for ``model``'s current body (recomputed only if the body's weights or the
        ``precision`` it runs in changed; see :func:`imgtune.train.device.choose_precision`). With ``tta``
        the validation items hold both views (picture, mirror) for test-time augmentation."""
        fingerprint = body_fingerprint(model, self.mean, self.std, self.size)
        extractor = FeatureExtractor(model, size=self.size, device=device, fingerprint=fingerprint,
                                     cache_dir=self.cache_dir if self.cache else False, precision=precision)
        if self._made is not None and self._made[0] == (fingerprint, extractor.precision, tta):
            return self._made[1], self._made[2]
        store = None
        if self.cache:
            name = feature_store_name(fingerprint, self.view.name, extractor.precision)
            store = ArrayStore(cache_root(self.cache_dir) / "features" / name)
        paths = [item.path for item in self.train_ds.items] + [item.path for item in self.valid_ds.items]
        if self.partial_plan(model, device) is not None and extractor.precision == "fp32":
            # One pass of the network gives the maps and these features (see imgtune.train.activations).
            features = self.activations.prepare(model, store, progress=progress)
            self.stats = dict(self.activations.stats)
        else:
            features, stats = compute_features(paths, extractor, self.view, mean=self.mean, std=self.std,
                                               store=store, progress=progress)
            self.stats = dict(stats, backend=extractor.backend, onnx_difference=extractor.difference)
        n_train = len(self.train_ds.items)
        index = self.train_ds.class_index
        train_targets = [index[item.label] for item in self.train_ds.items]
        valid_targets = [index[item.label] for item in self.valid_ds.items]
        generator = torch.Generator().manual_seed(self.seed)
        train_dl = DataLoader(FeatureDataset(features[:n_train], train_targets, random_view=self.augment, seed=self.seed),
                              batch_size=self.batch_size, shuffle=True, drop_last=self.drop_last, generator=generator)
        valid_dl = DataLoader(FeatureDataset(features[n_train:], valid_targets, random_view=False, all_views=tta),
                              batch_size=self.batch_size * 2, shuffle=False)
        self._made = ((fingerprint, extractor.precision, tta), train_dl, valid_dl)
        return train_dl, valid_dl


@contextmanager
def head_on_features(learner):
    """While ``learner``'s body is frozen and it has a :class:`FeatureSource`: its model becomes the head
    (:class:`HeadOnFeatures`) and its loaders serve cached features (computed on first use), so each
    step costs a head's work; the model, loaders and memory format come back when the block ends.

    With the body frozen below the stages partial fine-tuning trains (see :mod:`imgtune.train.partial`):
    the model becomes those stages and the head (:class:`imgtune.train.activations.UpperStages`) and the
    loaders serve the frozen stages' cached activation maps. Nothing changes with the body unfrozen
    otherwise, without features, under torch.distributed (every process then runs the body on its
    shard), or inside another such block.
    """
    if (learner.features is None or isinstance(learner.model, (HeadOnFeatures, UpperStages))
            or distributed.is_initialized()):
        yield
        return
    if not learner.body_frozen():
        plan = learner.features.partial
        if plan is None or learner.features.activations is None or not partial.lower_frozen(learner, plan.tune_stages):
            yield
            return
        with _on_activations(learner, plan.tune_stages):
            yield
        return
    saved = learner.model, learner.train_dl, learner.valid_dl, learner.memory_format
    started = time.perf_counter()
    train_dl, valid_dl = learner.features.loaders(learner.model, learner.device,
                                                  progress=lambda done, total: learner.call("on_features", done, total),
                                                  precision=learner.precision.name, tta=learner.tta)
    if learner.features.stats.get("computed"):
        learner.timings["features"] = learner.timings.get("features", 0.0) + time.perf_counter() - started
    learner.model = HeadOnFeatures(learner.model)
    learner.train_dl, learner.valid_dl, learner.memory_format = train_dl, valid_dl, torch.contiguous_format
    try:
        yield
    finally:
        learner.model, learner.train_dl, learner.valid_dl, learner.memory_format = saved


@contextmanager
def _on_activations(learner, tune_stages: int):
    """The learner's model as its :class:`UpperStages` on cached maps while the block runs."""
    saved = learner.model, learner.train_dl, learner.valid_dl
    train_dl, valid_dl = learner.features.activations.loaders(learner.model, tta=getattr(learner, "tta", False))
    learner.model = UpperStages(learner.model, tune_stages, learner.features.arch)
    learner.train_dl, learner.valid_dl = train_dl, valid_dl
    try:
        yield
    finally:
        learner.model, learner.train_dl, learner.valid_dl = saved


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
    device: str | torch.device | None = None,
    precision: str = "auto",
) -> torch.Tensor:
    """Pooled backbone features of image files (one row per file, the picture's own view), cached.

    Args:
        paths: readable image files.
        arch: a registry or timm name (default: imgtune's default backbone).
        weights: ``"imagenet"``, ``"none"`` or a weights file (see :func:`imgtune.create_model`).
        size, resize: the input size (default: the backbone's) and resize method.
        cache_dir, cache: where features and presized pictures are cached, and whether to.
        progress: print a progress bar.
        device: where the backbone runs (default: CUDA when present, else the CPU).
        precision: on CUDA, as for :func:`imgtune.train.device.choose_precision` (cached apart from fp32).

    Returns:
        A float32 tensor of shape (len(paths), F).
    """
    from imgtune.models import DEFAULT_ARCH, create_model, get_backbone

    arch = arch or DEFAULT_ARCH
    backbone = get_backbone(arch)
    size = size or backbone.size
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    model = create_model(arch, 2, weights=weights).eval()
    if not supports_features(model):
        raise ValueError(f"{arch}: has no timm-style forward_features/forward_head; cannot extract features")
    fingerprint = body_fingerprint(model, list(backbone.mean), list(backbone.std), size)
    view = ImageView(size, resize, cache_dir=cache_dir if cache else False)
    extractor = FeatureExtractor(model.to(device), size=size, device=device, fingerprint=fingerprint,
                                 cache_dir=cache_dir if cache else False, precision=precision)
    name = feature_store_name(fingerprint, view.name, extractor.precision)
    store = ArrayStore(cache_root(cache_dir) / "features" / name) if cache else None
    bar = progress_bar(len(paths), desc="features", unit="img") if progress else None

    def report(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.update(done - bar.n)

    try:
        features, _ = compute_features(list(paths), extractor, view, mean=backbone.mean, std=backbone.std,
                                       store=store, progress=report)
    finally:
        if bar is not None:
            bar.close()
    return features[:, 0]
