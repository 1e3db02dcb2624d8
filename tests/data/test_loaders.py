"""Finding labelled images (folders, file names, CSV), splitting them, skipping bad files, and batches."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_class_folders, noisy_image
from imgtune.data.sources import PETS_LABEL_RE, Item, items_from_csv, items_from_folder, items_from_name_re
from imgtune.data.loaders import ImageData, load_data
from imgtune.data.split import split_items
from imgtune.errors import ImgtuneError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def write_image(path: Path, colour=(200, 100, 50), size=(8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def write_broken_files(folder: Path) -> dict[str, str]:
    """Three unreadable files in ``folder``; returns name -> a word of the reason each is skipped."""
    (folder / "notes.png").write_text("this is text, not a picture")
    (folder / "empty.jpg").write_bytes(b"")
    data = (folder / sorted(p.name for p in folder.glob("*.png") if p.name != "notes.png")[0]).read_bytes()
    (folder / "cut.png").write_bytes(data[: len(data) // 2])
    return {"notes.png": "not an image", "empty.jpg": "empty", "cut.png": "truncated"}


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` with its modification time and (for files) its bytes."""
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    } | {".": (root.stat().st_mtime_ns, None)}


def labels_of(items) -> Counter:
    return Counter(item.label for item in items)


def items(labels: dict[str, int]) -> list[Item]:
    """Fake items (no files): ``n`` per label."""
    return [Item(Path(f"{label}_{i}.png"), label) for label, n in labels.items() for i in range(n)]


# --- class folders ----------------------------------------------------------------------------------


def test_class_folders_label_each_image_by_its_folder(image_folder):
    found = items_from_folder(image_folder)
    assert labels_of(found.items) == {"red": 8, "green": 8, "blue": 8}
    assert all(item.path.parent.name == item.label for item in found.items)
    assert all(item.split is None for item in found.items)


def test_class_folders_ignore_hidden_and_non_image_files_and_include_nested(image_folder):
    (image_folder / "red" / "notes.txt").write_text("not an image")
    write_image(image_folder / "red" / ".hidden.png")
    write_image(image_folder / ".thumbnails" / "x.png")
    write_image(image_folder / "red" / "more" / "deep.JPG")
    found = items_from_folder(image_folder)
    assert labels_of(found.items) == {"red": 9, "green": 8, "blue": 8}
    assert image_folder / "red" / "more" / "deep.JPG" in {item.path for item in found.items}


@pytest.mark.parametrize("train_name, valid_name", [("train", "valid"), ("Train", "val"), ("training", "validation")])
def test_train_and_valid_folders_give_the_split(tmp_path, train_name, valid_name):
    make_class_folders(tmp_path / train_name, n=4)
    make_class_folders(tmp_path / valid_name, n=2)
    found = items_from_folder(tmp_path)
    assert labels_of(found.items) == {"red": 6, "green": 6, "blue": 6}
    assert Counter(item.split for item in found.items) == {"train": 12, "valid": 6}
    assert all(item.path.parts[-3] == {"train": train_name, "valid": valid_name}[item.split] for item in found.items)
    data = load_data(tmp_path, valid_pct=0.5, seed=1)  # the given split wins over valid_pct
    assert data.classes == ["blue", "green", "red"]
    assert data.counts() == {c: {"train": 4, "valid": 2} for c in data.classes}


def test_flat_folder_of_images_suggests_label_re(tmp_path):
    for i in range(3):
        write_image(tmp_path / f"cat_{i}.jpg")
    with pytest.raises(ImgtuneError, match="--label-re"):
        items_from_folder(tmp_path)


def test_empty_folder_asks_for_class_subfolders(tmp_path):
    with pytest.raises(ImgtuneError, match="subfolder") as error:
        items_from_folder(tmp_path)
    assert "--label-re" not in str(error.value)


