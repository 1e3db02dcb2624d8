"""The change log: undo replays batches newest first, stays inside the data and its quarantine, and
survives a line cut off by an interrupted write."""

from __future__ import annotations

import csv
import json
import os
import warnings

import pytest
from click.testing import CliRunner

from imgtune.cli import cli
from imgtune.curate.changelog import (
    ChangeLog,
    move_file,
    quarantine,
    quarantine_dir,
    set_csv_label,
    undo,
)
from imgtune.errors import ImgtuneError


@pytest.fixture
def data(tmp_path):
    """``colours/{red,green,blue}/`` with two small files each (undo moves bytes; it never decodes them)."""
    root = tmp_path / "colours"
    for label in ("red", "green", "blue"):
        (root / label).mkdir(parents=True)
        for i in range(2):
            (root / label / f"{label}_{i}.png").write_bytes(f"{label} image {i}".encode())
    return root


def snapshot(root) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def relabel(root, path, label) -> None:
    """Move ``path`` into the class folder ``label`` and log it, as the cleaner's relabel does."""
    log = ChangeLog(root)
    target = root / label / path.name
    move_file(path, target)
    log.record([{"op": "move", "src": log.relative(path), "dst": log.relative(target)}], "test relabel")


def test_two_batches_on_one_file_are_undone_newest_first(data):
    before = snapshot(data)
    original = data / "red" / "red_0.png"
    relabel(data, original, "green")
    quarantine(data, [data / "green" / "red_0.png"])
    assert not original.exists() and (quarantine_dir(data) / "green" / "red_0.png").is_file()

    [undone] = undo(data, 1)  # the newest batch only: the file leaves the quarantine for green/
    assert undone["dst"] == "colours.quarantine/green/red_0.png"
    assert (data / "green" / "red_0.png").read_bytes() == b"red image 0" and not original.exists()

    relabel(data, data / "green" / "red_0.png", "blue")  # a second relabel of the same file
    assert [c["src"] for c in undo(data)] == ["colours/green/red_0.png", "colours/red/red_0.png"]
    assert original.read_bytes() == b"red image 0" and snapshot(data) == before
    assert ChangeLog(data).batches() == []


def plant(root, change: dict) -> None:
    """Append a batch that imgtune did not write (a log edited by hand, or by someone else)."""
    log = ChangeLog(root)
    log.path.parent.mkdir(parents=True, exist_ok=True)
    with open(log.path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"batch": 99, "time": "now", "by": "someone", "changes": [change]}) + "\n")


@pytest.mark.parametrize("where", ["absolute", "dotdot", "linked folder"])
def test_undo_moves_nothing_outside_the_data_and_its_quarantine(data, tmp_path, where):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    secret = outside / "secret.txt"
    secret.write_text("not yours")
    (data / "linked").symlink_to(outside, target_is_directory=True)
    quarantine(data, [data / "blue" / "blue_0.png"])  # a genuine batch before the planted one
    before = snapshot(data)
    if where == "absolute":  # undo would pull a file from elsewhere into the data
        plant(data, {"op": "move", "src": "colours/red/taken.txt", "dst": str(secret)})
    elif where == "dotdot":  # undo would push a file of the data out of it
        plant(data, {"op": "move", "src": "colours/../elsewhere/stolen.png", "dst": "colours/red/red_0.png"})
    else:  # the same through a folder link inside the data
        plant(data, {"op": "move", "src": "colours/linked/stolen.png", "dst": "colours/red/red_0.png"})
    jail = snapshot(quarantine_dir(data))
    with pytest.raises(ImgtuneError, match="is not inside .*colours.*nothing was undone"):
        undo(data)
    assert snapshot(data) == before and snapshot(quarantine_dir(data)) == jail
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"] and secret.read_text() == "not yours"


