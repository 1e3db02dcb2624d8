"""Where labelled images come from: class folders, labels in file names, a CSV."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from conftest import make_class_folders, noisy_image
from PIL import Image

from imgtune.data.loaders import load_data
from imgtune.data.sources import (
    PETS_LABEL_RE,
    items_from_csv,
    items_from_folder,
    items_from_name_re,
)
from imgtune.errors import ImgtuneError


def write_image(path: Path, colour=(200, 100, 50), size=(8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def labels_of(items) -> Counter:
    return Counter(item.label for item in items)


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
    with pytest.raises(ImgtuneError, match="`label_re`"):
        items_from_folder(tmp_path)


def test_empty_folder_asks_for_class_subfolders(tmp_path):
    with pytest.raises(ImgtuneError, match="subfolder") as error:
        items_from_folder(tmp_path)
    assert "`label_re`" not in str(error.value)


def test_missing_folder_and_file_instead_of_folder(tmp_path):
    with pytest.raises(ImgtuneError, match="no such folder"):
        items_from_folder(tmp_path / "nope")
    (tmp_path / "labels.csv").write_text("file,label\n")
    with pytest.raises(ImgtuneError, match="`csv_path="):
        items_from_folder(tmp_path / "labels.csv")


def test_train_and_test_folders_are_a_split(tmp_path):
    make_class_folders(tmp_path / "train", n=3)
    make_class_folders(tmp_path / "test", n=2)
    found = items_from_folder(tmp_path)
    assert {i.split for i in found.items} == {"train", "valid"}
    assert sum(i.split == "valid" for i in found.items) == 6
    assert {i.label for i in found.items} == {"red", "green", "blue"}


def test_train_folder_without_a_validation_folder_is_an_error(tmp_path):
    make_class_folders(tmp_path / "train", n=2)
    with pytest.raises(ImgtuneError, match="no valid/"):
        items_from_folder(tmp_path)


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


def test_csv_group_column(tmp_path):
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "m.csv").write_text("file,label,group\na.png,x,s1\nb.png,y,\n")
    found = items_from_csv(tmp_path / "m.csv")
    assert [i.group for i in found.items] == ["s1", None]
