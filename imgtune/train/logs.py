"""Run logs: ``history.csv`` (one row per epoch) and ``lr_find.csv`` in every run folder, and TensorBoard
event files with ``log="tensorboard"``; the table a notebook shows for a run.

Both loggers are callbacks (see :mod:`imgtune.train.callbacks`). :class:`HistoryLog` rewrites
``history.csv`` after every epoch through the run folder (atomically, listed in ``run.json``), so a
killed run leaves its log too. :class:`TensorBoardLog` writes the per-epoch metrics and, every
``every`` steps, the training loss and the head's learning rate, with
``torch.utils.tensorboard.SummaryWriter`` straight into the run folder: ``tensorboard --logdir runs``
then names each run by its folder, and ``--overwrite`` removes the event files with the run's other
files (they are listed in ``run.json``).
"""

from __future__ import annotations

import csv
import importlib.util
import io
import math
from pathlib import Path

from imgtune.errors import ImgtuneError
from imgtune.html_repr import table
from imgtune.train.run_folder import RunFolder

HISTORY_FILE, LR_FIND_FILE = "history.csv", "lr_find.csv"
#: The first columns of ``history.csv``; other metrics an epoch records (e.g. ``macro_f1``) follow them.
HISTORY_COLUMNS = ("phase", "epoch", "train_loss", "valid_loss", "accuracy", "error_rate", "seconds", "lr")
#: The values of ``log`` (``--log``) besides ``None``.
LOGS = ("tensorboard",)
#: What TensorBoard event files are called (the rest of the name: time, host, process, counter).
EVENTS_PREFIX = "events.out.tfevents."
MISSING_TENSORBOARD = ("--log tensorboard needs the tensorboard package: pip install 'imgtune[tensorboard]' "
                       "(or pip install tensorboard)")


def check_log(log: str | None) -> str | None:
    """``log`` checked before a run starts: ``None`` (or ``"none"``) or one of :data:`LOGS`.

    Raises:
        ImgtuneError: an unknown name, or ``"tensorboard"`` without the tensorboard package.
    """
    if log in (None, "none"):
        return None
    if log not in LOGS:
        raise ImgtuneError(f"unknown log {log!r}; choose {', '.join(LOGS)} (history.csv is always written)")
    if importlib.util.find_spec("tensorboard") is None:
        raise ImgtuneError(MISSING_TENSORBOARD)
    return log


def history_csv(history: list[dict], lrs: dict | None = None) -> str:
    """``history.csv``'s text: :data:`HISTORY_COLUMNS`, then any other metric the epochs record.

    Args:
        history: one dict per epoch, as ``learner.history``.
        lrs: the head's learning rate at the end of each epoch by ``(phase, epoch)``; an epoch
            missing here has an empty ``lr`` cell.

    Returns:
        CSV text; floats are written as Python's ``repr``, so they read back exactly.
    """
    lrs = lrs or {}
    extra = [key for record in history for key in record if key not in HISTORY_COLUMNS]
    columns = list(HISTORY_COLUMNS) + list(dict.fromkeys(extra))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    for record in history:
        writer.writerow({**record, "lr": lrs.get((record.get("phase"), record.get("epoch")), "")})
    return text.getvalue()


def lr_find_csv(result) -> str:
    """``lr_find.csv``'s text: ``step,lr,loss``, one row per step of the lr finder's sweep."""
    text = io.StringIO(newline="")
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["step", "lr", "loss"])
    writer.writerows((step, lr, loss) for step, (lr, loss) in enumerate(zip(result.lrs, result.losses), 1))
    return text.getvalue()


def _recorded_lrs(path: Path) -> dict:
    """The ``lr`` column of an existing ``history.csv`` by ``(phase, epoch)`` (a resumed run keeps them)."""
    if not path.is_file():
        return {}
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return {(row["phase"], int(row["epoch"])): float(row["lr"]) for row in rows
            if row.get("lr") and row.get("epoch", "").isdigit()}


def head_lr(learner) -> float:
    """The learning rate of the last layer group (the head) at the last step."""
    return float(learner.opt.param_groups[-1]["lr"])


class HistoryLog:
    """Writes ``history.csv`` into the run folder after every epoch (see :func:`history_csv`).

    Args:
        folder: the run folder; on resume the ``lr`` cells of the epochs already logged are kept.
    """

    def __init__(self, folder: RunFolder):
        self.folder = folder
        self.lrs = _recorded_lrs(folder / HISTORY_FILE)

    def after_epoch(self, learner) -> None:
        record = learner.epoch_metrics
        self.lrs[(record["phase"], record["epoch"])] = head_lr(learner)
        self.folder.write(HISTORY_FILE, history_csv(learner.history, self.lrs))


