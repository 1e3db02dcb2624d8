"""The run report: one self-contained HTML page (``report.html``) with the figures beside it as PNG files.

The page comes from the Jinja2 template ``templates/report.html`` (package data) with autoescape on;
this module draws the figures (:mod:`imgtune.explain.figures`) and turns a run's metrics into the
plain values and table rows the template lays out.
"""

from __future__ import annotations

import base64
from functools import lru_cache
from pathlib import Path

import jinja2
import numpy as np

from imgtune.explain.figures import figure_png, plot_confusion_matrix, plot_samples, plot_top_losses, plot_training
from imgtune.files import atomic_write

REPORT_FILE = "report.html"
TEMPLATE = "report.html"


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    """The Jinja2 environment of the explain templates: package data, autoescape on, undefined names fail."""
    env = jinja2.Environment(loader=jinja2.PackageLoader("imgtune.explain", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True)
    env.filters["fmt"] = _fmt
    env.filters["png_data_uri"] = lambda png: "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    env.tests["numeric"] = _numeric
    return env


def write_report(run_dir: str | Path, *, interp, metrics: dict, meta: dict, train_dataset=None, k: int = 9,
                 lr_finder=None) -> Path:
    """Write ``report.html`` and the figures as PNG files into ``run_dir``.

    The page embeds every figure as a data URI and uses no script, external style or font, so it
    opens from disk, offline, and can be mailed as one file.

    Args:
        run_dir: the run folder.
        interp: the :class:`~imgtune.explain.interpret.Interpretation` of the validation set.
        metrics: the run's ``metrics.json`` (``data``, ``history``, ``lr``, ``seconds``, ``command``,
            ``versions``, ``device``); missing keys leave their part of the page out or empty.
        meta: the bundle's ``model.json`` (``arch``, ``timm_name``, ``size``, ``resize``, ``mean``, ``std``).
        train_dataset: the augmented training set, for the figure of samples; ``None`` leaves it out.
        k: how many top losses to show.
        lr_finder: anything with a ``plot()`` method returning a matplotlib figure (the lr-finder
            curve, e.g. ``imgtune.train.lr_find.LRFinderResult``); ``None`` leaves the curve out.

    Returns:
        The path of ``report.html``.
    """
    run_dir = Path(run_dir)
    figures: dict[str, bytes] = {}
    if lr_finder is not None:
        figures["lr_find"] = figure_png(lr_finder.plot(), run_dir / "lr_find.png")
    if metrics.get("history"):
        figures["training"] = figure_png(plot_training(metrics["history"]), run_dir / "training.png")
    figures["confusion"] = figure_png(plot_confusion_matrix(interp.confusion_matrix(), interp.classes),
                                      run_dir / "confusion_matrix.png")
    if interp.paths:  # the images are needed to draw them
        figures["top_losses"] = figure_png(plot_top_losses(interp, k), run_dir / "top_losses.png")
    if train_dataset is not None and len(train_dataset):
        figures["samples"] = figure_png(plot_samples(train_dataset, interp.classes, meta["mean"], meta["std"]),
                                        run_dir / "samples.png")
    page = render_report(title=f"imgtune run {run_dir.name}", interp=interp, metrics=metrics, meta=meta,
                         figures=figures, k=k)
    path = run_dir / REPORT_FILE
    atomic_write(path, page)  # UTF-8
    return path


def render_report(*, title: str, interp, metrics: dict, meta: dict, figures: dict[str, bytes], k: int = 9) -> str:
    """The report page as HTML text.

    Args:
        title: the page's title and heading.
        interp: as for :func:`write_report`.
        metrics: as for :func:`write_report`.
        meta: as for :func:`write_report`.
        figures: PNG bytes by name (``samples``, ``lr_find``, ``training``, ``confusion``,
            ``top_losses``); a missing one is said to be not available.
        k: how many top losses to list.

    Returns:
        The whole page.
    """
    return environment().get_template(TEMPLATE).render(title=title, figures=figures,
                                                       **report_values(interp=interp, metrics=metrics, meta=meta, k=k))


def report_values(*, interp, metrics: dict, meta: dict, k: int = 9) -> dict:
    """The values and table rows (lists of cells) that the report template shows, by name."""
    data = metrics.get("data", {})
    skipped = data.get("skipped", [])
    report = interp.classification_report()
    return dict(
        accuracy=interp.accuracy, **class_values(report), n_valid=len(interp.targets), arch=meta.get("arch"),
        timm_name=meta.get("timm_name"), balance=float((meta.get("training") or {}).get("balance") or 0),
        tta=meta.get("tta", "none"),
        size=meta.get("size"), resize=meta.get("resize"), device=metrics.get("device", "?"),
        description=data.get("description", ""), n_classes=len(interp.classes), n_train=data.get("train", "?"),
        n_valid_data=data.get("valid", len(interp.targets)), n_skipped=len(skipped),
        counts=[[c, v.get("train", 0), v.get("valid", 0)] for c, v in data.get("counts", {}).items()],
        skipped=[[s["path"], s["reason"]] for s in skipped[:200]],
        lr=metrics.get("lr"),
        history=[[h["epoch"], h["phase"], h["train_loss"], h["valid_loss"], f"{100 * h['accuracy']:.2f}%",
                  _percent(h.get("balanced_accuracy")), round(h["seconds"], 1)] for h in metrics.get("history", [])],
        per_class=[[r["class"], r["precision"], r["recall"], r["f1"], r["support"]] for r in report],
        confused=interp.most_confused()[:30],
        top_losses=[[Path(t.path).name if t.path else t.index, t.actual, t.predicted, t.probability, t.loss]
                    for t in interp.top_losses(k)],
        seconds=[[phase, round(s, 1)] for phase, s in metrics.get("seconds", {}).items()],
        command=metrics.get("command") or "(Python API)",
        versions=sorted((metrics.get("versions") or meta.get("versions") or {}).items()),
    )


def class_values(report: list[dict]) -> dict:
    """The macro figures of a classification report (:meth:`Interpretation.classification_report`'s rows).

    Returns:
        ``balanced_accuracy``: the mean recall of the classes with validation items (as
        :func:`imgtune.train.evaluate.macro_metrics`); ``macro_f1``: the report's macro F1;
        ``missed``: the classes with validation items of which none was recognised (recall 0).
    """
    rows = [row for row in report[:-1] if row["support"]]
    return dict(balanced_accuracy=sum(row["recall"] for row in rows) / len(rows) if rows else 0.0,
                macro_f1=report[-1]["f1"], missed=[row["class"] for row in rows if row["recall"] == 0])


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _numeric(value) -> bool:
    """A number (not a bool): its table cell is right-aligned."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _fmt(value) -> str:
    """A table cell's text: floats to 3 decimals (trailing zeros dropped), tiny ones to 4 significant digits."""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-3 and value else f"{value:.3f}".rstrip("0").rstrip(".")
    return str(value)
