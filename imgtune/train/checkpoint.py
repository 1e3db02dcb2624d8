"""Checkpoints: after every epoch, everything the rest of a run depends on, so that a killed run resumes.

:class:`ResumeCheckpoint` (a callback) writes ``checkpoint.pt`` after each epoch: a temporary file,
fsynced, renamed over the last one, so a crash at any moment leaves the previous checkpoint or the new
one whole. It holds tensors and plain data only (loaded with ``torch.load(weights_only=True)``, no code
runs): the weights, the optimizer and loss-scaler state, where the schedule stands (phase, epoch, step,
the planned epochs and rates), the history, the run's options and data (checked on resume) and every
random state the rest of the run draws from.

The random states: Python's, NumPy's, torch's on the CPU and every CUDA device (augmentation in the
main process, dropout, the validation loader's seed), and the generators of the loader the epoch
trained on (its shuffle, drawn again by each epoch's closing ``next()``) and of its dataset (the
random view of a cached feature). They are put back just before the first epoch a resumed fit trains,
once that fit has made its loaders, so a CPU run that resumes ends with the same weights, bit for
bit, as one that never stopped. With loader worker processes (``num_workers`` > 0) the augmentation
is drawn in the workers, which outlive an epoch and whose state cannot be saved: the resumed run is
then a faithful continuation, not a bit-identical one.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from imgtune.deploy.bundle import META_FILE
from imgtune.errors import ImgtuneError, describe
from imgtune.files import atomic_writer
from imgtune.train import distributed, rng
from imgtune.train.features import HeadOnFeatures

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = 1


# --- random state -----------------------------------------------------------------------------------


def random_state(learner) -> dict:
    """Every random state the rest of ``learner``'s training draws from (see the module's docstring)."""
    return dict(rng.capture(learner.train_dl), on_features=isinstance(learner.model, HeadOnFeatures))


def restore_random_state(learner, state: Mapping) -> None:
    """Put back a :func:`random_state`. The loader's generators are restored when ``learner`` trains on
    the same kind of loader as when it was saved (cached features or images): after a checkpoint at
    the end of the frozen phase on features, the image loader of the unfrozen phase was never drawn
    from, and keeps the state it was made with."""
    same_loader = state["on_features"] == isinstance(learner.model, HeadOnFeatures)
    rng.restore(state, learner.train_dl if same_loader else None)


# --- the checkpoint -----------------------------------------------------------------------------------


def checkpoint_state(learner, model: torch.nn.Module, *, run: Mapping | None = None) -> dict:
    """What a checkpoint holds after ``learner``'s current epoch; ``model`` is its whole network (while
    the head trains on cached features ``learner.model`` is the head alone), ``run`` the run's options."""
    scaler = learner.precision.scaler
    features = getattr(learner, "features", None)
    return dict(
        format=CHECKPOINT_FORMAT,
        run=dict(run or {}),
        plan=getattr(learner, "plan", None),
        position=dict(phase=learner.phase, epoch=learner.epoch, epochs=learner.epochs, step=learner.step,
                      stopped=bool(learner.should_stop), epochs_trained=learner._epochs_trained,
                      steps_per_epoch=learner.steps_per_epoch),
        history=[dict(record) for record in learner.history],
        timings=dict(learner.timings),
        features_stats=dict(features.stats) if features is not None else {},
        model={k: v.detach().cpu() for k, v in model.state_dict().items()},
        optimizer=learner.opt.state_dict(),
        scaler=scaler.state_dict() if scaler is not None else None,
        random=random_state(learner),
    )


def save_checkpoint(path: str | Path, state: Mapping) -> Path:
    """Write ``state`` to ``path`` atomically: a temporary file beside it, fsynced, renamed over it."""
    with atomic_writer(path, fsync=True) as out:
        torch.save(dict(state), out)
    return Path(path)


