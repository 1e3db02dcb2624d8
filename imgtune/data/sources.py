"""Where labelled images come from: class folders (optionally under train/ and valid/), labels in
file names (``label_re``), a CSV of ``file,label[,split][,group]``. The data folder is only ever read."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

from imgtune.errors import ImgtuneError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
#: The Oxford-IIIT Pet file-name pattern: ``great_pyrenees_12.jpg`` -> ``great_pyrenees``.
PETS_LABEL_RE = r"^(.+)_\d+\.(jpe?g|png)$"
#: Folder names (any case) and CSV ``split`` values that mean the training or the validation set.
TRAIN_NAMES = ("train", "training")
VALID_NAMES = ("valid", "val", "validation")
#: The reason recorded (as a :class:`Skipped` entry of the folder) for a class folder without images.
EMPTY_CLASS_FOLDER = "class folder has no images: ignored"


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
    """Whether ``path`` names an image by its extension (hidden files are not)."""
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
    empty: list[Skipped] = []
    if train_dir and valid_dir:
        items = _class_folders(train_dir, "train", empty) + _class_folders(valid_dir, "valid", empty)
        description = f"{root} (class folders in {train_dir.name}/ and {valid_dir.name}/)"
    else:
        items = _class_folders(root, None, empty)
        description = f"{root} (one folder per class)"
    if not items:
        loose = [p for p in root.iterdir() if p.is_file() and is_image_file(p)]
        hint = (
            " it holds image files directly: pass `label_re` to read labels from their names"
            if loose
            else " put the images of each class in a subfolder named after the class"
        )
        raise ImgtuneError(f"{root}: no images found in class subfolders;{hint}")
    return ItemList(items=items, skipped=empty, description=description)


def _class_folders(root: Path, split: str | None, empty: list[Skipped]) -> list[Item]:
    """The images of each class folder under ``root``; a folder without any is added to ``empty``."""
    items = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found = [Item(path, class_dir.name, split) for path in sorted(class_dir.rglob("*"))
                 if path.is_file() and is_image_file(path)]
        if not found:
            empty.append(Skipped(class_dir, EMPTY_CLASS_FOLDER))
        items += found
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
        raise ImgtuneError(f"`label_re` {label_re!r} is not a valid regular expression: {error}") from None
    if pattern.groups < 1:
        raise ImgtuneError(f"`label_re` {label_re!r} needs a group (...) that captures the label")
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
        raise ImgtuneError(f"{root}: no image file name matches `label_re` {label_re!r}")
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
        raise ImgtuneError(f"{root}: not a folder; for a CSV of file,label pass `csv_path={root}`")
    return root
