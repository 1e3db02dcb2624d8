"""A training run: find the data, fine-tune, and write the run folder (bundle, metrics, summary, lr curve).

The folder is the run's own (see :mod:`imgtune.train.run_folder`), every file in it is written
atomically, and a checkpoint after every epoch lets a killed run go on (``resume``, see
:mod:`imgtune.train.checkpoint`).
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from imgtune.data.loaders import ImageData, load_data
from imgtune.data.presize import ImageView
from imgtune.data.sources import EMPTY_CLASS_FOLDER
from imgtune.deploy.bundle import META_FILE, WEIGHTS_FILE, versions
from imgtune.errors import ImgtuneError, describe
from imgtune.files import atomic_write
from imgtune.models import DEFAULT_ARCH, IMAGENET, get_backbone
from imgtune.train import distributed, evaluate, logs
from imgtune.train.balance import describe as describe_loss
from imgtune.train.checkpoint import (
    CHECKPOINT_FILE,
    ResumeCheckpoint,
    check_resume,
    data_fingerprint,
    load_checkpoint,
)
from imgtune.train.learner import Learner
from imgtune.train.lr_find import LRFinderResult
from imgtune.train.run_folder import RunFolder, check_out


@dataclass
class RunResult:
    """What :func:`train` produced: the run folder, the learner and the metrics written to ``metrics.json``."""

    run_dir: Path
    learner: Learner
    metrics: dict

    def _repr_html_(self) -> str:
        """The run folder, final metrics and per-epoch table, for a notebook (see :func:`logs.run_html`)."""
        return logs.run_html(self.run_dir, self.metrics)


def default_run_dir(source, *, root: str | Path = "runs") -> Path:
    """``runs/<data name>-<YYYYmmdd-HHMMSS>``."""
    name = Path(str(source)).name if source is not None else "elpv"
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "data"
    return Path(root) / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"


def train(
    data: ImageData | str | Path | None = None,
    *,
    arch: str = DEFAULT_ARCH,
    epochs: int | None = None,
    freeze_epochs: int | None = None,
    lr: float | Sequence[float] | None = None,
    weights: str | None = IMAGENET,
    size: int | None = None,
    resize: str = "crop",
    bs: int | None = None,
    augment: bool = True,
    num_workers: int | None = None,
    seed: int = 42,
    device: str | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    report: bool = True,
    command: str = "",
    feature_cache: bool = True,
    cache: bool = True,
    cache_dir: str | Path | None = None,
    accumulate: int = 1,
    sync_bn: bool = False,
    precision: str = "auto",
    compile_model: bool = False,
    balance: bool | float | str = "mild",
    tta: bool = False,
    tune_stages: int | str = "auto",
    resume: str | Path | None = None,
    checkpoint_every: float = 10.0,
    log: str | None = None,
    **data_options,
) -> RunResult:
    """Fine-tune ``arch`` on ``data`` with the lesson's recipe and write a run folder.

    Args:
        data: an :class:`ImageData`, or a source for :func:`imgtune.load_data` (with
            ``data_options`` such as ``label_re``, ``csv_path``, ``valid_pct``, ``stratify``).
        epochs, freeze_epochs, lr: see :meth:`Learner.fine_tune` (``None``: automatic epochs, and
            the lr finder for the rate).
        out: the run folder, which must be new or empty unless ``overwrite`` (which removes the files
            an earlier run listed in its ``run.json``, and no other). By default
            ``runs/<data>-<timestamp>``, with ``-2``, ``-3``, ... when that folder exists.
        report: write ``report.html`` (interpretation, figures) into the run folder; a report that
            fails is a warning (``metrics["report_error"]``), not a failed run.
        command: the command line, recorded in ``metrics.json``.
        feature_cache, cache, cache_dir: see :meth:`Learner.from_data`; with ``cache`` the images are
            checked through the presize cache, so a second run decodes nothing.
        accumulate, sync_bn, precision, compile_model: see :class:`Learner`. Under torchrun every process calls this: it joins
            the process group (:func:`imgtune.train.distributed.setup`), ``bs`` is per process, and only
            rank 0 writes the run folder.
        balance: weigh the training loss by inverse class frequency to a power (see :mod:`imgtune.train.balance`):
            ``"mild"`` (0.25), ``True`` (1: each class counts alike), ``False`` (plain cross-entropy) or a number.
        tta: validate on the mean probabilities of each picture and its mirror image; the bundle's
            ``model.json`` then says ``"tta": "flip"`` and its predictors do the same.
        tune_stages: on a CPU, the body stages trained on cached activations after the head-only
            phase: ``"auto"`` (decided from the training split and this machine's speed), a count, or
            0 (the head only); see :mod:`imgtune.train.partial`. On a GPU or under torchrun: ignored.
            ``"auto"`` with ``epochs`` given is 0: the epochs then fine-tune the whole network, as asked
            (``tune_stages=N`` with ``epochs=E`` trains ``E`` partial epochs).
        resume: the folder of a run that stopped (killed, crashed): it goes on after the last epoch
            its ``checkpoint.pt`` saved (one is written after every epoch). ``data`` and the training
            options must be those the run started with (checked); on a CPU (``num_workers=0``) the
            result is bit for bit that of a run that never stopped (see :mod:`imgtune.train.checkpoint`).
        checkpoint_every: seconds between checkpoints at the least (the last epoch of each phase is always
            saved; 0: every epoch), so epochs of milliseconds on cached features are not each written.
        log: ``"tensorboard"`` also writes TensorBoard event files into the run folder (needs the
            ``tensorboard`` package: ``pip install 'imgtune[tensorboard]'``); see :mod:`imgtune.train.logs`.
        Other arguments: see :meth:`Learner.from_data`.

    Returns:
        A :class:`RunResult`. The folder holds ``model.safetensors``, ``model.json``,
        ``metrics.json``, ``summary.txt``, ``split.csv`` (the exact split), ``run.json`` (the files
        imgtune wrote), ``history.csv`` (one row per epoch), ``lr_find.csv`` when the lr finder ran
        and, with ``report``, ``report.html`` and its figures (``lr_find.png`` when the lr finder ran,
        ``training.png``, ``confusion_matrix.png``, ``top_losses.png``, ``samples.png``).
        Every file is written atomically; the checkpoint is removed once they are all there.
    """
    if (epochs is not None and epochs < 0) or (freeze_epochs is not None and freeze_epochs < 0) or (
        epochs == 0 and freeze_epochs == 0
    ):
        raise ImgtuneError("`epochs` and `freeze_epochs` must be >= 0 and not both 0")
    log = logs.check_log(log)  # a missing tensorboard package fails before the slow part
    if tune_stages == "auto" and epochs is not None:
        tune_stages = 0  # epochs asked for: the whole network's, not a partial phase's
    started = time.perf_counter()
    device = distributed.setup(device)  # under torchrun: join the other processes (once)
    main = distributed.is_main()
    options = run_options(data, arch=arch, epochs=epochs, freeze_epochs=freeze_epochs, lr=lr, weights=weights,
                          size=size, resize=resize, bs=bs, augment=augment, seed=seed, feature_cache=feature_cache,
                          accumulate=accumulate, sync_bn=sync_bn, balance=balance, tta=tta, tune_stages=tune_stages,
                          **data_options)
    state = _resume_state(resume, out, options)
    run_dir = Path(resume if resume is not None else out or default_run_dir(data if not isinstance(data, ImageData)
                                                                            else "data"))
    if main and state is None and out is not None:
        check_out(run_dir, overwrite=overwrite)  # fail before the slow part
    if not isinstance(data, ImageData):
        view = ImageView(size or get_backbone(arch).size, resize, cache_dir=cache_dir if cache else False)
        data = load_data(data, seed=seed, view=view if cache else None, **data_options)
    fingerprint = data_fingerprint(data)
    if state is not None:
        check_resume(state, options=options, data=fingerprint, where=run_dir)
    folder = None
    if main:
        folder = RunFolder.reopen(run_dir) if state else RunFolder.create(run_dir, unique=out is None,
                                                                          overwrite=overwrite)
        if progress:
            for line in data_warnings(data):
                print(line, file=sys.stderr, flush=True)
    run_dir = Path(_from_rank_zero(str(folder.path) if folder else str(run_dir)))
    data_seconds = time.perf_counter() - started
    learner = Learner.from_data(data, arch, weights=weights, size=size, resize=resize, bs=bs, augment=augment,
                                num_workers=num_workers, seed=seed, device=device, progress=progress,
                                feature_cache=feature_cache, cache=cache, cache_dir=cache_dir, accumulate=accumulate,
                                sync_bn=sync_bn, precision=precision, compile_model=compile_model, balance=balance,
                                tta=tta, tune_stages=tune_stages)
    finder, lr = _learning_rate(learner, lr, state)
    resumed = list((state or {}).get("run", {}).get("resumed", [])) + ([_position(state)] if state else [])
    if folder is not None:
        learner.callbacks += logs.run_logs(folder, log=log, lr_finder=finder)
        folder.record(CHECKPOINT_FILE)
    learner.callbacks.append(ResumeCheckpoint(run_dir / CHECKPOINT_FILE, learner.model, run=dict(
        options=options, data=fingerprint, command=(state or {}).get("run", {}).get("command") or command,
        resumed=resumed,
        lr_finder=dict(lrs=finder.lrs, losses=finder.losses, suggestion=finder.suggestion) if finder else None),
        every=checkpoint_every))
    learner.fine_tune(epochs, lr, freeze_epochs=freeze_epochs, resume=state)
    seconds = dict(data=data_seconds, **learner.timings)
    seconds["total"] = time.perf_counter() - started
    metrics = dict(run_metrics(learner, data, finder, seconds, command), resumed=resumed)
    if folder is not None:
        write_run_files(folder, learner, data, metrics)
    if report:
        _report_or_warn(learner, folder, metrics, finder)
    if folder is not None:
        folder.write("summary.txt", summary_text(metrics, learner.config, run_dir) + "\n")
        folder.forget(CHECKPOINT_FILE)  # the run is complete: nothing to resume
    return RunResult(run_dir, learner, metrics)


def run_options(data, **options) -> dict:
    """The options that decide what a run trains, as plain data: a checkpoint records them and a
    resume must repeat them (not those that change only speed or output: device, workers, cache,
    report). A folder or file is named by its absolute path."""
    source = "an ImageData" if isinstance(data, ImageData) else data
    values = dict(source=source, **options, world_size=distributed.world_size())
    return {key: _plain_option(value, path=key in _PATH_OPTIONS) for key, value in values.items()}


#: Options that may name a file or folder (recorded by absolute path, so a resume may start elsewhere).
_PATH_OPTIONS = ("source", "weights", "csv_path", "data_dir")


def _plain_option(value, *, path: bool = False):
    if isinstance(value, (list, tuple)):
        return [_plain_option(v) for v in value]
    if isinstance(value, Path) or (path and isinstance(value, str)):
        return str(Path(value).resolve()) if path and Path(value).exists() else str(value)
    return value


def _resume_state(resume, out, options: dict) -> dict | None:
    """The checkpoint to resume from (``None`` for a new run), its options checked against ``options``."""
    if resume is None:
        return None
    if out is not None and Path(out).resolve() != Path(resume).resolve():
        raise ImgtuneError(f"`resume={resume}` continues the run in that folder; leave out `out` ({out})")
    state = load_checkpoint(resume)
    check_resume(state, options=options, where=resume)  # the data is checked once it is loaded
    return state


def _position(state: dict) -> dict:
    """Where a checkpoint stood: phase and epoch (within the phase)."""
    return {key: state["position"][key] for key in ("phase", "epoch", "epochs")}


def _learning_rate(learner: Learner, lr, state: dict | None) -> tuple[LRFinderResult | None, object]:
    """The lr finder's result (``None`` when ``lr`` is given) and the rate to fine-tune with; on resume
    the finder's result the checkpoint recorded (the finder leaves no trace on the training)."""
    if lr is not None:
        return None, lr
    recorded = (state or {}).get("run", {}).get("lr_finder")
    finder = LRFinderResult(**recorded) if recorded else learner.lr_find()
    return finder, finder.suggested


def _from_rank_zero(value: str) -> str:
    """``value`` as rank 0 has it, on every process (the run folder's name, suffix included)."""
    if not distributed.is_initialized():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_metrics(learner: Learner, data: ImageData, finder: LRFinderResult | None, seconds: dict, command: str) -> dict:
    """What ``metrics.json`` records: final metrics (accuracy, the macro figures and each class's), history,
    learning rates, timings, data, versions."""
    final = learner.history[-1]
    probs, targets = learner.valid_preds if learner.valid_preds is not None else learner.get_preds()[:2]
    report = evaluate.class_report(probs, targets, learner.classes)
    return dict(
        valid_accuracy=final["accuracy"],
        error_rate=final["error_rate"],
        valid_loss=final["valid_loss"],
        **evaluate.macro_metrics(report),
        per_class=report[:-1],
        balance=float(learner.config.balance or 0),
        tta=learner.config.tta or evaluate.TTA_NONE,
        history=learner.history,
        lr=dict(learner.config["lr"], suggestion=finder.suggestion if finder else None,
                curve=dict(lrs=finder.lrs, losses=finder.losses) if finder else None),
        seconds=seconds,
        data=dict(description=data.description, classes=data.classes, counts=data.counts(),
                  train=len(data.train), valid=len(data.valid),
                  skipped=[{"path": str(s.path), "reason": s.reason} for s in data.skipped]),
        device=str(learner.device),
        cache=dict(features=learner.features.stats or None if learner.features is not None else None),
        tune_stages=_partial_metrics(learner),
        command=command,
        versions=versions(),
    )


def _partial_metrics(learner: Learner) -> dict:
    """What partial fine-tuning did (see :mod:`imgtune.train.partial`): the stages trained (0: none) and,
    when on, why, the split, the measured epoch time it was planned with and its cached maps."""
    plan = learner.features.partial if learner.features is not None else None
    if plan is None or not learner.config.tune_stages:
        return dict(stages=0, reason=learner.features.partial_reason if learner.features is not None else "")
    activations = learner.features.activations
    return dict(stages=plan.tune_stages, reason=plan.reason, planned_epoch_seconds=plan.epoch_seconds,
                activations=dict(activations.stats) if activations is not None else None)


METRICS_FILE, SUMMARY_FILE, SPLIT_FILE = "metrics.json", "summary.txt", "split.csv"
#: Skipped files listed by name on the terminal and in ``summary.txt`` (all of them are in ``metrics.json``).
SKIPPED_SHOWN = 20


def write_run_files(folder: RunFolder, learner: Learner, data: ImageData, metrics: dict) -> None:
    """The run's split and metrics, then its bundle: ``model.safetensors`` and, last, ``model.json``
    with the weights' SHA-256, so a crash at any point leaves no metadata beside other weights."""
    folder.write(SPLIT_FILE, split_csv(data))
    folder.write(METRICS_FILE, metrics_json(metrics))
    folder.record(WEIGHTS_FILE, META_FILE)
    learner.save(folder.path, metrics={k: metrics[k] for k in ("valid_accuracy", "error_rate", "valid_loss",
                                                                "balanced_accuracy", "macro_f1")})


def metrics_json(metrics: dict) -> str:
    """``metrics.json``'s text."""
    return json.dumps(metrics, indent=2, default=float) + "\n"


def _report_or_warn(learner: Learner, folder: RunFolder | None, metrics: dict, finder: LRFinderResult | None) -> None:
    """Write the report; one that fails (a figure matplotlib cannot draw, say) is a warning line and
    ``metrics["report_error"]``: the bundle and metrics are already saved. The files the report wrote
    are listed in the run's manifest."""
    started = time.perf_counter()
    before = _file_stamps(folder.path) if folder is not None else {}
    try:
        _report(learner, folder.path if folder is not None else None, metrics, finder)
    except Exception as error:  # noqa: BLE001 - whatever the report hits, the trained model stands
        metrics["report_error"] = describe(error, 200)
        if folder is not None:
            print(f"warning: report.html not written ({metrics['report_error']}); the model and metrics are saved",
                  file=sys.stderr, flush=True)
    finally:
        if folder is not None:
            after = _file_stamps(folder.path)
            folder.record(*sorted(name for name, stamp in after.items() if before.get(name) != stamp))
    metrics["seconds"]["report"] = time.perf_counter() - started
    if folder is not None:
        folder.write(METRICS_FILE, metrics_json(metrics))


def _file_stamps(path: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in path.iterdir() if p.is_file()}


def _report(learner: Learner, run_dir: Path | None, metrics: dict, finder: LRFinderResult | None) -> None:
    from imgtune.deploy.bundle import read_meta
    from imgtune.explain.interpret import Interpretation
    from imgtune.explain.report import write_report

    interp = Interpretation.from_learner(learner)  # every process: it gathers the validation set
    if not distributed.is_main():
        return
    write_report(run_dir, interp=interp, metrics=metrics, meta=read_meta(run_dir), train_dataset=learner.train_dl.dataset,
                 lr_finder=finder)


def split_csv(data: ImageData) -> str:
    """The exact train/valid split of a run as CSV text that ``--csv`` and ``imgtune.load_data`` accept
    (absolute file paths), so the run's validation set can be rebuilt later."""
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["file", "label", "split"])
    for split, items in (("train", data.train), ("valid", data.valid)):
        for item in items:
            writer.writerow([str(Path(item.path).resolve()), item.label, split])
    return text.getvalue()