def summary_writer(log_dir: str | Path):
    """A ``torch.utils.tensorboard.SummaryWriter`` for ``log_dir``.

    Raises:
        ImgtuneError: the tensorboard package is not installed.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImgtuneError(MISSING_TENSORBOARD) from None
    return SummaryWriter(log_dir=str(log_dir))


class TensorBoardLog:
    """Writes TensorBoard event files into a folder (a run folder lists them in its ``run.json``).

    Scalars: ``epoch/<metric>`` (``train_loss``, ``valid_loss``, ``accuracy``, ``error_rate`` and any
    other number an epoch records) at the epoch's number counted over all phases; ``step/loss`` and
    ``step/lr`` (the head's rate) every ``every`` optimizer steps, at the step counted over the phases
    this logger saw (a resumed run counts from its resumed phase); ``lr_find/loss`` and ``lr_find/lr``
    per sweep step (:meth:`log_lr_find`). Each phase's events go to a file of their own, closed when
    the phase ends.

    Args:
        folder: a :class:`RunFolder` or any folder.
        every: optimizer steps between two per-step points (reading the loss waits for a GPU step to end).
    """

    def __init__(self, folder: RunFolder | str | Path, *, every: int = 10):
        self.folder = folder
        self.path = folder.path if isinstance(folder, RunFolder) else Path(folder)
        self.every = max(1, int(every))
        self.writer = None
        self.steps_before = 0  # optimizer steps of the phases already ended

    def before_fit(self, learner) -> None:
        if learner.phase != "lr_find":  # the sweep is logged from its result, after it (log_lr_find)
            self.writer = summary_writer(self.path)

    def after_batch(self, learner) -> None:
        if self.writer is not None and learner.step % self.every == 0:
            step = self.steps_before + learner.step
            self.writer.add_scalar("step/loss", learner.loss, step)
            self.writer.add_scalar("step/lr", head_lr(learner), step)

    def after_epoch(self, learner) -> None:
        if self.writer is None:
            return
        epoch = len(learner.history)
        for key, value in learner.epoch_metrics.items():
            if key not in ("epoch", "phase") and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(f"epoch/{key}", value, epoch)
        self.writer.add_scalar("epoch/lr", head_lr(learner), epoch)
        self.writer.flush()

    def after_fit(self, learner) -> None:
        if self.writer is not None:
            self.steps_before += learner.step
            self._close()

    def log_lr_find(self, result) -> None:
        """The lr finder's sweep (an :class:`~imgtune.train.lr_find.LRFinderResult`), one point per step."""
        self.writer = summary_writer(self.path)
        for step, (lr, loss) in enumerate(zip(result.lrs, result.losses), 1):
            self.writer.add_scalar("lr_find/loss", loss, step)
            self.writer.add_scalar("lr_find/lr", lr, step)
        self._close()

    def _close(self) -> None:
        self.writer.close()
        self.writer = None
        if isinstance(self.folder, RunFolder):
            self.folder.record(*sorted(p.name for p in self.path.glob(EVENTS_PREFIX + "*")))


def run_logs(folder: RunFolder, *, log: str | None = None, lr_finder=None) -> list:
    """Write ``lr_find.csv`` (when the lr finder ran) and return the callbacks that log the run.

    Args:
        folder: the run folder.
        log: ``None`` or ``"tensorboard"`` (see :func:`check_log`).
        lr_finder: the lr finder's result, or ``None``.

    Returns:
        A :class:`HistoryLog`, and a :class:`TensorBoardLog` (which has logged the sweep) for ``"tensorboard"``.
    """
    if lr_finder is not None:
        folder.write(LR_FIND_FILE, lr_find_csv(lr_finder))
    callbacks = [HistoryLog(folder)]
    if check_log(log) == "tensorboard":
        board = TensorBoardLog(folder)
        if lr_finder is not None:
            board.log_lr_find(lr_finder)
        callbacks.append(board)
    return callbacks


#: The final metrics a run's table shows when its last epoch has them.
SUMMARY_METRICS = (("accuracy", "accuracy"), ("error_rate", "error rate"), ("valid_loss", "valid loss"),
                   ("balanced_accuracy", "balanced accuracy"), ("macro_f1", "macro F1"))


#: The metrics shown as percentages.
PERCENT_METRICS = ("accuracy", "error_rate", "balanced_accuracy")
#: Epochs a run's table shows at most.
HISTORY_ROWS = 50


def run_html(run_dir: str | Path, metrics: dict) -> str:
    """A run as a notebook shows it: its folder, final metrics and one row per epoch (escaped HTML)."""
    history = metrics.get("history") or []
    final = dict(history[-1] if history else {})
    final.update({key: metrics[key] for key, _ in SUMMARY_METRICS if key in metrics})  # metrics.json's own
    if "valid_accuracy" in metrics:
        final["accuracy"] = metrics["valid_accuracy"]
    summary = [[label, f"{100 * final[key]:.2f}%" if key in PERCENT_METRICS else final[key]]
               for key, label in SUMMARY_METRICS if isinstance(final.get(key), (int, float))]
    epochs = [[h.get("epoch", ""), h.get("phase", ""), h.get("train_loss", ""), h.get("valid_loss", ""),
               f"{100 * h['accuracy']:.2f}%" if isinstance(h.get("accuracy"), float) else "",
               round(h["seconds"], 1) if isinstance(h.get("seconds"), (int, float)) else ""] for h in history]
    return (table(["run folder"], [[str(run_dir)]])
            + table(["metric", "value"], summary, caption="final epoch")
            + table(["epoch", "phase", "train loss", "valid loss", "accuracy", "seconds"], epochs, caption="history",
                    max_rows=HISTORY_ROWS))
