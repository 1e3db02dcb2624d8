"""The data doctor: planted problems are all found, --fix quarantines, and --undo restores every byte."""

from __future__ import annotations

import hashlib
import io
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import COLOURS, noisy_image
from imgtune.cli import cli
from imgtune.curate.changelog import ChangeLog, move_file, quarantine, quarantine_dir, undo
from imgtune.curate.doctor import diagnose, fix, write_outputs
from imgtune.errors import ImgtuneError


def planted(root):
    """train/ and valid/ folders of 3 colour classes (64 px), plus one of each planted problem."""
    for k, (name, colour) in enumerate(COLOURS.items()):
        for split, count in (("train", 6), ("valid", 3)):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                image = noisy_image(colour, 64, seed=100 * k + 10 * (split == "valid") + i)
                image.save(root / split / name / f"{name}_{i}.png")
    train = root / "train"
    (train / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    shutil.copy(train / "red" / "red_0.png", train / "green" / "copied.png")  # the same image in two classes
    shutil.copy(train / "blue" / "blue_1.png", train / "blue" / "blue_1_copy.png")  # twice in one class
    buffer = io.BytesIO()  # a resized, recompressed copy across the split
    Image.open(train / "blue" / "blue_0.png").resize((90, 90), Image.BICUBIC).save(buffer, "JPEG", quality=70)
    (root / "valid" / "blue" / "blue_0_small.jpg").write_bytes(buffer.getvalue())
    noisy_image(COLOURS["green"], 12, seed=7).save(train / "green" / "tiny.png")
    (train / "red" / "notes.txt").write_text("where these came from")
    return root


def snapshot(root) -> dict:
    """Every file under root (hidden ones too) and a hash of its bytes."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def found(diagnosis) -> dict:
    """kind -> list of sets of the files' names."""
    result = {}
    for problem in diagnosis.problems:
        result.setdefault(problem.kind, []).append({p.name for p in problem.files})
    return result


@pytest.fixture
def data(tmp_path):
    return planted(tmp_path / "colours")


def test_every_planted_problem_is_found(data):
    diagnosis = diagnose(data, mislabels=0)
    problems = found(diagnosis)
    assert problems["corrupt"] == [{"broken.jpg"}]
    assert problems["conflict"] == [{"red_0.png", "copied.png"}]
    assert problems["duplicate"] == [{"blue_1.png", "blue_1_copy.png"}]
    assert problems["near_leak"] == [{"blue_0.png", "blue_0_small.jpg"}]
    assert problems["tiny"] == [{"tiny.png"}]
    assert problems["not_image"] == [{"notes.txt"}]
    # Nothing else: different noisy images are not near duplicates, and all are colour.
    assert set(problems) == {"corrupt", "conflict", "duplicate", "near_leak", "tiny", "not_image"}
    assert diagnosis.counts["green"] == {"train": 8, "valid": 3}
    summary = diagnosis.summary()
    assert "1 near_leak" in summary and "imbalance" in summary


def test_a_random_split_is_the_one_train_would_make(tmp_path):
    root = tmp_path / "flat"
    for k, (name, colour) in enumerate(COLOURS.items()):
        (root / name).mkdir(parents=True)
        for i in range(10):
            noisy_image(colour, 64, seed=100 * k + i).save(root / name / f"{i}.png")
    shutil.copy(root / "red" / "0.png", root / "red" / "copy.png")
    diagnosis = diagnose(root, mislabels=0, valid_pct=0.5, seed=1)
    from imgtune import load_data

    images = load_data(root, valid_pct=0.5, seed=1)
    assert diagnosis.counts == {c: n for c, n in images.counts().items()}
    kinds = {p.kind for p in diagnosis.problems}
    split = {item.path.name: "valid" for item in images.valid if item.label == "red"}
    expected = "leak" if (split.get("0.png") is None) != (split.get("copy.png") is None) else "duplicate"
    assert kinds == {expected}


def test_grayscale_among_colour_is_reported(tmp_path):
    root = tmp_path / "modes"
    for k, (name, colour) in enumerate(COLOURS.items()):
        (root / name).mkdir(parents=True)
        for i in range(4):
            noisy_image(colour, 64, seed=100 * k + i).save(root / name / f"{i}.png")
    noisy_image((120, 120, 120), 64, seed=5).convert("L").save(root / "red" / "gray.png")
    problems = found(diagnose(root, mislabels=0))
    assert problems == {"mixed_mode": [{"gray.png"}]}


def test_a_likely_mislabel_is_listed(data):
    noisy_image(COLOURS["blue"], 64, seed=999).save(data / "train" / "red" / "looks_blue.png")

    def mean_colour(paths):
        import torch

        return torch.tensor(np.array([np.asarray(Image.open(p).convert("RGB"), dtype=np.float32).mean((0, 1))
                                      for p in paths]))

    diagnosis = diagnose(data, mislabels=3, features=mean_colour)
    mislabels = [p for p in diagnosis.problems if p.kind == "mislabel"]
    assert mislabels[0].files[0].name == "looks_blue.png"
    assert "labelled red" in mislabels[0].detail and "looks like blue" in mislabels[0].detail


def test_outputs_are_json_and_a_self_contained_gallery(data, tmp_path):
    json_path, html_path = write_outputs(diagnose(data, mislabels=0), tmp_path / "out")
    report = json.loads(json_path.read_text())
    assert report["problem_counts"]["conflict"] == 1
    assert {"train/red/red_0.png", "train/green/copied.png"} == set(
        next(p for p in report["problems"] if p["kind"] == "conflict")["files"])
    page = html_path.read_text()
    assert page.count("data:image/jpeg;base64,") == 7 and "cannot be read" in page
    for needle in ("<script", "http://", "https://", "<link"):
        assert needle not in page


def test_fix_then_undo_restores_every_byte(data):
    before = snapshot(data)
    moves = fix(diagnose(data, mislabels=0))
    moved = {m["src"].split("/", 1)[1] for m in moves}
    assert moved == {"train/red/broken.jpg", "train/red/red_0.png", "train/green/copied.png",
                     "train/blue/blue_1_copy.png"}
    after = snapshot(data)
    assert set(before) - set(after) == moved and set(after) <= set(before)
    jail = quarantine_dir(data)
    assert jail == data.parent / "colours.quarantine"
    assert (jail / "train" / "red" / "broken.jpg").read_bytes() == (b"\xff\xd8\xff\xe0 not really a jpeg")
    assert len(ChangeLog(data).batches()) == 1

    undone = undo(data)
    assert len(undone) == 4 and snapshot(data) == before
    assert ChangeLog(data).batches() == [] and not (jail / "train").exists()
    assert undo(data) == []  # nothing left to undo


def test_moves_never_overwrite(data, tmp_path):
    target = tmp_path / "elsewhere.png"
    target.write_bytes(b"mine")
    with pytest.raises(ImgtuneError, match="already exists"):
        move_file(data / "train" / "red" / "red_1.png", target)
    assert target.read_bytes() == b"mine" and (data / "train" / "red" / "red_1.png").is_file()
    # A name taken in the quarantine gets the next free one.
    jail = quarantine_dir(data) / "train" / "red"
    jail.mkdir(parents=True)
    (jail / "red_1.png").write_bytes(b"an earlier one")
    [move] = quarantine(data, [data / "train" / "red" / "red_1.png"])
    assert move["dst"].endswith("train/red/red_1-1.png") and (jail / "red_1.png").read_bytes() == b"an earlier one"
    with pytest.raises(ImgtuneError, match="not inside the data folder"):
        quarantine(data, [target])


def test_undo_changes_nothing_when_a_file_came_back(data):
    before = snapshot(data)
    quarantine(data, [data / "train" / "red" / "red_1.png", data / "train" / "red" / "red_2.png"])
    (data / "train" / "red" / "red_2.png").write_bytes(b"a new file with the old name")
    with pytest.raises(ImgtuneError, match="exists again"):
        undo(data)
    assert not (data / "train" / "red" / "red_1.png").exists()  # the batch was left as it was
    (data / "train" / "red" / "red_2.png").unlink()
    undo(data)
    assert snapshot(data) == before


def test_the_cli_reports_fixes_and_undoes(data, tmp_path):
    before = snapshot(data)
    runner = CliRunner()
    out = tmp_path / "report"
    result = runner.invoke(cli, ["doctor", str(data), "--no-mislabels", "--out", str(out), "--fix"])
    assert result.exit_code == 0, result.output
    assert "1 conflict" in result.output and "moved 4 files" in result.output
    assert (out / "doctor.json").is_file() and (out / "doctor.html").is_file()
    assert not (data / "train" / "red" / "broken.jpg").exists()

    result = runner.invoke(cli, ["doctor", str(data), "--undo"])
    assert result.exit_code == 0, result.output
    assert "undid 4 changes" in result.output
    assert snapshot(data) == before

    result = runner.invoke(cli, ["doctor", str(data), "--no-mislabels", "--out", str(tmp_path / "r2"), "--fix",
                                 "--fix-kinds", "corrupt,bogus"])
    assert result.exit_code == 1 and "unknown problem kind 'bogus'" in result.output
    assert snapshot(data) == before


def test_the_cli_lists_mislabels_from_a_networks_features(data, tmp_path):
    noisy_image(COLOURS["blue"], 64, seed=999).save(data / "train" / "red" / "looks_blue.png")
    result = CliRunner().invoke(cli, ["doctor", str(data), "--arch", "test_efficientnet", "--weights", "none",
                                      "--mislabels", "2", "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report" / "doctor.json").read_text())
    assert report["problem_counts"]["mislabel"] == 2 and "2 mislabel" in result.output
    listed = [p["files"][0] for p in report["problems"] if p["kind"] == "mislabel"]
    assert "train/red/looks_blue.png" in listed


def test_fix_moves_links_as_links_and_never_their_targets(data, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 a broken file that is not in the data")
    blue = data / "train" / "blue"
    (data / "train" / "red" / "link.jpg").symlink_to(outside / "broken.jpg")  # corrupt: --fix moves it
    (blue / "zz_link.png").symlink_to(blue / "blue_1.png")  # a third copy of blue_1.png: --fix moves it
    before = snapshot(data)
    moves = fix(diagnose(data, mislabels=0))
    moved = {m["src"].split("/", 1)[1] for m in moves}
    assert {"train/red/link.jpg", "train/blue/zz_link.png"} <= moved and "train/blue/blue_1.png" not in moved
    jail = quarantine_dir(data) / "train"
    assert (jail / "red" / "link.jpg").is_symlink() and (jail / "blue" / "zz_link.png").is_symlink()
    assert (outside / "broken.jpg").is_file() and not (outside / "broken.jpg").is_symlink()
    assert (blue / "blue_1.png").is_file() and not (blue / "blue_1.png").is_symlink()
    undo(data)
    assert snapshot(data) == before
    assert (data / "train" / "red" / "link.jpg").is_symlink() and (blue / "zz_link.png").is_symlink()
