"""Find labelled images, check they can be read, split them, and turn them into batches.

Sources: a folder of class subfolders (optionally inside ``train/`` and ``valid/``), a flat folder
whose file names carry the label (``label_re``), a CSV of ``file,label[,split]``, or a named dataset
from :mod:`imgtune.datasets`. The data folder is only ever read.
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from PIL import Image
from torchvision.transforms import v2

from imgtune import distributed
from imgtune.cache import ArrayStore, cache_root, file_key
from imgtune.errors import ImgtuneError, UnreadableImageError
from imgtune.images import MAX_PIXELS, load_image

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})

#: The Oxford-IIIT Pet file-name pattern: ``great_pyrenees_12.jpg`` -> ``great_pyrenees``.
PETS_LABEL_RE = r"^(.+)_\d+\.(jpe?g|png)$"

RESIZE_METHODS = ("crop", "squish", "pad")
TRAIN_NAMES = ("train", "training")
VALID_NAMES = ("valid", "val", "validation")


@dataclass(frozen=True)
class Item:
    """One labelled image. ``split`` is ``"train"``, ``"valid"`` or ``None`` when the data gives none;
    ``group`` names its source (e.g. the session an image was drawn from), kept on one side of a split."""

    path: Path
    label: str
    split: str | None = None
    group: str | None = None


@dataclass(frozen=True)
class Skipped:
    """A file left out of training, and why."""

    path: Path
    reason: str


@dataclass
class ItemList:
    """What a source found: the items, the files it skipped, and (optionally) a preferred class order."""

    items: list[Item]
    skipped: list[Skipped] = field(default_factory=list)
    classes: list[str] | None = None
    description: str = ""


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def items_from_folder(root: str | Path) -> ItemList:
    """Items from one subfolder per class, or from ``train/`` and ``valid/`` folders of class subfolders.

    ``val/`` and ``validation/`` count as ``valid/``; so does ``test/`` when there is no other
    validation folder (a common layout). A ``train/`` folder with none of them is an error rather
    than a class called "train".
    """
    root = _existing_dir(root)
    subdirs = {p.name.lower(): p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    train_dir = next((subdirs[n] for n in TRAIN_NAMES if n in subdirs), None)
    valid_dir = next((subdirs[n] for n in (*VALID_NAMES, "test") if n in subdirs), None)
    if train_dir and not valid_dir:
        raise ImgtuneError(
            f"{root}: has {train_dir.name}/ but no valid/ (or val/, test/) folder; add one, or move the class "
            f"folders of {train_dir.name}/ up into {root} for a random split"
        )
    if train_dir and valid_dir:
        items = _class_folders(train_dir, "train") + _class_folders(valid_dir, "valid")
        description = f"{root} (class folders in {train_dir.name}/ and {valid_dir.name}/)"
    else:
        items = _class_folders(root, None)
        description = f"{root} (one folder per class)"
    if not items:
        loose = [p for p in root.iterdir() if p.is_file() and is_image_file(p)]
        hint = (
            " it holds image files directly: pass --label-re to read labels from their names"
            if loose
            else " put the images of each class in a subfolder named after the class"
        )
        raise ImgtuneError(f"{root}: no images found in class subfolders;{hint}")
    return ItemList(items=items, description=description)


def _class_folders(root: Path, split: str | None) -> list[Item]:
    items = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in sorted(class_dir.rglob("*")):
            if path.is_file() and is_image_file(path):
                items.append(Item(path, class_dir.name, split))
    return items


def items_from_name_re(root: str | Path, label_re: str) -> ItemList:
    """Items from a folder whose file names carry the label in the regex's first group.

    Files in ``train/`` and ``valid/`` subfolders get that split; other image files whose names do
    not match are skipped and reported.
    """
    root = _existing_dir(root)
    try:
        pattern = re.compile(label_re)
    except re.error as error:
        raise ImgtuneError(f"--label-re {label_re!r} is not a valid regular expression: {error}") from None
    if pattern.groups < 1:
        raise ImgtuneError(f"--label-re {label_re!r} needs a group (...) that captures the label")
    items, skipped = [], []
    for path in sorted(root.rglob("*")):
        if not (path.is_file() and is_image_file(path)):
            continue
        match = pattern.match(path.name)
        if match is None or not match.group(1):
            skipped.append(Skipped(path, f"name does not match --label-re {label_re}"))
            continue
        parent = path.parent.name.lower() if path.parent != root else ""
        split = "train" if parent in TRAIN_NAMES else "valid" if parent in VALID_NAMES else None
        items.append(Item(path, match.group(1), split))
    if not items:
        raise ImgtuneError(f"{root}: no image file name matches --label-re {label_re!r}")
    return ItemList(items=items, skipped=skipped, description=f"{root} (labels from file names)")


def items_from_csv(csv_path: str | Path, root: str | Path | None = None) -> ItemList:
    """Items from a CSV with columns ``file,label`` and optionally ``split`` (train or valid) and
    ``group`` (rows of one group stay on one side of a random split, as in ``imgtune render``'s manifest).

    ``file`` is relative to ``root``, which defaults to the CSV's folder.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise ImgtuneError(f"{csv_path}: CSV file not found")
    root = Path(root) if root is not None else csv_path.parent
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip().lower() for c in reader.fieldnames or []]
        if "file" not in columns or "label" not in columns:
            raise ImgtuneError(f"{csv_path}: needs a header with columns file,label[,split]; found {columns}")
        items, skipped = [], []
        for row in reader:
            line = reader.line_num  # counts the blank lines DictReader skips, unlike enumerate()
            row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
            if not row.get("file") or not row.get("label"):
                raise ImgtuneError(f"{csv_path}:{line}: empty file or label")
            split = _csv_split(row.get("split", ""), csv_path, line)
            path = root / row["file"]
            if not path.is_file():
                skipped.append(Skipped(path, f"listed in {csv_path.name} line {line} but not found"))
                continue
            items.append(Item(path, row["label"], split, row.get("group") or None))
    if not items:
        raise ImgtuneError(f"{csv_path}: no rows name an existing image file")
    return ItemList(items=items, skipped=skipped, description=f"{csv_path} (CSV)")