def test_missing_folder_and_file_instead_of_folder(tmp_path):
    with pytest.raises(ImgtuneError, match="no such folder"):
        items_from_folder(tmp_path / "nope")
    (tmp_path / "labels.csv").write_text("file,label\n")
    with pytest.raises(ImgtuneError, match="--csv"):
        items_from_folder(tmp_path / "labels.csv")


# --- labels from file names ------------------------------------------------------------------------


def test_pets_pattern_reads_breeds_from_file_names(tmp_path):
    names = ["great_pyrenees_12.jpg", "great_pyrenees_3.jpg", "Abyssinian_3.jpg", "Abyssinian_101.jpeg", "pug_7.png"]
    for name in names:
        write_image(tmp_path / name)
    write_image(tmp_path / "cover.jpg")  # no number: reported, not guessed
    write_image(tmp_path / "cat_1.gif")  # an image, but not an extension the pattern allows
    (tmp_path / "list_1.txt").write_text("not an image, silently ignored")
    found = items_from_name_re(tmp_path, PETS_LABEL_RE)
    assert {item.path.name: item.label for item in found.items} == {
        "great_pyrenees_12.jpg": "great_pyrenees",
        "great_pyrenees_3.jpg": "great_pyrenees",
        "Abyssinian_3.jpg": "Abyssinian",
        "Abyssinian_101.jpeg": "Abyssinian",
        "pug_7.png": "pug",
    }
    assert sorted(s.path.name for s in found.skipped) == ["cat_1.gif", "cover.jpg"]
    assert all("--label-re" in s.reason for s in found.skipped)


def test_label_re_train_and_valid_subfolders_give_the_split(tmp_path):
    for split, n in [("train", 3), ("valid", 1)]:
        for label in ["beagle", "pug"]:
            for i in range(n):
                write_image(tmp_path / split / f"{label}_{i}.jpg")
    found = items_from_name_re(tmp_path, PETS_LABEL_RE)
    assert Counter((item.split, item.label) for item in found.items) == {
        ("train", "beagle"): 3, ("train", "pug"): 3, ("valid", "beagle"): 1, ("valid", "pug"): 1,
    }


@pytest.mark.parametrize("label_re, message", [(r"^.+_\d+\.jpg$", "group"), (r"^(.+_\d+\.jpg$", "regular expression")])
def test_label_re_without_a_group_or_invalid_is_an_error(tmp_path, label_re, message):
    write_image(tmp_path / "pug_1.jpg")
    with pytest.raises(ImgtuneError, match=message):
        items_from_name_re(tmp_path, label_re)


def test_label_re_matching_nothing_is_an_error(tmp_path):
    write_image(tmp_path / "photo.jpg")
    with pytest.raises(ImgtuneError, match="no image file name matches"):
        items_from_name_re(tmp_path, PETS_LABEL_RE)


def test_load_data_with_label_re(tmp_path):
    for label, colour in [("beagle", (200, 50, 50)), ("pug", (50, 50, 200))]:
        for i in range(4):
            noisy_image(colour, 16, seed=i).save(tmp_path / f"{label}_{i}.png")
    data = load_data(tmp_path, label_re=PETS_LABEL_RE, valid_pct=0.25, stratify=True)
    assert data.classes == ["beagle", "pug"]
    assert data.counts() == {"beagle": {"train": 3, "valid": 1}, "pug": {"train": 3, "valid": 1}}


# --- CSV ----------------------------------------------------------------------------------------------


@pytest.fixture
def csv_folder(tmp_path) -> Path:
    for name in ["a.png", "b.png", "c.png", "sub/d.png"]:
        write_image(tmp_path / name)
    return tmp_path


def test_csv_file_and_label(csv_folder):
    (csv_folder / "labels.csv").write_text("file,label\na.png,cat\nb.png,dog\nsub/d.png,dog\n")
    found = items_from_csv(csv_folder / "labels.csv")
    assert [(item.path, item.label, item.split) for item in found.items] == [
        (csv_folder / "a.png", "cat", None),
        (csv_folder / "b.png", "dog", None),
        (csv_folder / "sub" / "d.png", "dog", None),
    ]


