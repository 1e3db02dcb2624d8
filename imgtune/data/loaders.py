"""Check, split and batch labelled images from any source: :func:`load_data`, :class:`ImageData`, loaders."""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from imgtune.data import catalogue, shards
from imgtune.data.images import MAX_PIXELS, load_image
from imgtune.data.presize import ImageView
from imgtune.data.sources import (
    Item,
    ItemList,
    Skipped,
    items_from_csv,
    items_from_folder,
    items_from_name_re,
)
from imgtune.data.split import split_items
from imgtune.data.transforms import ToNormalizedTensor, tensor_transform, train_transform
from imgtune.errors import ImgtuneError, UnreadableImageError
from imgtune.system import io_threads, usable_cores


def check_images(
    items: Sequence[Item],
    *,
    min_size: int | None = None,
    max_pixels: int = MAX_PIXELS,
    workers: int | None = None,
    view: ImageView | None = None,
) -> tuple[list[Item], list[Skipped]]:
    """Decode every image once; return the readable items and the skipped files with reasons.

    With a cached ``view``, a file whose presized picture is already in the cache counts as readable
    without decoding it again, and every file decoded here is presized and stored, so training and
    later runs read the small cached picture instead of decoding the original.

    Args:
        items: the images to check.
        min_size: decode JPEGs at a reduced scale down to this side (see :func:`load_image`).
        max_pixels: refuse images with more pixels than this.
        workers: threads decoding at once (default: :func:`imgtune.system.io_threads`).
        view: check through this view's presize cache.

    Returns:
        ``(readable, skipped)``: the items that decode, in order, and a :class:`Skipped` per other file.
    """

    def check(item: Item) -> str | None:
        try:
            if view is not None:
                view.ensure(item.path, max_pixels=max_pixels)
            else:
                load_image(item.path, min_size=min_size, max_pixels=max_pixels)
        except UnreadableImageError as error:
            return str(error).removeprefix(f"{item.path}: ")
        return None

    workers = workers or io_threads()
    with ThreadPoolExecutor(workers) as pool:
        reasons = list(pool.map(check, items))
    good = [item for item, reason in zip(items, reasons) if reason is None]
    bad = [Skipped(item.path, reason) for item, reason in zip(items, reasons) if reason is not None]
    return good, bad


