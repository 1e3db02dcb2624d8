"""A tiny callback protocol and the callbacks imgtune ships.

A callback is any object with some of these methods, each called with the learner:
``before_fit``, ``after_batch``, ``after_epoch``, ``after_fit``. The learner exposes ``phase``
(``"lr_find"``, ``"frozen"``, ``"unfrozen"`` or ``"fit"``), ``epoch``, ``epochs``, ``step``,
``total_steps``, ``loss`` (the last batch's) and ``epoch_metrics`` (the last epoch's). To stop
training a callback sets ``learner.should_stop = True``.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import TextIO

from imgtune.files import atomic_write
from imgtune.progress import interactive, progress_bar
from imgtune.train import distributed


class History:
    """Records one dict of metrics per epoch (the learner always has one, as ``learner.history``)."""

    def __init__(self):
        self.records: list[dict] = []

    def after_epoch(self, learner) -> None:
        """Keep a copy of the epoch's metrics.

        Args:
            learner: the learner that finished an epoch (its ``epoch_metrics``).
        """
        self.records.append(dict(learner.epoch_metrics))


class ProgressCallback:
    """A progress bar per phase in a terminal or notebook; plain periodic lines otherwise (CI logs).

    Args:
        stream: where to write (stderr by default).
        interval: seconds between plain progress lines when the output is not a terminal.
        bar: force the bar (True) or plain lines (False); ``None`` decides from the stream.
    """

    def __init__(self, stream: TextIO | None = None, *, interval: float = 30.0, bar: bool | None = None):
        self.stream = stream
        self.interval = interval
        self.bar = bar
        self._pbar = None
        self._last_print = self._last_loss = 0.0

    @property
    def _out(self) -> TextIO:
        return self.stream or sys.stderr

    def before_fit(self, learner) -> None:
        """Start a bar for the fit's steps (or print how many there are).

        Args:
            learner: the learner about to fit (its ``phase``, ``total_steps`` and ``step``).
        """
        use_bar = interactive(self._out) if self.bar is None else self.bar
        use_bar = use_bar and distributed.is_main()  # under torchrun only rank 0 reports
        self._start = self._last_print = time.monotonic()
        resumed = f", resumed after step {learner.step}" if learner.step else ""
        if use_bar:
            self._pbar = self._bar(learner.total_steps, learner.phase)
            self._pbar.update(learner.step)  # a resumed fit starts where its checkpoint stood
        else:
            self._write(f"{learner.phase}: {learner.total_steps} steps{resumed}")

    def after_batch(self, learner) -> None:
        """Advance the bar, or print a line when ``interval`` seconds have passed.

        Args:
            learner: the learner that made a step (its ``step`` and ``loss``).
        """
        now = time.monotonic()
        if self._pbar is not None:
            self._pbar.update(1)
            # Reading the loss waits for the GPU to finish the step: do it twice a second, not every step.
            if now - self._last_loss >= 0.5 or learner.step >= learner.total_steps:
                self._last_loss = now
                self._pbar.set_postfix(loss=f"{learner.loss:.4f}", refresh=False)
            return
        if now - self._last_print >= self.interval:
            self._last_print = now
            pct = 100 * learner.step / max(1, learner.total_steps)
            self._write(f"{learner.phase}: step {learner.step}/{learner.total_steps} ({pct:.0f}%)"
                        f" loss {learner.loss:.4f} {now - self._start:.0f}s")

    def after_epoch(self, learner) -> None:
        """Print the epoch's line: losses, accuracy, error rate and seconds.

        Args:
            learner: the learner that finished an epoch.
        """
        m = learner.epoch_metrics
        self._write(
            f"epoch {m['epoch']}/{learner.epochs} {m['phase']:<8} train_loss {m['train_loss']:.4f}"
            f"  valid_loss {m['valid_loss']:.4f}  accuracy {100 * m['accuracy']:.2f}%"
            f"  error_rate {100 * m['error_rate']:.2f}%  {m['seconds']:.0f}s"
        )

    def after_fit(self, learner) -> None:
        """Close the bar.

        Args:
            learner: the learner that finished fitting.
        """
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None

    def on_features(self, learner, done: int, total: int) -> None:
        """Backbone features being computed for the frozen phase: ``done`` of ``total`` images.

        Args:
            learner: the learner computing them.
            done, total: images done so far, and in all.
        """
        if done == 0:
            self._start = self._last_print = time.monotonic()
            if interactive(self._out) if self.bar is None else self.bar:
                self._pbar = self._bar(total, "features", unit="img")
            else:
                self._write(f"features: {total} images (computed once, then cached)")
        if self._pbar is not None:
            self._pbar.update(done - self._pbar.n)
        elif 0 < done < total and time.monotonic() - self._last_print >= self.interval:
            self._last_print = time.monotonic()
            self._write(f"features: {done}/{total} images {time.monotonic() - self._start:.0f}s")
        if done >= total:
            self.after_fit(learner)
            self._write(f"features: {total} images in {time.monotonic() - self._start:.1f}s")

    def _bar(self, total: int, desc: str, unit: str = "it"):
        return progress_bar(total, desc=desc, unit=unit, stream=self._out, bar=True, leave=False)

    def _write(self, line: str) -> None:
        if not distributed.is_main():
            return
        if self._pbar is not None:
            self._pbar.write(line, file=self._out)
        else:
            print(line, file=self._out, flush=True)


class EarlyStopping:
    """Stop when ``monitor`` has not improved for ``patience`` epochs (lower is better for losses).

    Args:
        monitor: an ``epoch_metrics`` key (``"valid_loss"``, ``"accuracy"``, ...).
        patience: epochs without improvement before stopping.
        min_delta: the least change that counts as an improvement.
    """

    def __init__(self, monitor: str = "valid_loss", patience: int = 2, min_delta: float = 0.0):
        self.monitor, self.patience, self.min_delta = monitor, patience, min_delta
        self.lower_is_better = "loss" in monitor or "error" in monitor

    def before_fit(self, learner) -> None:
        """Forget the previous fit's best value.

        Args:
            learner: the learner about to fit.
        """
        self.best, self.wait = math.inf, 0

    def after_epoch(self, learner) -> None:
        """Count the epochs without improvement; set ``learner.should_stop`` after ``patience`` of them.

        Args:
            learner: the learner that finished an epoch (its ``epoch_metrics``).
        """
        value = learner.epoch_metrics[self.monitor]
        score = value if self.lower_is_better else -value
        if score < self.best - self.min_delta:
            self.best, self.wait = score, 0
        else:
            self.wait += 1
            if self.wait >= self.patience:
                learner.should_stop = True


class CheckpointCallback:
    """Save the weights (safetensors) to ``path`` after each epoch where ``monitor`` improves.

    Args:
        path: the ``.safetensors`` file (replaced atomically each time).
        monitor: an ``epoch_metrics`` key; lower is better for losses and error rates.
    """

    def __init__(self, path: str | Path, monitor: str = "valid_loss"):
        self.path, self.monitor = Path(path), monitor
        self.lower_is_better = "loss" in monitor or "error" in monitor
        self.best = math.inf

    def after_epoch(self, learner) -> None:
        """Save the weights when the epoch improved on the best ``monitor`` value so far.

        Args:
            learner: the learner that finished an epoch (its ``epoch_metrics`` and ``model``).
        """
        value = learner.epoch_metrics[self.monitor]
        score = value if self.lower_is_better else -value
        if score < self.best and distributed.is_main():  # every process has the same weights; one writes
            from safetensors.torch import save

            self.best = score
            state = {k: v.detach().cpu().contiguous() for k, v in learner.model.state_dict().items()}
            atomic_write(self.path, save(state), fsync=True)  # a crash leaves the previous best whole
