"""A training run: find the data, fine-tune, and write the run folder (bundle, metrics, summary, lr curve)."""

from __future__ import annotations

import csv
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from imgtune.data.loaders import ImageData, load_data
from imgtune.data.presize import ImageView
from imgtune.deploy.bundle import versions
from imgtune.errors import ImgtuneError
from imgtune.models import DEFAULT_ARCH, IMAGENET, get_backbone
from imgtune.train import distributed
from imgtune.train.learner import Learner
from imgtune.train.lr_find import LRFinderResult


@dataclass
class RunResult:
    """What :func:`train` produced: the run folder, the learner and the metrics written to ``metrics.json``."""

    run_dir: Path
    learner: Learner
    metrics: dict


def default_run_dir(source, *, root: str | Path = "runs") -> Path:
    """``runs/<data name>-<YYYYmmdd-HHMMSS>``."""
    name = Path(str(source)).name if source is not None else "elpv"
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "data"
    return Path(root) / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"


def prepare_out(out: str | Path, *, overwrite: bool = False, create: bool = True) -> Path:
    """Make sure writing to ``out`` destroys nothing: it must be new or empty unless ``overwrite``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ImgtuneError(f"{out}: exists and is not a folder; choose another `out`")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ImgtuneError(f"{out}: folder exists and is not empty; choose another `out` or pass `overwrite=True`")
    if create:
        out.mkdir(parents=True, exist_ok=True)
    return out


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
    bs: int = 32,
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
    **data_options,
) -> RunResult:
    """Fine-tune ``arch`` on ``data`` with the lesson's recipe and write a run folder.

    Args:
        data: an :class:`ImageData`, or a source for :func:`imgtune.load_data` (with
            ``data_options`` such as ``label_re``, ``csv_path``, ``valid_pct``, ``stratify``).
        epochs, freeze_epochs, lr: see :meth:`Learner.fine_tune` (``None``: automatic epochs, and
            the lr finder for the rate).
        out: the run folder (default ``runs/<data>-<timestamp>``); must be new or empty unless
            ``overwrite``.
        report: write ``report.html`` (interpretation, figures) into the run folder.
        command: the command line, recorded in ``metrics.json``.
        feature_cache, cache, cache_dir: see :meth:`Learner.from_data`; with ``cache`` the images are
            checked through the presize cache, so a second run decodes nothing.
        accumulate, sync_bn: see :class:`Learner`. Under torchrun every process calls this: it joins
            the process group (:func:`imgtune.train.distributed.setup`), ``bs`` is per process, and only
            rank 0 writes the run folder.
        Other arguments: see :meth:`Learner.from_data`.

    Returns:
        A :class:`RunResult`. The folder holds ``model.safetensors``, ``model.json``,
        ``metrics.json``, ``summary.txt``, ``split.csv`` (the exact split) and, with ``report``,
        ``report.html`` and its figures (``lr_find.png`` when the lr finder ran, ``training.png``,
        ``confusion_matrix.png``, ``top_losses.png``, ``samples.png``).
    """
    if (epochs is not None and epochs < 0) or (freeze_epochs is not None and freeze_epochs < 0) or (
        epochs == 0 and freeze_epochs == 0
    ):
        raise ImgtuneError("`epochs` and `freeze_epochs` must be >= 0 and not both 0")
    started = time.perf_counter()
    device = distributed.setup(device)  # under torchrun: join the other processes (once)
    main = distributed.is_main()
    source = data
    run_dir = out or default_run_dir(source if not isinstance(data, ImageData) else "data")
    if main:
        prepare_out(run_dir, overwrite=overwrite, create=False)  # fail before the slow part
    if not isinstance(data, ImageData):
        view = ImageView(size or get_backbone(arch).size, resize, cache_dir=cache_dir if cache else False)
        data = load_data(data, seed=seed, view=view if cache else None, **data_options)
    run_dir = prepare_out(run_dir, overwrite=overwrite) if main else Path(run_dir)
    data_seconds = time.perf_counter() - started
    learner = Learner.from_data(data, arch, weights=weights, size=size, resize=resize, bs=bs, augment=augment,
                                num_workers=num_workers, seed=seed, device=device, progress=progress,
                                feature_cache=feature_cache, cache=cache, cache_dir=cache_dir, accumulate=accumulate,
                                sync_bn=sync_bn)
    finder = None
    if lr is None:
        finder = learner.lr_find()
        lr = finder.suggested
    learner.fine_tune(epochs, lr, freeze_epochs=freeze_epochs)
    seconds = dict(data=data_seconds, **learner.timings)
    seconds["total"] = time.perf_counter() - started
    metrics = run_metrics(learner, data, finder, seconds, command)
    if main:
        learner.save(run_dir, metrics={k: metrics[k] for k in ("valid_accuracy", "error_rate", "valid_loss")})
        write_json(run_dir / "metrics.json", metrics)
        write_split(data, run_dir / SPLIT_FILE)
    if report:
        started_report = time.perf_counter()
        _report(learner, run_dir, metrics, finder)
        metrics["seconds"]["report"] = time.perf_counter() - started_report
        if main:
            write_json(run_dir / "metrics.json", metrics)
    if main:
        (run_dir / "summary.txt").write_text(summary_text(metrics, learner.config, run_dir) + "\n")
    return RunResult(run_dir, learner, metrics)


def run_metrics(learner: Learner, data: ImageData, finder: LRFinderResult | None, seconds: dict, command: str) -> dict:
    """What ``metrics.json`` records: final metrics, history, learning rates, timings, data, versions."""
    final = learner.history[-1]
    return dict(
        valid_accuracy=final["accuracy"],
        error_rate=final["error_rate"],
        valid_loss=final["valid_loss"],
        history=learner.history,
        lr=dict(learner.config["lr"], suggestion=finder.suggestion if finder else None,
                curve=dict(lrs=finder.lrs, losses=finder.losses) if finder else None),
        seconds=seconds,
        data=dict(description=data.description, classes=data.classes, counts=data.counts(),
                  train=len(data.train), valid=len(data.valid),
                  skipped=[{"path": str(s.path), "reason": s.reason} for s in data.skipped]),
        device=str(learner.device),
        cache=dict(features=learner.features.stats or None if learner.features is not None else None),
        command=command,
        versions=versions(),
    )


def write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, default=float) + "\n")


def _report(learner: Learner, run_dir: Path, metrics: dict, finder: LRFinderResult | None) -> None:
    from imgtune.deploy.bundle import read_meta
    from imgtune.explain.interpret import Interpretation
    from imgtune.explain.report import write_report

    interp = Interpretation.from_learner(learner)  # every process: it gathers the validation set
    if not distributed.is_main():
        return
    write_report(run_dir, interp=interp, metrics=metrics, meta=read_meta(run_dir), train_dataset=learner.train_dl.dataset,
                 lr_finder=finder)


SPLIT_FILE = "split.csv"


def write_split(data: ImageData, path: Path) -> None:
    """The exact train/valid split of a run, as a CSV that ``--csv`` and ``imgtune.load_data`` accept
    (absolute file paths), so the run's validation set can be rebuilt later."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "label", "split"])
        for split, items in (("train", data.train), ("valid", data.valid)):
            for item in items:
                writer.writerow([str(Path(item.path).resolve()), item.label, split])


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
        f"model: {config['arch']} ({config['timm_name']}, weights {config['weights']}), {config['size']}px"
        f" {config['resize']}, batch {config['bs']}{_global_batch(config)}, device {metrics['device']}",
        f"lr: head {config['lr']['frozen']:.3g} frozen; {config['lr']['unfrozen'][0]:.3g}..{config['lr']['unfrozen'][1]:.3g}"
        " unfrozen",
        "epoch  phase     train_loss  valid_loss  accuracy  seconds",
    ]
    for m in metrics["history"]:
        lines.append(f"{m['epoch']:>5}  {m['phase']:<8}  {m['train_loss']:>10.4f}  {m['valid_loss']:>10.4f}"
                     f"  {100 * m['accuracy']:>7.2f}%  {m['seconds']:>7.1f}")
    timing = ", ".join(f"{k} {v:.1f}s" for k, v in metrics["seconds"].items())
    lines += [
        f"validation accuracy {100 * metrics['valid_accuracy']:.2f}% (error rate {100 * metrics['error_rate']:.2f}%)",
        f"time: {timing}",
    ]
    return "\n".join(lines)
