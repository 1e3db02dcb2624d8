"""A folder of sessions drawn as a dataset: class folders, the manifest, overwriting only what a render
wrote, end to end."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY
from PIL import Image
from session_files import horizontal_move, user_sessions, write_session

from imgtune.cli import cli
from imgtune.errors import ImgtuneError
from imgtune.sequences.render import (
    MANIFEST_COLUMNS,
    RECORD,
    STAGING,
    find_sessions,
    render_sessions,
)


def test_render_writes_class_folders_and_a_manifest_identically_each_run(tmp_path):
    source = user_sessions(tmp_path / "sessions", users=2, sessions=2)
    first = render_sessions(find_sessions(source), tmp_path / "a", size=32, window=64, workers=2)
    second = render_sessions(find_sessions(source), tmp_path / "b", size=32, window=64, workers=1)
    assert first.counts == {"user0": 6, "user1": 6} and first.sessions == 4
    rows = list(csv.DictReader(first.manifest.read_text().splitlines()))
    assert tuple(rows[0]) == MANIFEST_COLUMNS
    assert {r["group"] for r in rows} == {f"user{u}/session_{u}{s}" for u in range(2) for s in range(2)}
    assert [(r["start"], r["end"]) for r in rows if r["group"] == "user0/session_00"] == [
        ("0", "64"), ("32", "96"), ("59", "123")]
    assert first.manifest.read_bytes() == second.manifest.read_bytes()
    for row in rows:
        assert (tmp_path / "a" / row["file"]).read_bytes() == (tmp_path / "b" / row["file"]).read_bytes()
        assert Image.open(tmp_path / "a" / row["file"]).size == (32, 32)


def test_render_never_overwrites_without_the_flag(tmp_path):
    source = user_sessions(tmp_path / "sessions", users=2, sessions=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ImgtuneError, match="`overwrite=True`"):
        render_sessions(find_sessions(source), out, size=32, window=64)
    render_sessions(find_sessions(source), out, size=32, window=64, overwrite=True)
    stale = out / "user0" / "session_00_000000.png"
    assert stale.is_file()
    render_sessions(find_sessions(source), out, size=32, window=200, overwrite=True)  # one window each now
    assert (out / "notes.txt").read_text() == "mine"  # not ours: kept
    assert sorted(p.name for p in (out / "user0").iterdir()) == ["session_00_000000.png"]


def snapshot(folder):
    """Every file below ``folder`` (links as links) and its bytes or link target."""
    return {p.relative_to(folder).as_posix(): (str(p.readlink()) if p.is_symlink() else p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_symlink() or p.is_file()}


def test_overwrite_refuses_a_manifest_imgtune_did_not_write_and_deletes_nothing(tmp_path):
    source = user_sessions(tmp_path / "sessions", users=2, sessions=1)
    out = tmp_path / "photos"
    for name in ("cats/a.png", "dogs/b.png"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (200, 10, 10)).save(out / name)
    (out / "manifest.csv").write_text("file,label\ncats/a.png,cat\ndogs/b.png,dog\n")
    before = snapshot(out)
    result = CliRunner().invoke(cli, ["render", str(source), str(out), "--size", "32", "--window", "64",
                                      "--workers", "1", "--overwrite"])
    assert result.exit_code == 1
    (error,) = result.stderr.strip().splitlines()
    assert str(out / "manifest.csv") in error and "choose another output folder" in error and "--overwrite" in error
    assert snapshot(out) == before

    # The same with the exact header but rows a render never writes: still not imgtune's.
    (out / "manifest.csv").write_text(",".join(MANIFEST_COLUMNS) + "\ncats/a.png,cats,cats/a,0,64,0.000,1.000\n")
    before = snapshot(out)
    with pytest.raises(ImgtuneError, match="not written by imgtune render"):
        render_sessions(find_sessions(source), out, size=32, window=64, workers=1, overwrite=True)
    assert snapshot(out) == before


def test_overwrite_deletes_only_the_unchanged_images_its_record_lists(tmp_path):
    source = user_sessions(tmp_path / "sessions", users=2, sessions=2)
    out = tmp_path / "out"
    first = render_sessions(find_sessions(source), out, size=32, window=64, workers=1)
    record = json.loads((out / RECORD).read_text())
    assert set(record["images"]) == {r["file"] for r in csv.DictReader(first.manifest.read_text().splitlines())}
    (out / "user0" / "mine.png").write_bytes(b"a picture of mine")  # the user's, beside imgtune's
    (out / "user0" / "notes.txt").write_text("mine")
    edited = out / "user1" / "session_10_000032.png"
    edited.write_bytes(b"the user drew over this one")
    outside = tmp_path / "outside.png"  # a copy of one of imgtune's images, outside the folder
    linked = out / "user1" / "session_11_000032.png"
    outside.write_bytes(linked.read_bytes())
    linked.unlink()
    linked.symlink_to(outside)  # a link where an image was: the link and its target are kept
    record["images"]["../outside.png"] = record["images"]["user1/session_11_000032.png"]
    (out / RECORD).write_text(json.dumps(record))

    render_sessions(find_sessions(source), out, size=32, window=200, workers=1, overwrite=True)  # one window each
    assert (out / "user0" / "mine.png").read_bytes() == b"a picture of mine"
    assert (out / "user0" / "notes.txt").read_text() == "mine"
    assert edited.read_bytes() == b"the user drew over this one"
    assert linked.is_symlink() and outside.is_file()
    new = {r["file"] for r in csv.DictReader((out / "manifest.csv").read_text().splitlines())}
    assert new == {f"user{u}/session_{u}{s}_000000.png" for u in range(2) for s in range(2)}
    assert sorted(p.name for p in (out / "user0").iterdir()) == [
        "mine.png", "notes.txt", "session_00_000000.png", "session_01_000000.png"]
    assert set(json.loads((out / RECORD).read_text())["images"]) == new


def test_overwrite_never_replaces_a_file_imgtune_did_not_draw(tmp_path):
    source = user_sessions(tmp_path / "sessions", users=2, sessions=1)
    out = tmp_path / "out"
    render_sessions(find_sessions(source), out, size=32, window=64, workers=1)
    (out / "user0" / "session_00_000000.png").write_bytes(b"the user drew over this one")
    (out / STAGING / "user0").mkdir(parents=True)  # an interrupted render
    (out / STAGING / "user0" / "session_00_000000.png").write_bytes(b"half")
    before = {k: v for k, v in snapshot(out).items() if ".partial" not in k}
    with pytest.raises(ImgtuneError, match="session_00_000000.png: exists and imgtune did not draw it; move it"):
        render_sessions(find_sessions(source), out, size=32, window=64, workers=1, overwrite=True)
    assert snapshot(out) == before  # the interrupted render's leftovers went, nothing else
    (out / "user0" / "session_00_000000.png").unlink()
    render_sessions(find_sessions(source), out, size=32, window=64, workers=1, overwrite=True)
    assert Image.open(out / "user0" / "session_00_000000.png").size == (32, 32)
    assert sorted(p.name for p in out.iterdir()) == [RECORD, "manifest.csv", "user0", "user1"]


def test_overwrite_refuses_a_manifest_edited_since_the_render(tmp_path):
    source = user_sessions(tmp_path / "sessions", users=2, sessions=1)
    out = tmp_path / "out"
    render_sessions(find_sessions(source), out, size=32, window=64, workers=1)
    with open(out / "manifest.csv", "a") as handle:
        handle.write("user0/extra.png,user0,user0/extra,0,1,0.000,0.000\n")
    before = snapshot(out)
    with pytest.raises(ImgtuneError, match="changed since the render"):
        render_sessions(find_sessions(source), out, size=32, window=64, workers=1, overwrite=True)
    assert snapshot(out) == before


def test_a_failed_render_leaves_the_earlier_one_as_it_was(tmp_path):
    source = user_sessions(tmp_path / "sessions", users=2, sessions=1)
    out = tmp_path / "out"
    render_sessions(find_sessions(source), out, size=32, window=64, workers=1)
    before = snapshot(out)
    (source / "user1" / "session_10").write_bytes(b"\xff\xfe not a session")
    with pytest.raises(ImgtuneError):
        render_sessions(find_sessions(source), out, size=32, window=64, workers=2, overwrite=True)
    assert snapshot(out) == before and not (out / STAGING).exists()


def test_overwrite_accepts_a_render_from_before_the_record(tmp_path):
    source = user_sessions(tmp_path / "sessions", users=2, sessions=1)
    out = tmp_path / "out"
    render_sessions(find_sessions(source), out, size=32, window=64, workers=1)
    (out / RECORD).unlink()  # as an earlier imgtune left it: the manifest alone
    (out / "user0" / "mine.png").write_bytes(b"mine")
    render_sessions(find_sessions(source), out, size=32, window=200, workers=1, overwrite=True)
    assert sorted(p.name for p in (out / "user0").iterdir()) == ["mine.png", "session_00_000000.png"]
    assert (out / RECORD).is_file()


def test_find_sessions_needs_label_folders(tmp_path):
    write_session(tmp_path / "loose" / "session_1", horizontal_move(5))
    with pytest.raises(ImgtuneError, match="subfolder per label"):
        find_sessions(tmp_path / "loose")


def test_render_series_folder(tmp_path):
    for label, f in (("sine", np.sin), ("square", lambda x: np.sign(np.sin(x)))):
        for s in range(2):
            path = tmp_path / "series" / label / f"run{s}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            t = np.linspace(0, 8 * np.pi, 100) + s
            path.write_text("time,a,b\n" + "".join(f"{i * 0.1:.1f},{f(v):.4f},{v:.4f}\n" for i, v in enumerate(t)))
    result = render_sessions(find_sessions(tmp_path / "series"), tmp_path / "out", kind="series", size=32,
                             window=5.0, unit="seconds", style="gaf", time_column="time", workers=1)
    assert result.counts == {"sine": 6, "square": 6}
    with pytest.raises(ImgtuneError, match="time column"):
        render_sessions(find_sessions(tmp_path / "series"), tmp_path / "out2", kind="series", window=5.0,
                        unit="seconds")


# --- the command line, end to end ----------------------------------------------------------------


def test_render_train_and_predict_sessions_through_the_cli(tmp_path):
    source = user_sessions(tmp_path / "sessions", users=3, sessions=3)
    out = tmp_path / "windows"
    runner = CliRunner()
    result = runner.invoke(cli, ["render", str(source), str(out), "--size", "32", "--window", "64",
                                 "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "27 images from 9 sessions" in result.output
    again = runner.invoke(cli, ["render", str(source), str(out), "--size", "32"])
    assert again.exit_code == 1 and "--overwrite" in again.stderr

    from imgtune.train.run import train

    options = {k: v for k, v in TINY.items() if k != "progress"}
    run = train(str(out), csv_path=out / "manifest.csv", epochs=1, freeze_epochs=1, lr=1e-3, out=tmp_path / "run",
                report=False, progress=False, **options)
    split = list(csv.DictReader((tmp_path / "run" / "split.csv").read_text().splitlines()))
    manifest = csv.DictReader((out / "manifest.csv").read_text().splitlines())
    group_of = {str((out / r["file"]).resolve()): r["group"] for r in manifest}
    sides = {}
    for row in split:
        sides.setdefault(group_of[row["file"]], set()).add(row["split"])
    assert all(len(s) == 1 for s in sides.values()) and run.metrics["data"]["valid"] == 9  # one session per user

    table = tmp_path / "sessions.csv"
    result = runner.invoke(cli, ["predict", str(tmp_path / "run"), str(out), "--group-by", str(out / "manifest.csv"),
                                 "--csv", str(table), "--backend", "torch"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(table.read_text().splitlines()))
    assert len(rows) == 9 and {r["windows"] for r in rows} == {"3"}
    assert all(abs(sum(float(p.split(":")[1]) for p in r["top_k"].split(";")) - 1) < 1e-4 for r in rows)