def _csv_split(value: str, csv_path: Path, line: int) -> str | None:
    value = value.lower()
    if not value:
        return None
    if value in TRAIN_NAMES:
        return "train"
    if value in VALID_NAMES:
        return "valid"
    raise ImgtuneError(f"{csv_path}:{line}: split must be 'train' or 'valid', not {value!r}")


def _existing_dir(root: str | Path) -> Path:
    root = Path(root)
    if not root.exists():
        raise ImgtuneError(f"{root}: no such folder (or dataset name; see `imgtune datasets`)")
    if not root.is_dir():
        raise ImgtuneError(f"{root}: not a folder; for a CSV of file,label pass --csv {root}")
    return root


def check_images(
    items: Sequence[Item],
    *,
    min_size: int | None = None,
    max_pixels: int = MAX_PIXELS,
    workers: int | None = None,
    view: "ImageView | None" = None,
) -> tuple[list[Item], list[Skipped]]:
    """Decode every image once; return the readable items and the skipped files with reasons.

    With a cached ``view``, a file whose presized picture is already in the cache counts as readable
    without decoding it again, and every file decoded here is presized and stored, so training and
    later runs read the small cached picture instead of decoding the original.
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

    workers = workers or min(8, (os.cpu_count() or 1) + 1)
    with ThreadPoolExecutor(workers) as pool:
        reasons = list(pool.map(check, items))
    good = [item for item, reason in zip(items, reasons) if reason is None]
    bad = [Skipped(item.path, reason) for item, reason in zip(items, reasons) if reason is not None]
    return good, bad


def split_items(
    items: Sequence[Item], *, valid_pct: float = 0.2, stratify: bool = False, seed: int = 42
) -> tuple[list[Item], list[Item]]:
    """Split items into train and valid.

    If every item carries a split (class folders under train/valid, or a CSV split column), that
    split is kept. Otherwise a seeded random ``valid_pct`` goes to valid; with ``stratify`` each class
    contributes ``valid_pct`` of its own items (rounded, and at least one each side when it has two).
    When items carry a ``group``, whole groups go to one side, ``valid_pct`` of each class's groups
    (a group's class is its most common label; an item without a group is a group of its own).
    """
    given = [item.split for item in items]
    if all(split is not None for split in given):
        return [i for i in items if i.split == "train"], [i for i in items if i.split == "valid"]
    if any(split is not None for split in given):
        raise ImgtuneError("some items have a train/valid split and some do not; give it for all or none")
    if not 0.0 < valid_pct < 1.0:
        raise ImgtuneError(f"--valid-pct must be between 0 and 1 (exclusive), not {valid_pct}")
    if any(item.group is not None for item in items):
        return _split_groups(items, valid_pct=valid_pct, seed=seed)
    rng = np.random.default_rng(seed)
    if not stratify:
        order = rng.permutation(len(items))
        n_valid = int(round(valid_pct * len(items)))
        valid_idx = set(order[:n_valid].tolist())
    else:
        valid_idx = set()
        by_class: dict[str, list[int]] = {}
        for index, item in enumerate(items):
            by_class.setdefault(item.label, []).append(index)
        for label in sorted(by_class):
            indices = by_class[label]
            order = rng.permutation(len(indices))
            n_valid = int(round(valid_pct * len(indices)))
            if len(indices) >= 2:
                n_valid = min(max(n_valid, 1), len(indices) - 1)
            valid_idx.update(indices[i] for i in order[:n_valid])
    train = [item for i, item in enumerate(items) if i not in valid_idx]
    valid = [item for i, item in enumerate(items) if i in valid_idx]
    return train, valid


def _split_groups(items: Sequence[Item], *, valid_pct: float, seed: int) -> tuple[list[Item], list[Item]]:
    """Whole groups to valid: ``valid_pct`` of each class's groups, at least one each side when it has two."""
    members: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        members.setdefault(item.group if item.group is not None else f"\0{item.path}", []).append(index)
    by_class: dict[str, list[str]] = {}
    for group, indices in members.items():
        label = Counter(items[i].label for i in indices).most_common(1)[0][0]
        by_class.setdefault(label, []).append(group)
    rng = np.random.default_rng(seed)
    valid_groups = set()
    for label in sorted(by_class):
        groups = sorted(by_class[label])
        order = rng.permutation(len(groups))
        n_valid = int(round(valid_pct * len(groups)))
        if len(groups) >= 2:
            n_valid = min(max(n_valid, 1), len(groups) - 1)
        valid_groups.update(groups[i] for i in order[:n_valid])
    in_valid = {i for group in valid_groups for i in members[group]}
    return ([item for i, item in enumerate(items) if i not in in_valid],
            [item for i, item in enumerate(items) if i in in_valid])


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
        view: "ImageView | None" = None,
    ) -> "ImageData":
        """Check the images (unless ``check=False``; through the presize cache of ``view`` when given),
        split them and fix the class order."""
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
            raise ImgtuneError("the validation set is empty; raise --valid-pct or add a valid/ folder")

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per class in each split, in class order."""
        train, valid = Counter(i.label for i in self.train), Counter(i.label for i in self.valid)
        return {c: {"train": train[c], "valid": valid[c]} for c in self.classes}

    def summary(self) -> str:
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

    def datasets(
        self, *, size: int, resize: str, mean, std, augment: bool = True, cache: bool = False, cache_dir=None
    ) -> tuple["ImageDataset", "ImageDataset"]:
        """Train and valid datasets. With ``cache``, each image is decoded and presized once and the
        picture kept on disk (see :class:`ImageView`), so later epochs and runs skip the decoding."""
        index = {c: i for i, c in enumerate(self.classes)}
        store = cache_dir if cache else False
        valid_view = ImageView(size, resize, cache_dir=store)
        if augment:
            train_view, train_tf = ImageView(size, resize, kind="train", cache_dir=store), train_transform(size, resize, mean, std)
        else:
            train_view, train_tf = valid_view, tensor_transform(mean, std)
        return (
            ImageDataset(self.train, index, train_tf, train_view),
            ImageDataset(self.valid, index, tensor_transform(mean, std), valid_view),
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
    ) -> tuple[DataLoader, DataLoader]:
        """Train and valid loaders. The train loader shuffles with a seeded generator; ``cache`` and
        ``cache_dir`` as in :meth:`datasets`.

        ``shard=(rank, world_size)`` gives one process of several its part of both (see
        :func:`imgtune.distributed.shard_samplers`); ``"auto"`` takes it from torch.distributed when
        a process group is initialised (torchrun), ``None`` loads everything."""
        train_ds, valid_ds = self.datasets(size=size, resize=resize, mean=mean, std=std, augment=augment,
                                           cache=cache, cache_dir=cache_dir)
        workers = default_num_workers() if num_workers is None else num_workers
        common = dict(num_workers=workers, pin_memory=pin_memory, persistent_workers=workers > 0)
        generator = torch.Generator().manual_seed(seed)
        shard = distributed.current_shard() if shard == "auto" else shard
        train_sampler, valid_sampler = (None, None) if shard is None else distributed.shard_samplers(
            train_ds, len(valid_ds), *shard, seed=seed)
        n_train = len(train_sampler) if train_sampler is not None else len(train_ds)
        train_dl = DataLoader(
            train_ds, batch_size=bs, shuffle=train_sampler is None, sampler=train_sampler, drop_last=n_train > bs,
            generator=generator, worker_init_fn=_seed_worker, **common,
        )
        valid_dl = DataLoader(valid_ds, batch_size=bs * 2, shuffle=False, sampler=valid_sampler, **common)
        return train_dl, valid_dl


def usable_cores(cgroup_cpu_max: str | Path = "/sys/fs/cgroup/cpu.max") -> int:
    """The CPU cores this process may really use: its affinity mask, capped by a cgroup CPU quota (a
    container limited to 2 CPUs on a 64-core host sees 64 in ``os.cpu_count()``, and PyTorch would
    start 32 threads that fight over 2 cores)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path(cgroup_cpu_max).read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def default_num_workers() -> int:
    """Loader processes: one per core, at most 8; none on a single core."""
    cores = usable_cores()
    return 0 if cores < 2 else min(cores, 8)


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    import random

    random.seed(seed)