def test_csv_header_is_case_and_space_insensitive_and_extra_columns_are_ignored(csv_folder):
    (csv_folder / "labels.csv").write_text("\ufeffFile , Label,Notes\na.png , cat ,x\nb.png,dog,y\n")
    found = items_from_csv(csv_folder / "labels.csv")
    assert [(item.path.name, item.label) for item in found.items] == [("a.png", "cat"), ("b.png", "dog")]


def test_csv_split_column(csv_folder):
    (csv_folder / "labels.csv").write_text("file,label,split\na.png,cat,train\nb.png,dog,Valid\nc.png,dog,val\n")
    found = items_from_csv(csv_folder / "labels.csv")
    assert [item.split for item in found.items] == ["train", "valid", "valid"]


def test_csv_bad_split_value_names_the_file_and_line(csv_folder):
    csv_path = csv_folder / "labels.csv"
    # The bad row is on line 4 of the file: a blank line before it still counts.
    csv_path.write_text("file,label,split\na.png,cat,train\n\nb.png,dog,test\n")
    with pytest.raises(ImgtuneError, match="'test'") as error:
        items_from_csv(csv_path)
    assert f"{csv_path}:4:" in str(error.value)


def test_csv_empty_label_names_the_line(csv_folder):
    (csv_folder / "labels.csv").write_text("file,label\na.png,cat\nb.png,\n")
    with pytest.raises(ImgtuneError, match=r"labels\.csv:3: empty"):
        items_from_csv(csv_folder / "labels.csv")


def test_csv_missing_files_are_skipped_with_their_line(csv_folder):
    (csv_folder / "labels.csv").write_text("file,label\na.png,cat\ngone.png,cat\nb.png,dog\n")
    found = items_from_csv(csv_folder / "labels.csv")
    assert [item.path.name for item in found.items] == ["a.png", "b.png"]
    assert [(s.path, s.reason) for s in found.skipped] == [
        (csv_folder / "gone.png", "listed in labels.csv line 3 but not found")
    ]


@pytest.mark.parametrize("header", ["file,class", "path,label", "a.png,cat"])
def test_csv_missing_columns_is_an_error(csv_folder, header):
    (csv_folder / "labels.csv").write_text(f"{header}\na.png,cat\n")
    with pytest.raises(ImgtuneError, match="file,label"):
        items_from_csv(csv_folder / "labels.csv")


def test_csv_missing_file_and_no_existing_rows(csv_folder):
    with pytest.raises(ImgtuneError, match="not found"):
        items_from_csv(csv_folder / "nope.csv")
    (csv_folder / "labels.csv").write_text("file,label\ngone.png,cat\n")
    with pytest.raises(ImgtuneError, match="no rows"):
        items_from_csv(csv_folder / "labels.csv")


def test_load_data_with_csv_elsewhere_relative_to_source(tmp_path, image_folder):
    rows = [f"{c}/{c}_{i}.png,{c}" for c in ["red", "blue"] for i in range(4)]
    csv_path = tmp_path / "lists" / "labels.csv"
    csv_path.parent.mkdir()
    csv_path.write_text("file,label\n" + "\n".join(rows) + "\n")
    data = load_data(image_folder, csv_path=csv_path, valid_pct=0.25, stratify=True)
    assert data.classes == ["blue", "red"]
    assert all(item.path.is_relative_to(image_folder) for item in data.train + data.valid)


# --- splits ------------------------------------------------------------------------------------------


def test_random_split_is_seeded():
    found = items({"a": 30, "b": 20})
    first = split_items(found, valid_pct=0.2, seed=7)
    assert split_items(found, valid_pct=0.2, seed=7) == first
    assert split_items(found, valid_pct=0.2, seed=8)[1] != first[1]


