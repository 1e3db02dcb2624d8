"""Sequences drawn as images: windows, known pictures, manifests, group splits and session scores."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import TINY
from imgtune import ImgtuneError, Item
from imgtune.cli import cli
from imgtune.data.sources import items_from_csv
from imgtune.data.split import split_items
from imgtune.sequences.render import LEFT_CLICK, MANIFEST_COLUMNS, PAUSE, SCROLL, MouseEvents, aggregate_windows, draw_mouse_window, draw_series_window, find_sessions, parse_window, read_mouse_session, render_sessions, window_bounds

HEADER = "record timestamp,client timestamp,button,state,x,y"


def write_session(path: Path, rows) -> Path:
    """A mouse session CSV from ``(t, button, state, x, y)`` rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [HEADER] + [f"{t:.3f},{t:.3f},{b},{s},{x},{y}" for t, b, s, x, y in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def horizontal_move(n: int = 40, x0: int = 100, y: int = 500, step: int = 20, t0: float = 0.0):
    return [(t0 + 0.016 * i, "NoButton", "Move", x0 + step * i, y) for i in range(n)]


def events(rows) -> MouseEvents:
    buttons = {"NoButton": 0, "Left": 1, "Right": 2, "Scroll": 3}
    states = {"Move": 0, "Pressed": 1, "Released": 2, "Drag": 3, "Down": 4, "Up": 5}
    return MouseEvents(np.array([r[0] for r in rows], float), np.array([[r[3], r[4]] for r in rows], float),
                       np.array([buttons[r[1]] for r in rows], np.int8),
                       np.array([states[r[2]] for r in rows], np.int8))


def user_sessions(root: Path, users: int = 3, sessions: int = 3, n: int = 120) -> Path:
    """Users who move differently: user0 horizontally, user1 vertically, user2 diagonally, with clicks."""
    directions = [(1, 0), (0, 1), (1, 1)]
    for u in range(users):
        dx, dy = directions[u % 3]
        for s in range(sessions):
            rng = np.random.default_rng(10 * u + s)
            rows = []
            for i in range(n):
                wobble = rng.normal(0, 3)
                rows.append((0.016 * i, "NoButton", "Move", 300 + (7 + u) * dx * (i % 40) + wobble,
                             300 + (7 + u) * dy * (i % 40) + wobble))
                if i % 40 == 39:
                    rows.append((0.016 * i + 0.008, "Left", "Pressed", rows[-1][3], rows[-1][4]))
            write_session(root / f"user{u}" / f"session_{u}{s}", rows)
    return root


# --- windows -------------------------------------------------------------------------------------


def test_window_bounds_by_events_overlap_and_tail():
    assert window_bounds(np.arange(10.0), window=4, overlap=0.5, min_events=1) == [(0, 4), (2, 6), (4, 8), (6, 10)]
    # the last window is aligned to the end so no event is lost
    assert window_bounds(np.arange(11.0), window=4, overlap=0.5, min_events=1)[-1] == (7, 11)
    assert window_bounds(np.arange(3.0), window=4, min_events=1) == [(0, 3)]  # shorter than one window: whole
    assert window_bounds(np.arange(3.0), window=4, min_events=5) == []  # too short to draw
    assert window_bounds(np.arange(8.0), window=4, overlap=0.0, min_events=1) == [(0, 4), (4, 8)]


def test_window_bounds_by_seconds():
    times = np.arange(0, 10.01, 0.5)  # 21 events over 10 s
    bounds = window_bounds(times, window=4.0, overlap=0.5, unit="seconds", min_events=1)
    assert bounds[0] == (0, 9)  # events at 0.0..4.0 s
    assert bounds[1] == (4, 13)  # starts at 2 s
    assert bounds[-1][1] == 21
    assert all(times[e - 1] - times[s] <= 4.0 for s, e in bounds)


def test_window_options_are_checked():
    assert parse_window("256") == (256, "events") and parse_window("2.5s") == (2.5, "seconds")
    for bad in ("abc", "0", "-3s"):
        with pytest.raises(ImgtuneError, match="window"):
            parse_window(bad)
    with pytest.raises(ImgtuneError, match="overlap"):
        window_bounds(np.arange(5.0), window=4, overlap=1.0)


# --- known pictures ------------------------------------------------------------------------------


def test_a_horizontal_move_draws_a_horizontal_line():
    image = draw_mouse_window(events(horizontal_move()), 64)
    ys, xs = np.nonzero(image.any(axis=2))
    assert ys.max() - ys.min() <= 1  # one row (two with the brush of a 64 px image)
    assert abs(ys.mean() - 31.5) <= 1  # centred
    assert xs.min() <= 64 * 0.1 and xs.max() >= 64 * 0.9  # the path fills the width less the margin
    assert len(set(xs.tolist())) == xs.max() - xs.min() + 1  # no gaps
    assert (image[ys, xs, 2] == 0).all() and (image[ys, xs, 0] >= 64).all()  # a move: red, no drag blue


def test_a_vertical_move_draws_a_vertical_line_and_size_does_not_matter():
    small = [(0.016 * i, "NoButton", "Move", 500, 100 + 20 * i) for i in range(40)]
    large = [(0.016 * i, "NoButton", "Move", 2000, 1000 + 20 * i) for i in range(40)]
    image = draw_mouse_window(events(small), 64)
    ys, xs = np.nonzero(image.any(axis=2))
    assert xs.max() - xs.min() <= 1 and ys.max() - ys.min() >= 55
    # the same movement elsewhere on a bigger screen gives the same picture
    assert np.array_equal(image, draw_mouse_window(events(large), 64))


def test_a_click_draws_its_mark_and_a_pause_its_ring():
    rows = horizontal_move(20)
    rows.append((rows[-1][0] + 0.01, "Left", "Pressed", rows[-1][3], rows[-1][4]))
    image = draw_mouse_window(events(rows), 64)
    yellow = np.all(image == LEFT_CLICK, axis=2)
    ys, xs = np.nonzero(yellow)
    assert yellow.sum() >= 9 and xs.mean() > 55 and abs(ys.mean() - 31.5) <= 1  # at the end of the path
    assert not np.all(draw_mouse_window(events(rows[:-1]), 64) == LEFT_CLICK, axis=2).any()

    paused = horizontal_move(10) + horizontal_move(10, x0=300, t0=2.0)
    ring = np.all(draw_mouse_window(events(paused), 64) == PAUSE, axis=2)
    assert ring.sum() > 8
    scroll = horizontal_move(10) + [(0.2, "Scroll", "Down", 280, 500)]
    assert np.all(draw_mouse_window(events(scroll), 64) == SCROLL, axis=2).any()


def test_drags_are_blue_and_wider():
    move = horizontal_move(20)
    drag = [(t, b, "Drag", x, y) for t, b, _, x, y in move]
    image = draw_mouse_window(events(drag), 64)
    ys, xs = np.nonzero(image.any(axis=2))
    assert (image[ys, xs, 2] == 255).all()
    assert ys.max() - ys.min() + 1 == 2  # twice the width of a move (one row at 64 px)


def test_faster_moves_are_redder():
    slow = [(0.05 * i, "NoButton", "Move", 100 + 5 * i, 500) for i in range(40)]
    fast = [(0.01 * i, "NoButton", "Move", 100 + 5 * i, 500) for i in range(40)]
    red = [draw_mouse_window(events(r), 64)[..., 0].max() for r in (slow, fast)]
    assert red[1] > red[0]


def test_series_styles():
    t = np.linspace(0, 4 * np.pi, 200)
    values = np.column_stack([np.sin(t), np.cos(t)])
    line = draw_series_window(values, 64, "line")
    top, bottom = line[:32].any(axis=2), line[32:].any(axis=2)
    assert top.any(axis=0).all() and bottom.any(axis=0).all()  # each column a line across its own band
    recurrence = draw_series_window(values, 64, "recurrence")
    assert recurrence.shape == (64, 64, 3) and (np.diag(recurrence[..., 0]) == 255).all()
    assert np.array_equal(recurrence[..., 0], recurrence[..., 0].T)
    gaf = draw_series_window(values, 64, "gaf")
    assert np.array_equal(gaf[..., 0], gaf[..., 0].T) and (gaf[..., 2] == 0).all()  # two columns: red, green
    with pytest.raises(ImgtuneError, match="at most 3"):
        draw_series_window(np.zeros((10, 4)), 64, "gaf")


# --- reading and writing datasets ----------------------------------------------------------------


def test_read_mouse_session_drops_off_screen_rows_and_names_bad_lines(tmp_path):
    path = write_session(tmp_path / "s", horizontal_move(5) + [(1.0, "NoButton", "Move", 65535, 65535)])
    assert len(read_mouse_session(path)) == 5
    bad = tmp_path / "bad"
    bad.write_text(HEADER + "\n0,0,NoButton,Move,1,2\n0,0,NoButton,Wiggle,1,2\n")
    with pytest.raises(ImgtuneError, match=r"bad:3:"):
        read_mouse_session(bad)
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(ImgtuneError, match="not a mouse session"):
        read_mouse_session(other)


def test_render_writes_class_folders_and_a_manifest_identically_each_run(tmp_path):
    source = user_sessions(tmp_path / "sessions", users=2, sessions=2)
    first = render_sessions(find_sessions(source), tmp_path / "a", size=32, window=64, workers=2)
    second = render_sessions(find_sessions(source), tmp_path / "b", size=32, window=64, workers=1)
    assert first.counts == {"user0": 6, "user1": 6} and first.sessions == 4
    rows = list(csv.DictReader(open(first.manifest)))
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
    with pytest.raises(ImgtuneError, match="--overwrite"):
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


# --- group split and session scores --------------------------------------------------------------


def test_group_split_never_leaks_a_session():
    items = [Item(Path(f"u{u}_s{s}_w{w}.png"), f"u{u}", group=f"u{u}/s{s}")
             for u in range(4) for s in range(5) for w in range(1 + (u + s) % 4)]
    for seed in range(20):
        train, valid = split_items(items, valid_pct=0.2, seed=seed)
        assert len(train) + len(valid) == len(items)
        assert not {i.group for i in train} & {i.group for i in valid}
        # stratified: one of each user's five sessions held out
        assert sorted(i.label for i in {i.group: i for i in valid}.values()) == ["u0", "u1", "u2", "u3"]
    assert split_items(items, valid_pct=0.2, seed=3) == split_items(items, valid_pct=0.2, seed=3)


def test_items_without_groups_split_as_before():
    items = [Item(Path(f"{i}.png"), "ab"[i % 2]) for i in range(20)]
    train, valid = split_items(items, valid_pct=0.25, seed=1)
    rng = np.random.default_rng(1)
    expected = {items[i] for i in rng.permutation(20)[:5]}
    assert set(valid) == expected and len(train) == 15


def test_csv_group_column(tmp_path):
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "m.csv").write_text("file,label,group\na.png,x,s1\nb.png,y,\n")
    found = items_from_csv(tmp_path / "m.csv")
    assert [i.group for i in found.items] == ["s1", None]


