"""Figures of a run (matplotlib, PNG, headless) and the self-contained HTML report."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: figures are files or bytes, never windows
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

REPORT_FILE = "report.html"


def _save(fig, path: str | Path | None) -> bytes:
    """Write the figure to ``path`` (when given) and return its PNG bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    data = buffer.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data


def plot_lr_find(result, path: str | Path | None = None) -> bytes:
    """The lr-finder curve (raw and smoothed loss against a log-scale learning rate), suggestion marked."""
    from imgtune.train.schedule import LR_FIND_BETA, smooth_losses

    smooth = smooth_losses(result.losses, beta=LR_FIND_BETA, centered=True)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(result.lrs, result.losses, color="0.75", linewidth=1, label="loss")
    ax.plot(result.lrs, smooth, color="C0", linewidth=2, label="smoothed")
    for key, color in (("suggested", "C3"), ("minimum", "C1"), ("steepest", "C2")):
        if key in result.suggestion:
            value = result.suggestion[key]
            ax.axvline(value, color=color, linestyle="--", label=f"{key} {value:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_ylim(min(smooth) - 0.1 * abs(min(smooth)), max(smooth[: max(3, len(smooth) // 4)]) * 1.5)
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_training(history: Sequence[dict], path: str | Path | None = None) -> bytes:
    """Train/valid loss and accuracy per epoch, with the frozen -> unfrozen boundary marked."""
    x = np.arange(1, len(history) + 1)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
    ax_loss.plot(x, [h["train_loss"] for h in history], "o-", label="train loss")
    ax_loss.plot(x, [h["valid_loss"] for h in history], "o-", label="valid loss")
    ax_acc.plot(x, [100 * h["accuracy"] for h in history], "o-", color="C2", label="valid accuracy")
    boundaries = [i + 0.5 for i in range(1, len(history)) if history[i]["phase"] != history[i - 1]["phase"]]
    for ax in (ax_loss, ax_acc):
        for b in boundaries:
            ax.axvline(b, color="0.4", linestyle=":", label="unfrozen from here")
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        ax.legend()
    ax_loss.set_ylabel("loss")
    ax_acc.set_ylabel("accuracy (%)")
    fig.tight_layout()
    return _save(fig, path)


def plot_confusion_matrix(matrix: np.ndarray, classes: Sequence[str], path: str | Path | None = None) -> bytes:
    """The confusion matrix (rows actual, columns predicted), sized so 37 class names stay readable."""
    n = len(classes)
    side = max(4.5, 0.32 * n + 2.5)
    font = 10 if n <= 12 else 7 if n <= 40 else 5
    fig, ax = plt.subplots(figsize=(side, side), dpi=100)
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=90, fontsize=font)
    ax.set_yticks(range(n), classes, fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    top = matrix.max() if matrix.size else 0
    for i in range(n):
        for j in range(n):
            if matrix[i, j]:
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=font,
                        color="white" if matrix[i, j] > top / 2 else "black")
    fig.tight_layout()
    return _save(fig, path)