class ImageDataset(Dataset):
    """Items as (image tensor, class index) pairs: ``view`` loads the presized picture, ``transform``
    augments it (training) and turns it into a normalised tensor."""

    def __init__(self, items: Sequence[Item], class_index: dict[str, int], transform, view: "ImageView"):
        self.items = list(items)
        self.class_index = class_index
        self.transform = transform
        self.view = view

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        item = self.items[index]
        return self.transform(self.view(item.path)), self.class_index[item.label]


#: The training view keeps this much more than the training size, so random crops stay sharp.
TRAIN_PRESIZE = 1.25


class ImageView:
    """How a file becomes the picture the transforms start from, decoded and resized once.

    ``kind="valid"``: exactly what the deterministic resize of ``resize`` gives (``size`` x ``size``),
    so a cached picture gives bit-identical tensors to decoding the file. ``kind="train"``: the image
    shrunk so its shorter side is ``TRAIN_PRESIZE * size`` (never enlarged), the start of the random
    crops of augmentation. JPEGs are decoded at a reduced scale (in the DCT domain) while both sides
    stay at least the size needed.

    ``cache_dir``: ``False`` decodes every time; ``None`` keeps pictures in the default cache folder;
    a path keeps them there (see :mod:`imgtune.cache`).
    """

    def __init__(self, size: int, resize: str = "crop", *, kind: str = "valid", cache_dir=None):
        if kind not in ("valid", "train"):
            raise ValueError(f"kind must be 'valid' or 'train', not {kind!r}")
        self.size, self.resize, self.kind = size, resize, kind
        self.min_side = size if kind == "valid" else math.ceil(TRAIN_PRESIZE * size)
        self.resizer = v2.Compose(_resize(size, resize)) if kind == "valid" else None
        self.name = f"{kind}-{size}-{resize}" if kind == "valid" else f"train-{self.min_side}"
        self.store = None if cache_dir is False else ArrayStore(cache_root(cache_dir) / "presized" / self.name)

    def __call__(self, path: str | Path) -> Image.Image:
        """The presized picture of the file at ``path`` (from the cache when there)."""
        if self.store is not None:
            key = file_key(path)
            cached = self.store.get(key)
            if cached is not None:
                return _from_array(cached)
            picture = self.make(load_image(path, min_size=self.min_side))
            self.store.put(key, _to_array(picture))
            return picture
        return self.make(load_image(path, min_size=self.min_side))

    def ensure(self, path: str | Path, *, max_pixels: int = MAX_PIXELS) -> None:
        """Make sure the file's picture is cached, decoding it only if it is not (raises
        :class:`UnreadableImageError` for a bad file)."""
        if self.store is None:
            load_image(path, min_size=self.min_side, max_pixels=max_pixels)
            return
        try:
            key = file_key(path)
        except OSError:
            raise UnreadableImageError(f"{path}: no such file", "missing") from None
        if key not in self.store:
            self.store.put(key, _to_array(self.make(load_image(path, min_size=self.min_side, max_pixels=max_pixels))))

    def make(self, image: Image.Image) -> Image.Image:
        if self.resizer is not None:
            return self.resizer(image)
        short = min(image.size)
        if short <= self.min_side:
            return image
        return v2.functional.resize(image, [self.min_side], antialias=True)