def write_split(data: ImageData, path: Path) -> None:
    """Write :func:`split_csv` to ``path``, atomically."""
    atomic_write(path, split_csv(data))


def data_warnings(data: ImageData) -> list[str]:
    """A warning line per class folder that held no images (and so is no class)."""
    return [f"warning: class folder {s.path} has no images: ignored" for s in data.skipped
            if s.reason == EMPTY_CLASS_FOLDER]


def skipped_lines(skipped: Sequence[dict]) -> list[str]:
    """The first :data:`SKIPPED_SHOWN` skipped files with their reasons, then how many more."""
    lines = [f"  skipped {s['path']}: {s['reason']}" for s in skipped[:SKIPPED_SHOWN]]
    if len(skipped) > SKIPPED_SHOWN:
        lines.append(f"  ... and {len(skipped) - SKIPPED_SHOWN} more (see metrics.json)")
    return lines


def _global_batch(config: dict) -> str:
    """`` (x 2 processes x 4 accumulated = 256)`` when a step sees more than one batch, else nothing."""
    world, accumulate = config.get("world_size", 1), config.get("accumulate", 1)
    if world * accumulate == 1:
        return ""
    parts = (f" x {world} processes" if world > 1 else "") + (f" x {accumulate} accumulated" if accumulate > 1 else "")
    return f"{parts} = {config['bs'] * world * accumulate}"