def plot_top_losses(interp, k: int = 9, path: str | Path | None = None, *, columns: int = 3) -> bytes:
    """The ``k`` worst validation images: each as the model saw it and with its Grad-CAM overlay,
    titled actual / predicted / loss / probability."""
    items = interp.top_losses(k)
    rows = max(1, -(-len(items) // columns))
    fig, axes = plt.subplots(rows, 2 * columns, figsize=(4 * columns, 2.3 * rows), dpi=100, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for n, item in enumerate(items):
        x = interp.input_tensor(interp.paths[item.index])  # decoded once for all three uses
        heatmap = interp.grad_cam(x, interp.classes.index(item.predicted))
        left, right = axes[n // columns, 2 * (n % columns)], axes[n // columns, 2 * (n % columns) + 1]
        left.imshow(interp.model_view(x))
        right.imshow(interp.overlay(x, heatmap))
        left.set_title(f"{item.actual} / {item.predicted}", fontsize=8)
        right.set_title(f"loss {item.loss:.2f}, p {item.probability:.2f}", fontsize=8)
    fig.suptitle("top losses: actual / predicted (left), Grad-CAM for the prediction (right)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_samples(dataset, classes: Sequence[str], mean, std, path: str | Path | None = None, *, n: int = 12,
                 seed: int = 0) -> bytes:
    """``n`` training images as the model sees them: augmented, then de-normalised for display."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    picks = torch.randperm(len(dataset), generator=generator)[:n].tolist()
    columns = min(6, max(1, len(picks)))
    rows = max(1, -(-len(picks) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2 * columns, 2.2 * rows), dpi=100, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, index in zip(axes.flat, picks):
        tensor, label = dataset[index]
        ax.imshow(denormalise(tensor, mean, std))
        ax.set_title(classes[label], fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def denormalise(tensor, mean, std) -> np.ndarray:
    """A normalised CHW tensor back to an HxWx3 uint8 picture."""
    array = tensor.detach().float().cpu().numpy().transpose(1, 2, 0)
    array = array * np.asarray(std, dtype=np.float32) + np.asarray(mean, dtype=np.float32)
    return (np.clip(array, 0, 1) * 255).round().astype(np.uint8)


# --- the HTML page ------------------------------------------------------------------------------------

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1000px;
padding:12px;color:#222;line-height:1.45}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:1.6em}
img{max-width:100%;height:auto;display:block;margin:8px 0}
.scroll{overflow-x:auto}table{border-collapse:collapse;font-size:.9em;margin:6px 0}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left}th{background:#f4f4f4}td.n{text-align:right}
.big{font-size:1.6em;font-weight:600}code,pre{background:#f6f6f6;padding:2px 4px;white-space:pre-wrap;
word-break:break-all}
"""


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in rows)
    return f'<div class="scroll"><table><tr>{head}</tr>{body}</table></div>'


def _cell(value) -> str:
    numeric = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    return f'<td class="n">{html.escape(_fmt(value))}</td>' if numeric else f"<td>{html.escape(_fmt(value))}</td>"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-3 and value else f"{value:.3f}".rstrip("0").rstrip(".")
    return str(value)


def _img(png: bytes | None, alt: str) -> str:
    if not png:
        return f"<p>({html.escape(alt)}: not available for this run)</p>"
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def report_sections(*, interp, metrics: dict, meta: dict, figures: dict[str, bytes | None], k: int = 9) -> list[str]:
    """The report's sections as HTML fragments, in order."""
    data = metrics.get("data", {})
    counts = data.get("counts", {})
    skipped = data.get("skipped", [])
    seconds = metrics.get("seconds", {})
    history = metrics.get("history", [])
    accuracy = interp.accuracy
    sections = [
        "<h2>Result</h2>"
        f'<p class="big">{100 * accuracy:.2f}% validation accuracy</p>'
        f"<p>error rate {100 * (1 - accuracy):.2f}% on {len(interp.targets)} validation images; model "
        f"<code>{html.escape(str(meta.get('arch')))}</code> ({html.escape(str(meta.get('timm_name')))}), "
        f"{meta.get('size')} px {html.escape(str(meta.get('resize')))}, device "
        f"{html.escape(str(metrics.get('device', '?')))}</p>",
        "<h2>Data</h2>"
        f"<p>{html.escape(str(data.get('description', '')))}: {len(interp.classes)} classes, "
        f"{data.get('train', '?')} train / {data.get('valid', len(interp.targets))} valid images, "
        f"{len(skipped)} skipped.</p>"
        + _table(["class", "train", "valid"], [[c, v.get("train", 0), v.get("valid", 0)] for c, v in counts.items()])
        + (("<p>Skipped files:</p>" + _table(["file", "reason"], [[s["path"], s["reason"]] for s in skipped[:200]]))
           if skipped else ""),
        "<h2>Training images as the model sees them</h2>" + _img(figures.get("samples"), "augmented training images"),
        "<h2>Learning-rate finder</h2>" + _img(figures.get("lr_find"), "lr finder curve")
        + (f"<p>learning rate used: {metrics['lr']['frozen']:.3g} for the head while frozen; "
           f"{metrics['lr']['unfrozen'][0]:.3g} (first layers) .. {metrics['lr']['unfrozen'][1]:.3g} (head) "
           "once unfrozen</p>" if metrics.get("lr") else ""),
        "<h2>Training</h2>" + _img(figures.get("training"), "training curves")
        + _table(["epoch", "phase", "train loss", "valid loss", "accuracy", "seconds"],
                 [[h["epoch"], h["phase"], h["train_loss"], h["valid_loss"], f"{100 * h['accuracy']:.2f}%",
                   round(h["seconds"], 1)] for h in history]),
        "<h2>Per class</h2>"
        + _table(["class", "precision", "recall", "F1", "support"],
                 [[r["class"], r["precision"], r["recall"], r["f1"], r["support"]]
                  for r in interp.classification_report()]),
        "<h2>Confusion matrix</h2>" + _img(figures.get("confusion"), "confusion matrix"),
        "<h2>Most confused</h2>"
        + (_table(["actual", "predicted", "count"], interp.most_confused()[:30]) if interp.most_confused()
           else "<p>No validation image was misclassified.</p>"),
        "<h2>Top losses, with Grad-CAM</h2>"
        "<p>The validation images the model got most wrong (or right with the least confidence), and where "
        "it looked for its prediction (red: most weight).</p>"
        + _img(figures.get("top_losses"), "top losses with Grad-CAM")
        + _table(["file", "actual", "predicted", "probability", "loss"],
                 [[Path(t.path).name if t.path else t.index, t.actual, t.predicted, t.probability, t.loss]
                  for t in interp.top_losses(k)]),
        "<h2>Time</h2>" + _table(["phase", "seconds"], [[k_, round(v, 1)] for k_, v in seconds.items()]),
        "<h2>Command and versions</h2>"
        f"<pre>{html.escape(metrics.get('command') or '(Python API)')}</pre>"
        + _table(["package", "version"], sorted((metrics.get("versions") or meta.get("versions") or {}).items())),
    ]
    return sections


def write_report(run_dir: str | Path, *, interp, metrics: dict, meta: dict, train_dataset=None, k: int = 9) -> Path:
    """Write ``report.html`` (and the figures as PNG files) into ``run_dir``; returns the report's path.

    The page embeds every figure as a data URI and uses no script, external style or font, so it
    opens from disk, offline, and can be mailed as one file.
    """
    from imgtune.train.learner import LRFinderResult

    run_dir = Path(run_dir)
    figures: dict[str, bytes | None] = {}
    curve = (metrics.get("lr") or {}).get("curve")
    if curve:
        finder = LRFinderResult(curve["lrs"], curve["losses"], metrics["lr"].get("suggestion") or {})
        figures["lr_find"] = plot_lr_find(finder, run_dir / "lr_find.png")
    if metrics.get("history"):
        figures["training"] = plot_training(metrics["history"], run_dir / "training.png")
    figures["confusion"] = plot_confusion_matrix(interp.confusion_matrix(), interp.classes,
                                                 run_dir / "confusion_matrix.png")
    if interp.paths:  # the images are needed to draw them
        figures["top_losses"] = plot_top_losses(interp, k, run_dir / "top_losses.png")
    if train_dataset is not None and len(train_dataset):
        figures["samples"] = plot_samples(train_dataset, interp.classes, meta["mean"], meta["std"],
                                          run_dir / "samples.png")
    body = "\n".join(report_sections(interp=interp, metrics=metrics, meta=meta, figures=figures, k=k))
    title = f"imgtune run {run_dir.name}"
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n"
    )
    path = run_dir / REPORT_FILE
    path.write_text(page, encoding="utf-8")
    return path
