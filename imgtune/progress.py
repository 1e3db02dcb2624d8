"""One progress display for every long step: a bar where someone watches, plain lines in a log.

In a terminal or a Jupyter notebook :func:`progress_bar` gives a ``tqdm.auto`` bar (a widget in
Jupyter when ipywidgets is installed, text otherwise). Anywhere else (a pipe, a file, a CI log) it
gives a :class:`PlainProgress`, which prints a whole line every ``interval`` seconds and one when it
closes, and never a carriage return, so a log stays readable line by line.
"""

from __future__ import annotations

import sys
import time
import warnings
from typing import TextIO

#: Seconds between two plain progress lines when nobody watches a bar.
PLAIN_INTERVAL = 30.0


def interactive(stream: TextIO | None = None) -> bool:
    """Whether a progress bar can be drawn on ``stream``.

    Args:
        stream: where the progress goes (default: ``sys.stderr``).

    Returns:
        True in a Jupyter kernel (its output areas draw bars and widgets) or when ``stream`` is a
        terminal; False for a pipe, a file or a CI log.
    """
    if _in_jupyter():
        return True
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def _in_jupyter() -> bool:
    """Whether this process is a Jupyter kernel (Colab's included): IPython's shell there has a kernel.
    Having imported ipykernel (a test runner executing notebooks does) is not enough."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return shell is not None and getattr(shell, "kernel", None) is not None


class PlainProgress:
    """Progress as plain lines, for logs: the same calls as a tqdm bar (``update``, ``write``, ``close``).

    Args:
        total: how many units the work has (``None`` when unknown).
        desc: what is being done, at the start of each line.
        unit: what one unit is (``"img"``, ``"url"``).
        stream: where the lines go (default: ``sys.stderr``).
        interval: seconds between two lines.
        disable: print nothing at all.
    """

    def __init__(self, total: int | None = None, *, desc: str = "", unit: str = "it",
                 stream: TextIO | None = None, interval: float = PLAIN_INTERVAL, disable: bool = False):
        self.total, self.desc, self.unit, self.interval, self.disable = total, desc, unit, interval, disable
        self.stream = stream
        self.n = 0
        self.postfix = ""
        self._start = self._last = time.monotonic()
        self._closed = False

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units done; prints a line when ``interval`` seconds have passed since the last."""
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.interval and not self._closed:
            self._last = now
            self._line(f"{now - self._start:.0f}s")

    def refresh(self) -> None:
        """Nothing to redraw: lines are printed by :meth:`update` and :meth:`close` (kept for tqdm's API)."""

    def set_postfix(self, refresh: bool = False, **values) -> None:
        """Show ``values`` (e.g. ``loss="0.1234"``) at the end of the next line.

        Args:
            refresh: ignored (tqdm's argument); the next periodic line shows the values.
            values: names and values to show.
        """
        self.postfix = " ".join(f"{name} {value}" for name, value in values.items())

    def write(self, line: str, file: TextIO | None = None) -> None:
        """Print ``line`` whole (as ``tqdm.write`` does, so callers need not know which display they have).

        Args:
            line: the text, without a newline.
            file: where to print it (default: this display's stream).
        """
        print(line, file=file or self._out, flush=True)

    def close(self) -> None:
        """Print the final line (units done and seconds taken); later calls do nothing."""
        if self._closed:
            return
        self._closed = True
        self._line(f"in {time.monotonic() - self._start:.1f}s")

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def _out(self) -> TextIO:
        return self.stream if self.stream is not None else sys.stderr

    def _line(self, when: str) -> None:
        if self.disable:
            return
        done = f"{_number(self.n)}/{_number(self.total)}" if self.total else _number(self.n)
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        postfix = f" {self.postfix}" if self.postfix else ""
        self.write(f"{self.desc + ': ' if self.desc else ''}{done} {self.unit}{pct}{postfix} {when}")


def _number(value: float) -> str:
    """A count as an integer, a measure (megabytes) with one decimal."""
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def progress_bar(total: int | None = None, *, desc: str = "", unit: str = "it", stream: TextIO | None = None,
                 bar: bool | None = None, leave: bool = True, interval: float = PLAIN_INTERVAL,
                 disable: bool = False):
    """A progress display for ``total`` units of work: a bar where one can be drawn, plain lines otherwise.

    Args:
        total: how many units the work has (``None`` when unknown).
        desc: what is being done (``"features"``, ``"download"``).
        unit: what one unit is (``"img"``, ``"url"``).
        stream: where it is shown (default: ``sys.stderr``).
        bar: force a bar (True) or plain lines (False); ``None`` decides with :func:`interactive`.
        leave: keep the finished bar on screen (bars only).
        interval: seconds between two plain lines.
        disable: show nothing (e.g. for a handful of files).

    Returns:
        A ``tqdm.auto`` bar or a :class:`PlainProgress`; both offer ``update``, ``set_postfix``,
        ``write``, ``close``, ``n`` and ``total`` and work as context managers.
    """
    if bar is None:
        bar = interactive(stream)
    if not bar:
        return PlainProgress(total, desc=desc, unit=unit, stream=stream, interval=interval, disable=disable)
    with warnings.catch_warnings():
        # Without ipywidgets, tqdm.auto warns once and falls back to the text bar, which is what we want.
        warnings.simplefilter("ignore")
        from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc or None, unit=unit, file=stream, leave=leave, dynamic_ncols=True,
                disable=disable)
