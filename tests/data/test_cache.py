"""The disk caches: keys that follow the file, atomic entries, presized pictures identical to decoding."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from conftest import noisy_image
from PIL import Image

import imgtune.data.presize
from imgtune.data import cache
from imgtune.data.loaders import check_images
from imgtune.data.presize import ImageView
from imgtune.data.sources import Item
from imgtune.data.transforms import tensor_transform, valid_transform

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.fixture
def photo(tmp_path):
    """A 90x60 JPEG (landscape, so crop, squish and pad all differ)."""
    path = tmp_path / "photos" / "cat.jpg"
    path.parent.mkdir()
    noisy_image((200, 120, 40), size=90).resize((90, 60)).save(path, quality=90)
    return path


def test_file_key_follows_content_time_and_place(photo, tmp_path):
    key = cache.file_key(photo)
    assert cache.file_key(photo) == key
    stat = photo.stat()
    os.utime(photo, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    touched = cache.file_key(photo)
    assert touched != key
    moved = photo.rename(tmp_path / "moved.jpg")
    assert cache.file_key(moved) != touched


def test_array_store_round_trip_is_atomic_and_survives_a_corrupt_entry(tmp_path):
    store = cache.ArrayStore(tmp_path / "store")
    array = np.arange(24, dtype=np.uint8).reshape(2, 4, 3)
    assert store.get("ab" * 16) is None and "ab" * 16 not in store
    store.put("ab" * 16, array)
    assert np.array_equal(store.get("ab" * 16), array) and "ab" * 16 in store
    assert not list((tmp_path / "store").rglob("*.tmp"))
    store.path("cd" * 16).parent.mkdir(parents=True)
    store.path("cd" * 16).write_bytes(b"half an entry")
    assert store.get("cd" * 16) is None


def test_activation_maps_are_a_kind_of_their_own(tmp_path):
    root = tmp_path / "cache"
    store = cache.ArrayStore(root / "activations" / "0123abcd-valid-32-crop")
    store.put("ef" * 16, np.zeros((2, 4, 2, 2), np.float16))
    (root / "activations" / "notes.txt").write_text("mine")
    cache.ArrayStore(root / "features" / "f").put("cd" * 16, np.zeros((2, 8), np.float32))
    assert (root / cache.CACHEDIR_TAG).is_file()  # the first maps stored tag a new cache folder
    assert cache.usage(root)["activations"]["files"] == 2
    removed = cache.clear(root, kinds=("activations",))
    assert removed == {"activations": {"files": 1, "bytes": removed["activations"]["bytes"]}}
    assert store.get("ef" * 16) is None and (root / "activations" / "notes.txt").read_text() == "mine"
    assert cache.usage(root)["features"]["files"] == 1


def test_usage_and_clear_remove_derived_entries_only(tmp_path):
    root = tmp_path / "cache"
    cache.ArrayStore(root / "presized" / "v").put("ab" * 16, np.zeros((2, 2, 1), np.uint8))
    cache.ArrayStore(root / "features" / "f").put("cd" * 16, np.zeros((2, 8), np.float32))
    (root / "datasets").mkdir()
    (root / "datasets" / "elpv.zip").write_bytes(b"downloaded")
    used = cache.usage(root)
    assert used["presized"]["files"] == 1 and used["features"]["files"] == 1 and used["onnx"]["files"] == 0
    assert used["features"]["bytes"] > 64
    removed = cache.clear(root, kinds=("features",))
    assert removed == {"features": used["features"]}
    assert cache.usage(root)["features"]["files"] == 0 and cache.usage(root)["presized"]["files"] == 1
    cache.clear(root)
    assert not (root / "presized").exists() and (root / "datasets" / "elpv.zip").read_bytes() == b"downloaded"
    with pytest.raises(ValueError, match="unknown cache kinds"):
        cache.clear(root, kinds=("datasets",))


@pytest.mark.parametrize("resize", ["crop", "squish", "pad"])
def test_a_cached_valid_picture_gives_the_same_tensor_as_decoding_the_file(photo, tmp_path, resize):
    expected = valid_transform(32, resize, MEAN, STD)(imgtune.data.presize.load_image(photo, min_size=32))
    view = ImageView(32, resize, cache_dir=tmp_path / "cache")
    first = tensor_transform(MEAN, STD)(view(photo))
    second = tensor_transform(MEAN, STD)(view(photo))  # from the cache now
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert len(list((tmp_path / "cache" / "presized" / f"valid-32-{resize}").rglob("*.npy"))) == 1


def test_a_cached_picture_is_not_decoded_again_but_an_edited_file_is(photo, tmp_path, monkeypatch):
    view = ImageView(32, cache_dir=tmp_path / "cache")
    before = np.asarray(view(photo))
    decoded = []
    real = imgtune.data.presize.load_image
    monkeypatch.setattr(imgtune.data.presize, "load_image", lambda *a, **k: decoded.append(a[0]) or real(*a, **k))
    assert np.array_equal(np.asarray(view(photo)), before) and decoded == []
    noisy_image((20, 40, 220), size=90).save(photo, quality=90)  # the user replaces the picture
    after = np.asarray(view(photo))
    assert decoded == [photo] and not np.array_equal(after, before)


def test_the_train_view_keeps_a_margin_for_random_crops_and_never_enlarges(tmp_path):
    big, small = tmp_path / "big.png", tmp_path / "small.png"
    noisy_image((10, 200, 10), size=200).resize((300, 200)).save(big)
    noisy_image((10, 200, 10), size=30).save(small)
    view = ImageView(64, kind="train", cache_dir=False)
    side = math.ceil(imgtune.data.presize.TRAIN_PRESIZE * 64)
    assert view(big).size == (round(300 * side / 200), side)
    assert view(small).size == (30, 30)
    assert view.name == f"train-{side}"


def test_grey_pictures_take_one_channel_on_disk(tmp_path):
    grey = tmp_path / "grey.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40), dtype=np.uint8), mode="L").save(grey)
    view = ImageView(32, cache_dir=tmp_path / "cache")
    picture = view(grey)
    (entry,) = (tmp_path / "cache" / "presized").rglob("*.npy")
    assert np.load(entry).shape == (32, 32, 1)
    assert picture.mode == "RGB" and np.array_equal(np.asarray(view(grey)), np.asarray(picture))


def test_checking_through_the_cache_decodes_each_file_once_and_still_skips_bad_ones(tmp_path, monkeypatch):
    items = []
    for i in range(4):
        path = tmp_path / f"img{i}.png"
        noisy_image((200, 10, 10), seed=i).save(path)
        items.append(Item(path, "red"))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    items.append(Item(tmp_path / "broken.png", "red"))
    view = ImageView(32, cache_dir=tmp_path / "cache")
    good, bad = check_images(items, view=view)
    assert len(good) == 4 and [s.path.name for s in bad] == ["broken.png"]
    decoded = []
    real = imgtune.data.presize.load_image
    monkeypatch.setattr(imgtune.data.presize, "load_image", lambda *a, **k: decoded.append(a[0]) or real(*a, **k))
    good, bad = check_images(items, view=view)
    assert len(good) == 4 and len(bad) == 1 and decoded == [tmp_path / "broken.png"]


def test_cache_commands_show_and_clear_the_cache(tmp_path):
    from click.testing import CliRunner

    from imgtune.cli import cli

    root = tmp_path / "cache"
    cache.ArrayStore(root / "presized" / "v").put("ab" * 16, np.zeros((4, 4, 3), np.uint8))
    cache.ArrayStore(root / "features" / "f").put("cd" * 16, np.zeros((2, 8), np.float32))
    info = CliRunner().invoke(cli, ["cache", "info", "--cache-dir", str(root)])
    assert info.exit_code == 0 and str(root) in info.output
    assert [line.split()[:2] for line in info.output.splitlines()[1:]] == [["presized", "1"], ["features", "1"],
                                                                         ["activations", "0"], ["onnx", "0"]]
    cleared = CliRunner().invoke(cli, ["cache", "clear", "--cache-dir", str(root), "--only", "features"])
    assert cleared.exit_code == 0 and "removed 1 files" in cleared.output
    assert cache.usage(root)["features"]["files"] == 0 and cache.usage(root)["presized"]["files"] == 1


# --- what `cache clear` may delete ----------------------------------------------------------------


def tagged_cache(root):
    """A cache as imgtune leaves it: presized pictures, features, an exported body, the tag."""
    cache.ArrayStore(root / "presized" / "valid-32-crop").put("ab" * 16, np.zeros((2, 2, 1), np.uint8))
    cache.ArrayStore(root / "features" / "f00d-valid-32-crop").put("cd" * 16, np.zeros((2, 8), np.float32))
    (root / "onnx").mkdir()
    (root / "onnx" / f"{'0123456789ab' * 2}-32.onnx").write_bytes(b"a graph")
    (root / "onnx" / f".{'0123456789ab' * 2}-32.onnx.k2_x9q.tmp").write_bytes(b"half a graph (killed)")
    return root


def everything(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_first_entry_tags_a_new_cache_folder_and_never_a_folder_with_other_files(photo, tmp_path):
    ImageView(32, cache_dir=tmp_path / "new")(photo)
    tag = (tmp_path / "new" / "CACHEDIR.TAG").read_text()
    assert tag.splitlines()[0] == "Signature: 8a477f597d28d172789f06886806bc55" and "imgtune" in tag
    assert cache.is_imgtune_cache(tmp_path / "new")
    project = tmp_path / "project"
    project.mkdir()
    (project / "train.py").write_text("print('mine')")
    ImageView(32, cache_dir=project)(photo)  # --cache-dir . in a project: backups must keep the project
    assert len(list((project / "presized").rglob("*.npy"))) == 1 and not (project / "CACHEDIR.TAG").exists()


def test_clear_deletes_only_imgtunes_entries_and_keeps_a_users_files(tmp_path):
    root = tagged_cache(tmp_path / "cache")
    (root / "features" / "my_notes.txt").write_text("mine")
    (root / "features" / "f00d-valid-32-crop" / "cd" / "mine.npy").write_bytes(b"mine too")
    outside = tmp_path / ("ef" * 16 + ".npy")
    outside.write_bytes(b"linked from the cache")
    (root / "presized" / "valid-32-crop" / "ef").mkdir()
    (root / "presized" / "valid-32-crop" / "ef" / outside.name).symlink_to(outside)  # a link, not an entry
    removed = cache.clear(root)
    assert removed["presized"]["files"] == 1 and removed["features"]["files"] == 1
    assert removed["onnx"] == {"files": 2, "bytes": len(b"a graph") + len(b"half a graph (killed)")}
    assert (root / "features" / "my_notes.txt").read_text() == "mine"
    assert (root / "features" / "f00d-valid-32-crop" / "cd" / "mine.npy").read_bytes() == b"mine too"
    assert (root / "presized" / "valid-32-crop" / "ef" / outside.name).is_symlink() and outside.is_file()
    assert not (root / "onnx").exists() and not (root / "presized" / "valid-32-crop" / "ab").exists()
    assert cache.usage(root)["features"]["files"] == 2 and (root / "CACHEDIR.TAG").is_file()


def test_cache_clear_says_what_it_kept(tmp_path):
    from click.testing import CliRunner

    from imgtune.cli import cli

    root = tagged_cache(tmp_path / "cache")
    (root / "features" / "my_notes.txt").write_text("mine")
    result = CliRunner().invoke(cli, ["cache", "clear", "--cache-dir", str(root)])
    assert result.exit_code == 0 and "removed 4 files" in result.output
    assert "kept 1 files imgtune did not write" in result.output


def test_clear_refuses_a_folder_that_is_not_an_imgtune_cache(tmp_path):
    from click.testing import CliRunner

    from imgtune.cli import cli
    from imgtune.errors import ImgtuneError

    mine = tmp_path / "mine"
    (mine / "features").mkdir(parents=True)
    (mine / "features" / "my_notes.txt").write_text("mine")
    cache.ArrayStore(mine / "presized" / "v").put("ab" * 16, np.zeros((2, 2, 1), np.uint8))  # imgtune-shaped
    assert not (mine / "CACHEDIR.TAG").exists()
    before = everything(mine)
    with pytest.raises(ImgtuneError, match="not an imgtune cache"):
        cache.clear(mine)
    result = CliRunner().invoke(cli, ["cache", "clear", "--cache-dir", str(mine)])
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert f"{mine}: not an imgtune cache" in line and "pass the cache folder imgtune made" in line
    info = CliRunner().invoke(cli, ["cache", "info", "--cache-dir", str(mine)])
    assert info.exit_code == 0 and [line.split()[:2] for line in info.output.splitlines()[1:]] == [
        ["presized", "1"], ["features", "1"], ["activations", "0"], ["onnx", "0"]]
    assert everything(mine) == before  # info tags nothing, clear deleted nothing

    other = tmp_path / "other-tool"  # another program's cache: its tag is not imgtune's
    cache.ArrayStore(other / "features" / "f").put("cd" * 16, np.zeros((2, 8), np.float32))
    (other / "CACHEDIR.TAG").write_text("Signature: 8a477f597d28d172789f06886806bc55\n# other-tool\n")
    with pytest.raises(ImgtuneError, match="not an imgtune cache"):
        cache.clear(other)
    assert len(list(other.rglob("*.npy"))) == 1


def test_a_cache_from_before_the_tag_is_tagged_and_cleared(tmp_path):
    root = tagged_cache(tmp_path / "cache")
    (root / "CACHEDIR.TAG").unlink()  # as an earlier imgtune left it
    cache.clear(root, kinds=("features",))
    assert cache.is_imgtune_cache(root) and cache.usage(root)["features"]["files"] == 0
    assert cache.usage(root)["presized"]["files"] == 1
    assert cache.clear(tmp_path / "no-such-folder") == {kind: {"files": 0, "bytes": 0} for kind in cache.KINDS}
