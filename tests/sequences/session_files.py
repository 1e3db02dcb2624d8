"""Session files for the sequence tests: mouse session CSVs and the events they hold."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imgtune.sequences.mouse import MouseEvents

HEADER = "record timestamp,client timestamp,button,state,x,y"


def write_session(path: Path, rows) -> Path:
    """A mouse session CSV from ``(t, button, state, x, y)`` rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [HEADER] + [f"{t:.3f},{t:.3f},{b},{s},{x},{y}" for t, b, s, x, y in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def horizontal_move(n: int = 40, x0: int = 100, y: int = 500, step: int = 20, t0: float = 0.0):
    return [(t0 + 0.016 * i, "NoButton", "Move", x0 + step * i, y) for i in range(n)]


def mouse_events(rows) -> MouseEvents:
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