def summary_text(metrics: dict, config: dict, run_dir: Path) -> str:
    """A short human summary of a run."""
    data = metrics["data"]
    lines = [
        f"imgtune run {run_dir}",
        f"data: {data['description']}: {len(data['classes'])} classes, {data['train']} train / {data['valid']} valid"
        f" images, {len(data['skipped'])} skipped",
        *skipped_lines(data["skipped"]),
        f"model: {config['arch']} ({config['timm_name']}, weights {config['weights']}), {config['size']}px"
        f" {config['resize']}, batch {config['bs']}{_global_batch(config)}, device {metrics['device']}",
        f"lr: head {config['lr']['frozen']:.3g} frozen; {config['lr']['unfrozen'][0]:.3g}..{config['lr']['unfrozen'][1]:.3g}"
        " unfrozen",
        *([f"loss: {describe_loss(metrics['balance'])}"] if metrics.get("balance") else []),
        *([f"partial fine-tuning: the body's last {metrics['tune_stages']['stages']} stages on cached activations"
           f" ({metrics['tune_stages']['reason']})"] if metrics.get("tune_stages", {}).get("stages") else []),
        *([f"validation with test-time augmentation: {metrics['tta']}"] if metrics.get("tta", "none") != "none"
          else []),
        "epoch  phase     train_loss  valid_loss  accuracy  balanced  seconds",
    ]
    for m in metrics["history"]:
        balanced = f"{100 * m['balanced_accuracy']:>7.2f}%" if "balanced_accuracy" in m else f"{'-':>8}"
        lines.append(f"{m['epoch']:>5}  {m['phase']:<8}  {m['train_loss']:>10.4f}  {m['valid_loss']:>10.4f}"
                     f"  {100 * m['accuracy']:>7.2f}%  {balanced}  {m['seconds']:>7.1f}")
    for where in metrics.get("resumed", []):
        lines.append(f"resumed after {where['phase']} epoch {where['epoch']}/{where['epochs']} (from its checkpoint)")
    timing = ", ".join(f"{k} {v:.1f}s" for k, v in metrics["seconds"].items())
    if metrics.get("report_error"):
        lines.append(f"warning: report.html not written ({metrics['report_error']})")
    lines += [
        f"validation accuracy {100 * metrics['valid_accuracy']:.2f}% (error rate {100 * metrics['error_rate']:.2f}%)",
        *evaluate.class_lines(metrics),
        f"time: {timing}",
    ]
    return "\n".join(lines)