def _to_array(picture: Image.Image) -> np.ndarray:
    """H x W x 3, or H x W x 1 for a grey picture (a third of the disk)."""
    array = np.asarray(picture)
    if (array[..., 0] == array[..., 1]).all() and (array[..., 0] == array[..., 2]).all():
        return array[..., :1]
    return array


def _from_array(array: np.ndarray) -> Image.Image:
    if array.shape[-1] == 1:
        return Image.fromarray(array[..., 0], mode="L").convert("RGB")
    return Image.fromarray(array, mode="RGB")


class ResizeToFit:
    """Resize so the longer side is ``size`` (keeping the aspect ratio); padding then makes it square."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image):
        width, height = image.size
        scale = self.size / max(width, height)
        new = (max(1, round(height * scale)), max(1, round(width * scale)))
        return v2.functional.resize(image, list(new), antialias=True)


def _resize(size: int, resize: str) -> list:
    if resize == "crop":
        return [v2.Resize(size, antialias=True), v2.CenterCrop(size)]
    if resize == "squish":
        return [v2.Resize((size, size), antialias=True)]
    if resize == "pad":
        return [ResizeToFit(size), v2.CenterCrop(size)]  # CenterCrop pads a smaller image with black
    raise ImgtuneError(f"--resize must be one of {', '.join(RESIZE_METHODS)}, not {resize!r}")


def _to_tensor(mean, std) -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def tensor_transform(mean, std) -> v2.Compose:
    """A picture (already presized, see :class:`ImageView`) to a normalised float tensor."""
    return v2.Compose(_to_tensor(mean, std))


def valid_transform(size: int, resize: str, mean, std) -> v2.Compose:
    """Deterministic: resize by ``resize`` to ``size`` x ``size``, then normalise."""
    return v2.Compose(_resize(size, resize) + _to_tensor(mean, std))


def train_transform(size: int, resize: str, mean, std) -> v2.Compose:
    """Augmented: a random crop of 50-100% of the area (``crop``) or a zoom of up to 1.2x (``squish``,
    ``pad``), a horizontal flip, a rotation of up to 10 degrees, and brightness/contrast of +-20%."""
    if resize == "crop":
        geometry = [v2.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True)]
    else:
        geometry = _resize(size, resize) + [v2.RandomAffine(degrees=0, scale=(1.0, 1.2))]
    return v2.Compose(
        geometry
        + [
            v2.RandomHorizontalFlip(),
            v2.RandomRotation(10),
            v2.ColorJitter(brightness=0.2, contrast=0.2),
        ]
        + _to_tensor(mean, std)
    )


def find_items(
    source: str | Path | None = None,
    *,
    label_re: str | None = None,
    csv_path: str | Path | None = None,
    data_dir: str | Path | None = None,
) -> ItemList:
    """Find items from a path, a CSV, or a named dataset (``None`` is the embedded default)."""
    from imgtune import datasets

    if csv_path is not None:
        return items_from_csv(csv_path, root=source)
    if source is None or (str(source) in datasets.CATALOGUE and not Path(source).exists()):
        return datasets.get(str(source) if source is not None else datasets.DEFAULT).items(data_dir=data_dir)
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
