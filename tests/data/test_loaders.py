"""Checking, splitting and batching labelled images: load_data, ImageData, transforms and loaders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_class_folders
from PIL import Image

from imgtune.data.loaders import ImageData, load_data
from imgtune.data.sources import Item, items_from_folder
from imgtune.errors import ImgtuneError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


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


@pytest.mark.parametrize("kind", ["pil", "array", "tensor", "grey"])
def test_the_fused_normalisation_gives_torchvision_s_values_for_every_kind_of_picture(kind):
    """ToNormalizedTensor = ToImage, ToDtype(scale=True), Normalize to float rounding, as a contiguous
    float32 C x H x W tensor, whatever the picture is given as."""
    from torchvision.transforms import v2

    from imgtune.data.transforms import ToNormalizedTensor

    pixels = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    picture = {"pil": Image.fromarray(pixels), "array": pixels, "tensor": torch.from_numpy(pixels).permute(2, 0, 1),
               "grey": Image.fromarray(pixels[..., 0])}[kind]
    mean, std = (MEAN[0],) if kind == "grey" else MEAN, (STD[0],) if kind == "grey" else STD
    expected = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])(picture)
    got = ToNormalizedTensor(mean, std)(picture)
    assert got.dtype == torch.float32 and got.is_contiguous() and type(got) is torch.Tensor
    assert got.shape == expected.shape == ((1,) if kind == "grey" else (3,)) + (7, 5)
    torch.testing.assert_close(got, expected.as_subclass(torch.Tensor), rtol=0, atol=1e-6)


def test_the_fused_normalisation_refuses_a_std_that_is_not_positive():
    from imgtune.data.transforms import ToNormalizedTensor

    with pytest.raises(ImgtuneError, match="std must be positive"):
        ToNormalizedTensor(MEAN, (0.2, 0.0, 0.2))


def solid_data(tmp_path, size=(32, 32)) -> ImageData:
    """A white and a black image in each split."""
    paths = {c: tmp_path / f"{c}.png" for c in ("white", "black")}
    for colour, value in [("white", (255,) * 3), ("black", (0,) * 3)]:
        Image.new("RGB", size, value).save(paths[colour])
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
    with pytest.raises(ImgtuneError, match="`resize`"):
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


# --- loaders for a GPU --------------------------------------------------------------------------------


@pytest.mark.parametrize("cores, local, cpu, cuda", [
    (16, None, 8, 15),  # one process: at most 8 off CUDA; on CUDA every core but the training process's
    (16, "2", 8, 7),    # torchrun, 2 processes on this machine: 8 cores each
    (16, "4", 4, 3),
    (2, None, 2, 1),    # this project's CI machine: 2 loader processes on the CPU, as always
    (2, "2", 0, 0),     # one core per process: the process loads its own batches
    (1, None, 0, 0),
])
def test_loader_processes_share_the_cores_among_torchrun_s_local_processes(monkeypatch, cores, local, cpu, cuda):
    from imgtune.data import loaders

    monkeypatch.setattr(loaders, "usable_cores", lambda: cores)
    if local is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    assert loaders.default_num_workers() == loaders.default_num_workers("cpu") == cpu
    assert loaders.default_num_workers("cuda") == loaders.default_num_workers("cuda:1") == cuda


def test_cpu_loaders_are_unchanged_by_the_device_argument(tiny_data):
    """``device="cpu"`` (what the learner passes) gives the loaders of old: float batches, persistent
    workers for both, nothing pinned."""
    for device in (None, "cpu"):
        train_dl, valid_dl = tiny_data.loaders(size=16, bs=4, num_workers=2, device=device)
        assert train_dl.persistent_workers and valid_dl.persistent_workers
        assert not train_dl.pin_memory and not valid_dl.pin_memory
        assert train_dl.dataset.transform.transforms[-1].__class__.__name__ == "ToNormalizedTensor"


@pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true but no accelerator")
def test_cuda_loaders_send_pinned_uint8_pictures_that_normalise_on_the_device_to_the_cpu_batches(tiny_data):
    from imgtune.data.loaders import DeviceNormalize

    kw = dict(size=16, bs=4, num_workers=0, mean=MEAN, std=STD, seed=5)
    train_cpu, valid_cpu = tiny_data.loaders(**kw)
    train_gpu, valid_gpu = tiny_data.loaders(**kw, device="cuda")
    assert train_gpu.pin_memory and valid_gpu.pin_memory and not valid_gpu.persistent_workers
    normalize = DeviceNormalize(MEAN, STD)
    for cpu_dl, gpu_dl in ((valid_cpu, valid_gpu), (train_cpu, train_gpu)):
        torch.manual_seed(0)  # the augmentation's draws
        expected = [(x, y) for x, y in cpu_dl]
        torch.manual_seed(0)
        got = [(x, y) for x, y in gpu_dl]
        assert len(got) == len(expected) > 0
        for (x8, y8), (x, y) in zip(got, expected):
            assert x8.dtype == torch.uint8 and torch.equal(y8, y)
            assert torch.equal(normalize(x8), x)  # bit for bit: the same operations, in the same order