def test_session_aggregation_matches_a_hand_computation():
    probs = np.array([[0.7, 0.2, 0.1], [0.5, 0.25, 0.25], [0.1, 0.1, 0.8]])
    scores = aggregate_windows(probs, ["s1", "s1", "s2"], ["a", "b", "c"])
    assert scores.groups == ["s1", "s2"] and scores.counts.tolist() == [2, 1]
    mean_log = [(math.log(0.7) + math.log(0.5)) / 2, (math.log(0.2) + math.log(0.25)) / 2,
                (math.log(0.1) + math.log(0.25)) / 2]
    assert np.allclose(scores.log_probs[0], mean_log)
    geometric = np.sqrt([0.7 * 0.5, 0.2 * 0.25, 0.1 * 0.25])
    assert np.allclose(scores.probs[0], geometric / geometric.sum())
    assert np.allclose(scores.probs[1], [0.1, 0.1, 0.8])
    assert np.allclose(scores.prob_of(["b", "c"]), [geometric[1] / geometric.sum(), 0.8])
    with pytest.raises(ImgtuneError, match="not one of"):
        scores.prob_of(["z", "a"])


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
    split = list(csv.DictReader(open(tmp_path / "run" / "split.csv")))
    group_of = {str((out / r["file"]).resolve()): r["group"] for r in csv.DictReader(open(out / "manifest.csv"))}
    sides = {}
    for row in split:
        sides.setdefault(group_of[row["file"]], set()).add(row["split"])
    assert all(len(s) == 1 for s in sides.values()) and run.metrics["data"]["valid"] == 9  # one session per user

    table = tmp_path / "sessions.csv"
    result = runner.invoke(cli, ["predict", str(tmp_path / "run"), str(out), "--group-by", str(out / "manifest.csv"),
                                 "--csv", str(table), "--backend", "torch"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(table)))
    assert len(rows) == 9 and {r["windows"] for r in rows} == {"3"}
    assert all(abs(sum(float(p.split(":")[1]) for p in r["top_k"].split(";")) - 1) < 1e-4 for r in rows)
