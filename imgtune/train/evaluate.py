"""Evaluation: a model's predictions over a loader, put back together across processes, and their metrics.

With test-time augmentation (``tta=True``) each validation picture is predicted twice, as it is and as its
mirror image, and the two softmax probabilities are averaged (probabilities, not logits: the averaged
values are again probabilities, and a bundle's predictors average them the same way). On image batches
the mirror is the batch flipped left to right; on cached features the dataset yields both views
(:class:`imgtune.train.features.FeatureDataset` with ``all_views``), computed once with the cache.

The metrics beside accuracy treat every class alike, so that a class the model never predicts shows.
They come from :meth:`imgtune.explain.interpret.Interpretation.classification_report`'s rows: balanced
accuracy is the mean recall of the classes that have validation items (scikit-learn's
``balanced_accuracy_score``), macro F1 the report's macro average (over the classes that occur as actual
or predicted).
"""

from __future__ import annotations

import torch
from torch import nn

from imgtune.errors import ImgtuneError
from imgtune.explain.interpret import Interpretation
from imgtune.train import distributed
from imgtune.train.device import Precision, to_device

#: The test-time augmentations, as ``model.json``'s ``tta`` records them.
TTA_NONE, TTA_FLIP = "none", "flip"


@torch.no_grad()
def predict(model: nn.Module, dl, *, device: torch.device, memory_format: torch.memory_format,
            precision: Precision, normalize=None, tta: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Probabilities, targets and per-item losses of ``model`` (put in eval mode) over ``dl``.

    Under torchrun each process predicts its shard of ``dl``; the results are gathered back into
    dataset order on every process (see :func:`imgtune.train.distributed.gather_by_index`). The
    batches are copied without waiting (from pinned memory) and the results stay on the device until
    the end, so the CPU queues the next batch while the GPU computes this one. ``normalize``: as for
    :func:`imgtune.train.device.to_device`. ``tta``: average the probabilities of each picture and its
    mirror image (see the module's docstring); the loss is then the cross-entropy of the average.

    Returns:
        ``(probs (N, C), targets (N,), losses (N,))`` on the CPU.
    """
    model.eval()
    stacked_views = tta and getattr(dl.dataset, "all_views", False)
    probs, targets, losses = [], [], []
    for xb, yb in dl:
        xb, yb = to_device(xb, device, memory_format, normalize), yb.to(device, non_blocking=True)
        with precision.autocast():
            if stacked_views:  # (B, views, features)
                logits = [model(view).float() for view in xb.unbind(1)]
            elif tta:
                logits = [model(xb).float(), model(_mirror(xb)).float()]
            else:
                logits = [model(xb).float()]
        if len(logits) == 1:
            probs.append(logits[0].softmax(1))
            losses.append(nn.functional.cross_entropy(logits[0], yb, reduction="none"))
        else:
            # The mean of the views' softmax, its log from log-softmax (exact, without log(0)).
            log_probs = torch.logsumexp(torch.stack([l.log_softmax(1) for l in logits]), 0) - torch.log(
                torch.tensor(float(len(logits)), device=yb.device))
            probs.append(log_probs.exp())
            losses.append(nn.functional.nll_loss(log_probs, yb, reduction="none"))
        targets.append(yb)
    results = [torch.cat(parts).cpu() for parts in (probs, targets, losses)]
    return distributed.gather_by_index(dl, *results)


def _mirror(xb: torch.Tensor) -> torch.Tensor:
    """The batch of pictures (N, C, H, W) flipped left to right."""
    if xb.dim() != 4:
        raise ImgtuneError(f"test-time augmentation flips picture batches (N, C, H, W), not shape {tuple(xb.shape)}; "
                           "for cached features use a dataset that yields both views (FeatureDataset all_views)")
    return xb.flip(3)


def metrics(probs: torch.Tensor, targets: torch.Tensor, losses: torch.Tensor) -> dict[str, float]:
    """``valid_loss`` (the mean loss), ``accuracy``, ``error_rate``, ``balanced_accuracy`` (the macro
    recall) and ``macro_f1`` of predictions (computed every epoch: a confusion matrix, no more)."""
    accuracy = (probs.argmax(1) == targets).float().mean().item()
    return dict(valid_loss=losses.mean().item(), accuracy=accuracy, error_rate=1.0 - accuracy,
                **macro_metrics(class_report(probs, targets)))


def macro_metrics(report: list[dict]) -> dict[str, float]:
    """``balanced_accuracy`` and ``macro_f1`` of a :func:`class_report` (see the module's docstring)."""
    recalls = [row["recall"] for row in report[:-1] if row["support"]]
    return dict(balanced_accuracy=sum(recalls) / len(recalls) if recalls else 0.0, macro_f1=report[-1]["f1"])


def class_report(probs: torch.Tensor, targets: torch.Tensor, classes=None) -> list[dict]:
    """Precision, recall, F1 and support of each class, then the ``"macro avg"`` row (see
    :meth:`imgtune.explain.interpret.Interpretation.classification_report`).

    Args:
        probs: ``(N, C)`` probabilities (or scores: only their argmax counts).
        targets: ``(N,)`` class indices.
        classes: the ``C`` class names (default ``"0"``, ``"1"``, ...).
    """
    classes = list(classes) if classes is not None else [str(c) for c in range(probs.shape[1])]
    interp = Interpretation(classes, probs.float().numpy(), targets.numpy(), losses=torch.zeros(len(targets)).numpy())
    return interp.classification_report()


def class_lines(metrics: dict) -> list[str]:
    """``summary.txt``'s macro figures and a line per class (precision, recall, F1, support), from a run's
    metrics (see :func:`imgtune.train.run.run_metrics`); none when they lack ``per_class``."""
    if "per_class" not in metrics:
        return []
    width = max([5, *(len(row["class"]) for row in metrics["per_class"])])
    lines = [f"balanced accuracy {100 * metrics['balanced_accuracy']:.2f}% (mean recall per class), "
             f"macro F1 {metrics['macro_f1']:.3f}",
             f"{'class':<{width}}  precision  recall     F1  support"]
    for row in metrics["per_class"]:
        lines.append(f"{row['class']:<{width}}  {row['precision']:>9.3f}  {row['recall']:>6.3f}  {row['f1']:>5.3f}"
                     f"  {row['support']:>7}")
    return lines