@dataclass
class ImageData:
    """Labelled images split into train and valid, with the class order fixed.

    Build one with :func:`load_data` (any source or dataset name) or :meth:`from_items`.
    """

    classes: list[str]
    train: list[Item]
    valid: list[Item]
    skipped: list[Skipped] = field(default_factory=list)
    description: str = ""

    @classmethod
    def from_items(
        cls,
        found: ItemList,
        *,
        valid_pct: float = 0.2,
        stratify: bool = False,
        seed: int = 42,
        check: bool = True,
        max_pixels: int = MAX_PIXELS,
        view: ImageView | None = None,
    ) -> ImageData:
        """Check the images (unless ``check=False``; through the presize cache of ``view`` when given),
        split them and fix the class order.

        Args:
            found: the items a source found (see :func:`find_items`).
            valid_pct, stratify, seed: the split (see :func:`imgtune.data.split.split_items`).
            check: decode every image first and skip unreadable ones.
            max_pixels: refuse larger images.
            view: check through this :class:`ImageView`'s presize cache.

        Returns:
            An :class:`ImageData`.

        Raises:
            ImgtuneError: fewer than two classes, or a class without readable images.
        """
        items, skipped = list(found.items), list(found.skipped)
        # Classes come from every item found, so a class whose files are all unreadable fails
        # validate() with its name instead of silently vanishing from the model.
        labels = {item.label for item in items}
        if check:
            items, bad = check_images(items, max_pixels=max_pixels, view=view)
            skipped += bad
        train, valid = split_items(items, valid_pct=valid_pct, stratify=stratify, seed=seed)
        classes = [c for c in (found.classes or []) if c in labels] + sorted(labels - set(found.classes or []))
        data = cls(classes=classes, train=train, valid=valid, skipped=skipped, description=found.description)
        data.validate()
        return data

    def validate(self) -> None:
        """Fail with a clear message unless there are two or more classes, each with training images."""
        if len(self.classes) < 2:
            found = self.classes[0] if self.classes else "none"
            raise ImgtuneError(
                f"{self.description or 'data'}: need at least two classes with readable images, found {found}"
                f" ({len(self.skipped)} files skipped)"
            )
        counts = Counter(item.label for item in self.train)
        empty = [c for c in self.classes if counts[c] == 0]
        if empty:
            raise ImgtuneError(f"class {empty[0]!r} has no readable training images; add some or remove the class")
        if not self.valid:
            raise ImgtuneError("the validation set is empty; raise `valid_pct` or add a valid/ folder")

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per class in each split, in class order."""
        train, valid = Counter(i.label for i in self.train), Counter(i.label for i in self.valid)
        return {c: {"train": train[c], "valid": valid[c]} for c in self.classes}

    def summary(self) -> str:
        """A few lines for the terminal: the source, the counts, and the first skipped files."""
        lines = [
            f"data: {self.description}",
            f"  {len(self.classes)} classes, {len(self.train)} train / {len(self.valid)} valid images,"
            f" {len(self.skipped)} skipped",
        ]
        for skipped in self.skipped[:10]:
            lines.append(f"  skipped {skipped.path}: {skipped.reason}")
        if len(self.skipped) > 10:
            lines.append(f"  ... and {len(self.skipped) - 10} more skipped files (listed in metrics.json)")
        return "\n".join(lines)

    def show_batch(self, n: int = 12, *, augmented: bool = True, seed: int = 0, size: int = 224,
                   resize: str = "crop"):
        """``n`` training pictures as the model sees them, titled with their labels (a notebook shows
        the figure; ``fig.savefig(path)`` writes it). The report's ``samples.png`` is drawn the same way.

        Args:
            n: how many pictures.
            augmented: with the training augmentation (flip, rotate, zoom, lighting); else only resized.
            seed: picks the pictures and seeds the augmentation (torch's global generator is left as it was).
            size, resize: as the learner's (see :meth:`imgtune.train.learner.Learner.from_data`).

        Returns:
            A :class:`matplotlib.figure.Figure` (made without pyplot: nothing to close).
        """
        from imgtune.data.show import plot_samples

        train_ds, _ = self.datasets(size=size, resize=resize, mean=(0.0,) * 3, std=(1.0,) * 3, augment=augmented,
                                    normalize=False)  # uint8 pictures: nothing to undo for display
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return plot_samples(train_ds, self.classes, n=n, seed=seed)

    def datasets(
        self, *, size: int, resize: str, mean, std, augment: bool = True, cache: bool = False, cache_dir=None,
        normalize: bool = True,
    ) -> tuple[ImageDataset, ImageDataset]:
        """Train and valid datasets. With ``cache``, each image is decoded and presized once and the
        picture kept on disk (see :class:`ImageView`), so later epochs and runs skip the decoding.
        ``normalize=False``: uint8 pictures, for :class:`DeviceNormalize` to normalise on the GPU.

        Args:
            size, resize: the picture side and how to fit it (``"crop"``, ``"squish"``, ``"pad"``).
            mean, std: the backbone's normalisation.
            augment: augment the training pictures.
            cache, cache_dir: keep presized pictures on disk, and where.
            normalize: normalise here (else uint8 pictures).

        Returns:
            ``(train, valid)`` datasets of ``(picture, class index)``.
        """
        index = {c: i for i, c in enumerate(self.classes)}
        store = cache_dir if cache else False
        valid_view = ImageView(size, resize, cache_dir=store)
        to_tensor = tensor_transform(mean, std, normalize=normalize)
        if augment:
            train_view = ImageView(size, resize, kind="train", cache_dir=store)
            train_tf = train_transform(size, resize, mean, std, normalize=normalize)
        else:
            train_view, train_tf = valid_view, to_tensor
        return (
            ImageDataset(self.train, index, train_tf, train_view),
            ImageDataset(self.valid, index, to_tensor, valid_view),
        )

    def loaders(
        self,
        *,
        size: int = 224,
        resize: str = "crop",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        bs: int = 32,
        augment: bool = True,
        num_workers: int | None = None,
        seed: int = 42,
        pin_memory: bool = False,
        cache: bool = False,
        cache_dir=None,
        shard: tuple[int, int] | None | str = "auto",
        device: str | torch.device | None = None,
    ) -> tuple[DataLoader, DataLoader]:
        """Train and valid loaders. The train loader shuffles with a seeded generator; ``cache`` and
        ``cache_dir`` as in :meth:`datasets`.

        ``shard=(rank, world_size)`` gives one process of several its part of both (see
        :func:`imgtune.data.shards.shard_samplers`); ``"auto"`` takes it from torch.distributed when
        a process group is initialised (torchrun), ``None`` loads everything.

        ``device``: where the batches go (``None``: unknown, the CPU's loaders). For CUDA the batches
        are uint8 pictures in pinned memory (a quarter of float32's bytes, copied without waiting),
        to be normalised on the GPU by :class:`DeviceNormalize`; the workers are more (see
        :func:`default_num_workers`), and the valid loader's start for each evaluation instead of
        idling beside the training loader's.

        Args:
            size, resize, mean, std, augment, cache, cache_dir: as for :meth:`datasets`.
            bs: the batch size (the valid loader's is twice it).
            num_workers: loader processes (default: :func:`default_num_workers`).
            seed: seeds the shuffling and the augmentation.
            pin_memory: pinned batches (always on for CUDA).
            shard: ``(rank, world_size)``, ``"auto"`` or ``None``, as above.
            device: where the batches go, as above.

        Returns:
            ``(train_dl, valid_dl)``.
        """
        cuda = device is not None and torch.device(device).type == "cuda"
        train_ds, valid_ds = self.datasets(size=size, resize=resize, mean=mean, std=std, augment=augment,
                                           cache=cache, cache_dir=cache_dir, normalize=not cuda)
        workers = default_num_workers(device) if num_workers is None else num_workers
        common = dict(num_workers=workers, pin_memory=pin_memory or cuda)
        generator = torch.Generator().manual_seed(seed)
        shard = shards.current_shard() if shard == "auto" else shard
        train_sampler, valid_sampler = (None, None) if shard is None else shards.shard_samplers(
            train_ds, len(valid_ds), *shard, seed=seed)
        n_train = len(train_sampler) if train_sampler is not None else len(train_ds)
        train_dl = DataLoader(
            train_ds, batch_size=bs, shuffle=train_sampler is None, sampler=train_sampler, drop_last=n_train > bs,
            generator=generator, worker_init_fn=_seed_worker, persistent_workers=workers > 0, **common,
        )
        valid_dl = DataLoader(valid_ds, batch_size=bs * 2, shuffle=False, sampler=valid_sampler,
                              persistent_workers=workers > 0 and not cuda, **common)
        return train_dl, valid_dl


#: Loader processes per training process at most, off CUDA: there the workers share the cores with
#: the training itself, and more than 8 only take turns.
CPU_MAX_WORKERS = 8


def local_processes() -> int:
    """The training processes on this machine: torchrun's ``LOCAL_WORLD_SIZE`` (1 outside torchrun)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def default_num_workers(device: str | torch.device | None = None) -> int:
    """Loader processes for one training process: its share of the usable cores (divided among the
    ``LOCAL_WORLD_SIZE`` processes torchrun starts on a machine); none when that share is one core.

    Off CUDA at most :data:`CPU_MAX_WORKERS`. On CUDA the GPU computes, so every core of the share
    but one (the training process's own, which feeds the GPU) decodes and augments pictures.
    """
    cores = usable_cores() // local_processes()
    if cores < 2:
        return 0
    if device is not None and torch.device(device).type == "cuda":
        return cores - 1
    return min(cores, CPU_MAX_WORKERS)


class DeviceNormalize:
    """uint8 picture batches to normalised float32 where they are (on the GPU, after their copy):
    the same arithmetic as the CPU loaders' :class:`ToNormalizedTensor` (``(x / 255 - mean) / std``).

    Args:
        mean, std: the per-channel normalisation.
    """

    def __init__(self, mean, std):
        self._fused = ToNormalizedTensor(mean, std)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self._fused.normalize(images)


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class ImageDataset(Dataset):
    """Items as (image tensor, class index) pairs: ``view`` loads the presized picture, ``transform``
    augments it (training) and turns it into a normalised tensor."""

    def __init__(self, items: Sequence[Item], class_index: dict[str, int], transform, view: ImageView):
        self.items = list(items)
        self.class_index = class_index
        self.transform = transform
        self.view = view

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        item = self.items[index]
        return self.transform(self.view(item.path)), self.class_index[item.label]


def find_items(
    source: str | Path | None = None,
    *,
    label_re: str | None = None,
    csv_path: str | Path | None = None,
    data_dir: str | Path | None = None,
) -> ItemList:
    """Find items from a path, a CSV, or a named dataset (``None`` is the embedded default)."""
    if csv_path is not None:
        return items_from_csv(csv_path, root=source)
    if source is None or (str(source) in catalogue.CATALOGUE and not Path(source).exists()):
        return catalogue.get(str(source) if source is not None else catalogue.DEFAULT).items(data_dir=data_dir)
    if label_re:
        return items_from_name_re(source, label_re)
    return items_from_folder(source)


def load_data(
    source: str | Path | None = None,
    *,
    label_re: str | None = None,
    csv_path: str | Path | None = None,
    data_dir: str | Path | None = None,
    valid_pct: float = 0.2,
    stratify: bool = False,
    seed: int = 42,
    check: bool = True,
    view: ImageView | None = None,
) -> ImageData:
    """Find, check and split labelled images from any source imgtune accepts.

    Args:
        source: a folder, a dataset name (see ``imgtune datasets``) or ``None`` for the default
            dataset; with ``csv_path``, the folder the CSV's file names are relative to.
        label_re: read labels from file names with this regex's first group (e.g. ``PETS_LABEL_RE``).
        csv_path: a CSV of ``file,label[,split]``.
        data_dir: a local copy of a named dataset (used instead of downloading).
        valid_pct: fraction held out for validation when the data gives no split.
        stratify: hold out ``valid_pct`` of each class.
        seed: seeds the split.
        check: decode every image first and skip unreadable ones.
        view: check through this :class:`ImageView`'s presize cache: files already cached are not
            decoded again, and files decoded are presized and cached for training.

    Returns:
        An :class:`ImageData`.
    """
    found = find_items(source, label_re=label_re, csv_path=csv_path, data_dir=data_dir)
    return ImageData.from_items(found, valid_pct=valid_pct, stratify=stratify, seed=seed, check=check, view=view)