def test_a_relabelled_row_of_another_csv_is_refused_unless_named(tmp_path):
    images = tmp_path / "ds" / "images"
    images.mkdir(parents=True)
    (images / "a.png").write_bytes(b"a")
    table = tmp_path / "labels" / "labels.csv"  # outside the folder that holds the data
    table.parent.mkdir()
    table.write_text("file,label\na.png,cat\n")
    set_csv_label(table, "a.png", "cat", "dog")
    log = ChangeLog(images)
    log.record([{"op": "relabel_csv", "csv": log.relative(table), "file": "a.png", "old": "cat", "new": "dog"}],
               "test")
    with pytest.raises(ImgtuneError, match="names the CSV '../labels/labels.csv'.*csv_path"):
        undo(images)
    assert list(csv.reader(table.open())) == [["file", "label"], ["a.png", "dog"]]
    undo(images, csv_path=table)
    assert list(csv.reader(table.open())) == [["file", "label"], ["a.png", "cat"]]


def test_a_cut_off_last_line_is_skipped_with_a_warning_then_set_aside(data):
    before = snapshot(data)
    quarantine(data, [data / "red" / "red_0.png"])
    log = ChangeLog(data)
    cut = '{"batch": 2, "time": "2026-01-01T00:00:00+00:00", "by": "imgtune clean", "changes": [{"op": "mo'
    with open(log.path, "a", encoding="utf-8") as handle:
        handle.write(cut)  # what an append interrupted half-way leaves
    with pytest.warns(UserWarning, match=r"changes.jsonl: line 2 was cut off"):
        assert [b["batch"] for b in log.batches()] == [1]

    # The next batch does not land after the broken text: that goes to changes.jsonl.broken.
    with pytest.warns(UserWarning) as caught:
        quarantine(data, [data / "green" / "green_0.png"])
    assert [str(w.message).split(": ", 1)[1] for w in caught] == [
        "line 2 was cut off (an interrupted write?); ignoring it",
        "its cut-off last line was moved to changes.jsonl.broken"]
    assert (log.path.parent / "changes.jsonl.broken").read_text() == cut + "\n"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the log is whole again
        assert [b["batch"] for b in log.batches()] == [1, 2]
        result = CliRunner().invoke(cli, ["doctor", str(data), "--undo"])
    assert result.exit_code == 0, result.output
    assert "undid 2 changes" in result.output and snapshot(data) == before


def test_a_broken_line_in_the_middle_is_a_one_line_error(data):
    quarantine(data, [data / "red" / "red_0.png"])
    log = ChangeLog(data)
    with open(log.path, "a", encoding="utf-8") as handle:
        handle.write("{not json\n")
    plant(data, {"op": "keep", "file": "colours/red/red_1.png"})
    with pytest.raises(ImgtuneError, match=r"changes.jsonl:2: not a log entry"):
        log.batches()
    with pytest.raises(ImgtuneError, match=r"changes.jsonl:2: not a log entry"):
        quarantine(data, [data / "red" / "red_1.png"])  # refused before anything moves
    assert (data / "red" / "red_1.png").is_file()
    for command in ("doctor", "clean"):
        result = CliRunner().invoke(cli, [command, str(data), "--undo"])
        assert result.exit_code == 1 and "changes.jsonl:2: not a log entry" in result.output
        assert "internal error" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not (data / "red" / "red_0.png").exists()  # nothing was undone
    with open(log.path, "a", encoding="utf-8") as handle:
        handle.write('["a list"]\n')
    with pytest.raises(ImgtuneError, match=r"changes.jsonl:2: not a log entry"):
        log.batches()


def test_a_quarantined_link_is_moved_and_restored_as_a_link(data, tmp_path):
    target = tmp_path / "outside.png"
    target.write_bytes(b"the user's own file")
    link = data / "red" / "link.png"
    os.symlink(target, link)
    [move] = quarantine(data, [link])
    moved = quarantine_dir(data) / "red" / "link.png"
    assert move == {"op": "move", "src": "colours/red/link.png", "dst": "colours.quarantine/red/link.png"}
    assert moved.is_symlink() and os.readlink(moved) == str(target) and target.read_bytes() == b"the user's own file"
    target.unlink()  # a link whose target went is still undone: the link is what was moved
    undo(data)
    assert link.is_symlink() and os.readlink(link) == str(target) and not os.path.lexists(moved)
