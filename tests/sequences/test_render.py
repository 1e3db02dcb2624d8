"""A folder of sessions drawn as a dataset: class folders, the manifest, overwriting, end to end."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY
from PIL import Image
from session_files import horizontal_move, user_sessions, write_session

from imgtune.cli import cli
from imgtune.errors import ImgtuneError
from imgtune.sequences.render import MANIFEST_COLUMNS, find_sessions, render_sessions


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
