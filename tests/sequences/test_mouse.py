"""Mouse sessions: reading the CSV, and windows drawn as known pictures."""

from __future__ import annotations

import numpy as np
import pytest
from session_files import HEADER, horizontal_move, mouse_events, write_session

from imgtune.errors import ImgtuneError
from imgtune.sequences.mouse import (
    LEFT_CLICK,
    PAUSE,
    SCROLL,
    draw_mouse_window,
    read_mouse_session,
)


def test_a_horizontal_move_draws_a_horizontal_line():
    image = draw_mouse_window(mouse_events(horizontal_move()), 64)
    ys, xs = np.nonzero(image.any(axis=2))
    assert ys.max() - ys.min() <= 1  # one row (two with the brush of a 64 px image)
    assert abs(ys.mean() - 31.5) <= 1  # centred
    assert xs.min() <= 64 * 0.1 and xs.max() >= 64 * 0.9  # the path fills the width less the margin
    assert len(set(xs.tolist())) == xs.max() - xs.min() + 1  # no gaps
    assert (image[ys, xs, 2] == 0).all() and (image[ys, xs, 0] >= 64).all()  # a move: red, no drag blue


def test_a_vertical_move_draws_a_vertical_line_and_size_does_not_matter():
    small = [(0.016 * i, "NoButton", "Move", 500, 100 + 20 * i) for i in range(40)]
    large = [(0.016 * i, "NoButton", "Move", 2000, 1000 + 20 * i) for i in range(40)]
    image = draw_mouse_window(mouse_events(small), 64)
    ys, xs = np.nonzero(image.any(axis=2))
    assert xs.max() - xs.min() <= 1 and ys.max() - ys.min() >= 55
    # the same movement elsewhere on a bigger screen gives the same picture
    assert np.array_equal(image, draw_mouse_window(mouse_events(large), 64))


def test_a_click_draws_its_mark_and_a_pause_its_ring():
    rows = horizontal_move(20)
    rows.append((rows[-1][0] + 0.01, "Left", "Pressed", rows[-1][3], rows[-1][4]))
    image = draw_mouse_window(mouse_events(rows), 64)
    yellow = np.all(image == LEFT_CLICK, axis=2)
    ys, xs = np.nonzero(yellow)
    assert yellow.sum() >= 9 and xs.mean() > 55 and abs(ys.mean() - 31.5) <= 1  # at the end of the path
    assert not np.all(draw_mouse_window(mouse_events(rows[:-1]), 64) == LEFT_CLICK, axis=2).any()

    paused = horizontal_move(10) + horizontal_move(10, x0=300, t0=2.0)
    ring = np.all(draw_mouse_window(mouse_events(paused), 64) == PAUSE, axis=2)
    assert ring.sum() > 8
    scroll = horizontal_move(10) + [(0.2, "Scroll", "Down", 280, 500)]
    assert np.all(draw_mouse_window(mouse_events(scroll), 64) == SCROLL, axis=2).any()


def test_drags_are_blue_and_wider():
    move = horizontal_move(20)
    drag = [(t, b, "Drag", x, y) for t, b, _, x, y in move]
    image = draw_mouse_window(mouse_events(drag), 64)
    ys, xs = np.nonzero(image.any(axis=2))
    assert (image[ys, xs, 2] == 255).all()
    assert ys.max() - ys.min() + 1 == 2  # twice the width of a move (one row at 64 px)


def test_faster_moves_are_redder():
    slow = [(0.05 * i, "NoButton", "Move", 100 + 5 * i, 500) for i in range(40)]
    fast = [(0.01 * i, "NoButton", "Move", 100 + 5 * i, 500) for i in range(40)]
    red = [draw_mouse_window(mouse_events(r), 64)[..., 0].max() for r in (slow, fast)]
    assert red[1] > red[0]


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