@pytest.mark.parametrize("n, valid_pct", [(50, 0.2), (10, 0.25), (7, 0.5), (3, 0.1), (101, 0.33)])
def test_random_split_holds_out_round_valid_pct_of_the_items(n, valid_pct):
    found = items({"a": n - n // 2, "b": n // 2})
    train, valid = split_items(found, valid_pct=valid_pct, seed=0)
    assert len(valid) == round(valid_pct * n)
    assert sorted(map(str, (i.path for i in train + valid))) == sorted(str(i.path) for i in found)


def test_stratified_split_gives_each_class_its_share():
    found = items({"a": 10, "b": 20, "c": 5, "d": 2, "e": 1})
    train, valid = split_items(found, valid_pct=0.2, stratify=True, seed=3)
    # round(20% of each class), but at least one on each side for a class of two; a single image trains.
    assert labels_of(valid) == {"a": 2, "b": 4, "c": 1, "d": 1}
    assert labels_of(train) == {"a": 8, "b": 16, "c": 4, "d": 1, "e": 1}
    assert split_items(found, valid_pct=0.2, stratify=True, seed=3) == (train, valid)
    assert split_items(found, valid_pct=0.2, stratify=True, seed=4) != (train, valid)


def test_given_split_is_kept():
    found = [Item(Path(f"{i}.png"), "ab"[i % 2], "valid" if i < 3 else "train") for i in range(10)]
    train, valid = split_items(found, valid_pct=0.5, stratify=True, seed=1)
    assert [i.path.name for i in valid] == ["0.png", "1.png", "2.png"]
    assert len(train) == 7 and all(i.split == "train" for i in train)


def test_mixed_given_and_missing_split_is_an_error():
    found = items({"a": 3, "b": 3}) + [Item(Path("x.png"), "a", "train")]
    with pytest.raises(ImgtuneError, match="some items"):
        split_items(found)


@pytest.mark.parametrize("valid_pct", [0.0, 1.0, -0.1, 1.5])
def test_invalid_valid_pct_is_an_error(valid_pct):
    with pytest.raises(ImgtuneError, match="--valid-pct"):
        split_items(items({"a": 5, "b": 5}), valid_pct=valid_pct)


# --- load_data: checking images, classes ------------------------------------------------------------


def test_load_data_splits_and_orders_classes(image_folder):
    data = load_data(image_folder, valid_pct=0.25, stratify=True, seed=0)
    assert data.classes == ["blue", "green", "red"]
    assert data.counts() == {c: {"train": 6, "valid": 2} for c in data.classes}
    assert not data.skipped
    assert "3 classes, 18 train / 6 valid images, 0 skipped" in data.summary()


def test_unreadable_files_are_skipped_and_listed_with_reasons(image_folder):
    broken = write_broken_files(image_folder / "red")
    data = load_data(image_folder, valid_pct=0.25, stratify=True, seed=0)
    reasons = {s.path.name: s.reason for s in data.skipped}
    assert set(reasons) == set(broken)
    for name, word in broken.items():
        assert word in reasons[name]
    used = {item.path.name for item in data.train + data.valid}
    assert used.isdisjoint(broken) and len(used) == 24
    assert "3 skipped" in data.summary() and "notes.png" in data.summary()
    unchecked = load_data(image_folder, check=False)  # check=False trusts every file
    assert len(unchecked.train) + len(unchecked.valid) == 27 and not unchecked.skipped


def test_preferred_class_order_from_the_source_is_kept(image_folder):
    found = items_from_folder(image_folder)
    found.classes = ["red", "purple", "green"]  # purple has no items; blue is not listed
    data = ImageData.from_items(found, check=False)
    assert data.classes == ["red", "green", "blue"]


def test_fewer_than_two_classes_is_an_error(tmp_path):
    make_class_folders(tmp_path, n=4, colours={"red": (220, 30, 30)})
    with pytest.raises(ImgtuneError, match="at least two classes"):
        load_data(tmp_path)


def test_only_one_class_left_after_skipping_is_an_error(tmp_path):
    make_class_folders(tmp_path, n=4, colours={"red": (220, 30, 30)})
    (tmp_path / "green").mkdir()
    for i in range(4):
        (tmp_path / "green" / f"green_{i}.png").write_text("broken")
    with pytest.raises(ImgtuneError, match="readable"):
        load_data(tmp_path)


def test_a_class_with_no_readable_images_is_an_error_not_dropped(image_folder):
    for path in (image_folder / "blue").iterdir():
        path.write_bytes(b"")
    with pytest.raises(ImgtuneError, match="'blue' has no readable training images"):
        load_data(image_folder)


def test_a_class_with_only_validation_images_is_an_error(tmp_path):
    make_class_folders(tmp_path / "train", n=3, colours={"red": (220, 30, 30), "green": (30, 200, 40)})
    make_class_folders(tmp_path / "valid", n=2)
    with pytest.raises(ImgtuneError, match="'blue' has no readable training images"):
        load_data(tmp_path)


def test_an_empty_validation_set_is_an_error(tmp_path):
    make_class_folders(tmp_path, n=1)
    with pytest.raises(ImgtuneError, match="validation set is empty"):
        load_data(tmp_path, valid_pct=0.1, stratify=True)


def test_a_folder_named_like_a_dataset_is_used_as_a_folder(tmp_path, monkeypatch):
    make_class_folders(tmp_path / "elpv", n=2, colours={"x": (0, 0, 0), "y": (255, 255, 255)})
    monkeypatch.chdir(tmp_path)
    data = load_data("elpv", valid_pct=0.5, stratify=True)
    assert data.classes == ["x", "y"]


def test_the_data_folder_is_never_modified(image_folder):
    write_broken_files(image_folder / "green")
    (image_folder / "labels.csv").write_text("file,label\n" + "".join(f"red/red_{i}.png,red\n" for i in range(8)))
    before = snapshot(image_folder)
    data = load_data(image_folder, valid_pct=0.25, stratify=True)
    for loader in data.loaders(size=16, bs=4, num_workers=0):
        for _ in loader:
            pass
    load_data(image_folder, label_re=r"^([a-z]+)_\d+\.png$", check=True)
    assert snapshot(image_folder) == before


# --- transforms and loaders -------------------------------------------------------------------------


def solid_data(tmp_path, size=(32, 32)) -> ImageData:
    """A white and a black image in each split."""
    paths = {c: write_image(tmp_path / f"{c}.png", v, size) for c, v in [("white", (255,) * 3), ("black", (0,) * 3)]}
    train = [Item(paths[c], c) for c in ["white", "black"] * 3]
    valid = [Item(paths["white"], "white"), Item(paths["black"], "black")]
    return ImageData(classes=["black", "white"], train=train, valid=valid)


def normalised(value: float) -> torch.Tensor:
    return ((value - torch.tensor(MEAN)) / torch.tensor(STD))[:, None, None]


@pytest.mark.parametrize("resize", ["crop", "squish", "pad"])
def test_loaders_yield_normalised_batches_of_the_right_shape(tmp_path, resize):
    train_dl, valid_dl = solid_data(tmp_path, size=(40, 30)).loaders(
        size=24, resize=resize, mean=MEAN, std=STD, bs=4, num_workers=0
    )
    for images, labels in train_dl:
        assert images.shape == (4, 3, 24, 24) and images.dtype == torch.float32
        assert labels.dtype == torch.int64 and set(labels.tolist()) <= {0, 1}
    images, labels = next(iter(valid_dl))
    assert images.shape == (2, 3, 24, 24) and labels.tolist() == [1, 0]  # classes: black, white
    if resize != "pad":  # pad adds black bands to the white image
        torch.testing.assert_close(images[0], normalised(1.0).expand(3, 24, 24))
    torch.testing.assert_close(images[1], normalised(0.0).expand(3, 24, 24))


def test_pad_leaves_black_bands_above_and_below_a_wide_image(tmp_path):
    data = solid_data(tmp_path, size=(64, 32))  # 2:1 -> 32x16 picture in a 32x32 square
    _, valid_dl = data.loaders(size=32, resize="pad", mean=MEAN, std=STD, bs=2, num_workers=0)
    white = next(iter(valid_dl))[0][0]
    torch.testing.assert_close(white[:, :8], normalised(0.0).expand(3, 8, 32))
    torch.testing.assert_close(white[:, 8:24], normalised(1.0).expand(3, 16, 32))
    torch.testing.assert_close(white[:, 24:], normalised(0.0).expand(3, 8, 32))


@pytest.mark.parametrize("resize, red_columns", [("squish", 8), ("crop", 0), ("pad", 8)])
def test_resize_modes_keep_or_cut_the_sides_of_a_wide_image(tmp_path, resize, red_columns):
    """A 64x32 image whose left quarter is red: crop cuts it off, squish and pad keep it."""
    values = np.full((32, 64, 3), 255, np.uint8)
    values[:, :16] = (255, 0, 0)
    path = tmp_path / "wide.png"
    Image.fromarray(values).save(path)
    data = ImageData(classes=["a", "b"], train=[Item(path, "a"), Item(path, "b")], valid=[Item(path, "a")])
    _, valid_dl = data.loaders(size=32, resize=resize, mean=(0, 0, 0), std=(1, 1, 1), bs=1, num_workers=0)
    image = next(iter(valid_dl))[0][0]
    middle_row = image[:, 16]
    is_red = (middle_row[0] > 0.9) & (middle_row[1] < 0.1)
    assert int(is_red.sum()) in range(red_columns - 1, red_columns + 2)
    assert not is_red[red_columns + 2 :].any()


def test_invalid_resize_is_an_error(tmp_path):
    with pytest.raises(ImgtuneError, match="--resize"):
        solid_data(tmp_path).loaders(size=16, resize="stretch", num_workers=0)


def test_train_loader_order_is_seeded_and_drops_the_last_partial_batch(tiny_data):
    def label_order(seed):
        train_dl, _ = tiny_data.loaders(size=16, bs=5, num_workers=0, seed=seed)
        batches = [labels.tolist() for _, labels in train_dl]
        assert all(len(b) == 5 for b in batches) and len(batches) == len(tiny_data.train) // 5
        return batches

    assert label_order(1) == label_order(1)
    assert label_order(1) != label_order(2)


def test_loader_processes_give_the_same_valid_batches(tiny_data):
    def valid_batch(workers):
        _, valid_dl = tiny_data.loaders(size=16, bs=3, num_workers=workers)
        return torch.cat([images for images, _ in valid_dl])

    torch.testing.assert_close(valid_batch(2), valid_batch(0))


def test_train_and_test_folders_are_a_split(tmp_path):
    from conftest import make_class_folders
    from imgtune.data.sources import items_from_folder

    make_class_folders(tmp_path / "train", n=3)
    make_class_folders(tmp_path / "test", n=2)
    found = items_from_folder(tmp_path)
    assert {i.split for i in found.items} == {"train", "valid"}
    assert sum(i.split == "valid" for i in found.items) == 6
    assert {i.label for i in found.items} == {"red", "green", "blue"}


def test_train_folder_without_a_validation_folder_is_an_error(tmp_path):
    from conftest import make_class_folders
    from imgtune.data.sources import items_from_folder
    from imgtune.errors import ImgtuneError

    make_class_folders(tmp_path / "train", n=2)
    with pytest.raises(ImgtuneError, match="no valid/"):
        items_from_folder(tmp_path)


def test_usable_cores_respects_a_container_cpu_quota(tmp_path):
    from imgtune.system import usable_cores

    affinity = usable_cores(tmp_path / "absent")
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")  # 1.5 CPUs
    assert usable_cores(quota) == min(affinity, 2)
    quota.write_text("max 100000\n")
    assert usable_cores(quota) == affinity
    quota.write_text("50000 100000\n")
    assert usable_cores(quota) == 1