def load_checkpoint(run_dir: str | Path) -> dict:
    """The checkpoint of the run in ``run_dir`` (its ``checkpoint.pt``), read without running code.

    Raises:
        ImgtuneError: there is none (the run finished, or never got through an epoch), it cannot be
            read, or a newer imgtune wrote it.
    """
    run_dir = Path(run_dir)
    path = run_dir / CHECKPOINT_FILE
    if not path.is_file():
        why = ("the run finished (its model.json is there)" if (run_dir / META_FILE).is_file()
               else "was the run started by `imgtune train`, and did it finish an epoch?")
        raise ImgtuneError(f"{run_dir}: no {CHECKPOINT_FILE} to resume from; {why}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ImgtuneError(f"{path}: cannot read the checkpoint ({describe(error)})") from None
    if not isinstance(state, dict) or "position" not in state or "random" not in state:
        raise ImgtuneError(f"{path}: not a checkpoint imgtune wrote")
    if state.get("format", 0) > CHECKPOINT_FORMAT:
        raise ImgtuneError(f"{path}: checkpoint format {state['format']} is newer than this imgtune; upgrade imgtune")
    return state


class ResumeCheckpoint:
    """A callback: after an epoch, write a checkpoint to ``path`` (rank 0 only under torchrun).

    Args:
        path: the file (``run_dir/checkpoint.pt``).
        model: the learner's whole network (``learner.model`` before any fit).
        run: plain data kept with it: the options and data fingerprint a resume is checked against,
            the lr finder's curve, the command line.
        every: seconds. An epoch ending less than this long after the last checkpoint is not saved,
            unless it ends its phase or the fit stops: the head on cached features runs epochs of a few
            milliseconds, where writing tens of MB after each would cost more than the training, while a
            crash loses at most ``every`` seconds or one epoch, whichever is longer. 0: every epoch.

    It must come after the callbacks whose state it records (the learner's history comes first).
    The seconds spent writing are added to ``learner.timings["checkpoints"]``.
    """

    def __init__(self, path: str | Path, model: torch.nn.Module, *, run: Mapping | None = None, every: float = 0.0):
        self.path, self.model, self.run, self.every = Path(path), model, dict(run or {}), every
        self.last_saved: float | None = None

    def after_epoch(self, learner) -> None:
        if not distributed.is_main():  # every process holds the same weights; one writes
            return
        started = time.perf_counter()
        phase_ends = learner.epoch >= learner.epochs or learner.should_stop
        if self.last_saved is not None and started - self.last_saved < self.every and not phase_ends:
            return
        save_checkpoint(self.path, checkpoint_state(learner, self.model, run=self.run))
        self.last_saved = time.perf_counter()
        learner.timings["checkpoints"] = learner.timings.get("checkpoints", 0.0) + self.last_saved - started


# --- resuming -----------------------------------------------------------------------------------------


def restore_training_state(learner, state: Mapping) -> dict:
    """Put ``state``'s weights, optimizer, loss scaler, history and timings back into ``learner`` (its
    whole network: call it outside a fit). Returns the plan it was trained with."""
    if not state.get("plan"):
        raise ImgtuneError("the checkpoint was not written by fine_tune (it has no plan of epochs and rates)")
    steps = state["position"].get("steps_per_epoch")
    if steps is not None and steps != learner.steps_per_epoch:  # e.g. an automatic batch size chose another
        raise ImgtuneError(f"the checkpoint's run took {steps} steps an epoch, this one {learner.steps_per_epoch}; "
                           "resume with the batch size (`bs`) and `accumulate` the run had")
    learner.model.load_state_dict(state["model"])
    learner.opt.load_state_dict(state["optimizer"])
    if state.get("scaler") and learner.precision.scaler is not None:
        learner.precision.scaler.load_state_dict(state["scaler"])
    learner.history_cb.records[:] = [dict(record) for record in state["history"]]
    learner.timings.update(state.get("timings") or {})
    learner._epochs_trained = state["position"]["epochs_trained"]
    features = getattr(learner, "features", None)
    if features is not None and not features.stats:
        features.stats = dict(state.get("features_stats") or {})
    return dict(state["plan"])


def resume_points(state: Mapping, phases: Sequence[tuple[str, int]]) -> dict[str, dict | bool | None]:
    """Where each phase of a plan picks up after ``state``'s checkpoint.

    Args:
        state: the checkpoint.
        phases: ``(phase name, planned epochs)`` in training order.

    Returns:
        For each phase: ``False`` (finished before the checkpoint: skip it), a ``resume`` argument for
        ``Learner.fit_one_cycle`` (the phase to continue, or the first one after a finished phase: it
        gets the random state), or ``None`` (trains as usual).
    """
    position = state["position"]
    names = [name for name, _ in phases]
    if position["phase"] not in names:
        raise ImgtuneError(f"the checkpoint stopped in a {position['phase']!r} phase, not one of {', '.join(names)}")
    current = names.index(position["phase"])
    done = position["epochs"] if position["stopped"] else position["epoch"]
    points: dict[str, dict | bool | None] = {}
    pending = dict(epoch=done, step=position["step"], random=state["random"])
    for index, (name, planned) in enumerate(phases):
        if index < current or (index == current and done >= planned):
            points[name] = False
        elif pending is not None and planned > 0:
            points[name], pending = pending, None
        else:
            points[name] = None
        if index == current and done >= planned:
            pending = dict(epoch=0, step=0, random=state["random"])
    return points


def data_fingerprint(data) -> dict:
    """What a resume checks the data against: the classes, and a hash per split of every image's
    absolute path, label, size and modification time (an edited, added or removed file changes it)."""

    def digest(items) -> str:
        hasher = hashlib.sha256()
        for item in items:
            path = Path(item.path).resolve()
            stat = os.stat(path)
            hasher.update(f"{path}\0{item.label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return hasher.hexdigest()

    return dict(classes=list(data.classes), train=len(data.train), valid=len(data.valid),
                train_sha256=digest(data.train), valid_sha256=digest(data.valid))


def check_resume(state: Mapping, *, options: Mapping, data: Mapping | None = None, where: str | Path) -> None:
    """Refuse to resume the checkpoint ``state`` of the run in ``where`` with other options or data.

    Args:
        options: this run's training options by parameter name (as the checkpoint's ``run.options``).
        data: this run's :func:`data_fingerprint` (``None``: the options only).

    Raises:
        ImgtuneError: naming the first option that differs (and the command that started the run),
            or what differs in the data.
    """
    run = state.get("run") or {}
    command = f" (it was: {run['command']})" if run.get("command") else ""
    for key, old in (run.get("options") or {}).items():
        new = options.get(key)
        if _plain(new) != _plain(old):
            if key == "source":
                raise ImgtuneError(f"{where}: the run trained on {old}, not {new}; resume with the same data{command}")
            raise ImgtuneError(f"{where}: the run was started with `{key}={_shown(old)}`, not `{key}={_shown(new)}`; "
                               f"resume with the same options{command}")
    old = run.get("data") or {}
    if data is None or not old:
        return
    if old.get("classes") != data["classes"]:
        raise ImgtuneError(f"{where}: the run's classes were {', '.join(old['classes'])}, now "
                           f"{', '.join(data['classes'])}; resume on the same data or start a new run")
    for split in ("train", "valid"):
        if (old.get(split) != data[split] or old.get(f"{split}_sha256") != data[f"{split}_sha256"]):
            raise ImgtuneError(f"{where}: the {split} images differ from the run's ({old.get(split)} then, "
                               f"{data[split]} now, or files added, removed or edited); resume on the same "
                               "data or start a new run")


def _plain(value):
    """Options as JSON would keep them: tuples as lists, paths as strings."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _shown(value) -> str:
    if value is None:
        return "auto"
    if isinstance(value, (list, tuple)):
        return ":".join(map(str, value))
    return str(value)
