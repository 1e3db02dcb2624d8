"""Evaluation: a model's predictions over a loader, put back together across processes, and their metrics."""

from __future__ import annotations

import torch
from torch import nn

from imgtune.train import distributed
from imgtune.train.device import Precision, to_device


@torch.no_grad()
def predict(model: nn.Module, dl, *, device: torch.device, memory_format: torch.memory_format,
            precision: Precision, normalize=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Probabilities, targets and per-item losses of ``model`` (put in eval mode) over ``dl``.

    Under torchrun each process predicts its shard of ``dl``; the results are gathered back into
    dataset order on every process (see :func:`imgtune.train.distributed.gather_by_index`). The
    batches are copied without waiting (from pinned memory) and the results stay on the device until
    the end, so the CPU queues the next batch while the GPU computes this one. ``normalize``: as for
    :func:`imgtune.train.device.to_device`.

    Returns:
        ``(probs (N, C), targets (N,), losses (N,))`` on the CPU.
    """
    model.eval()
    probs, targets, losses = [], [], []
    for xb, yb in dl:
        xb, yb = to_device(xb, device, memory_format, normalize), yb.to(device, non_blocking=True)
        with precision.autocast():
            logits = model(xb).float()
        probs.append(logits.softmax(1))
        targets.append(yb)
        losses.append(nn.functional.cross_entropy(logits, yb, reduction="none"))
    results = [torch.cat(parts).cpu() for parts in (probs, targets, losses)]
    return distributed.gather_by_index(dl, *results)


def metrics(probs: torch.Tensor, targets: torch.Tensor, losses: torch.Tensor) -> dict[str, float]:
    """``valid_loss`` (the mean loss), ``accuracy`` and ``error_rate`` of predictions."""
    accuracy = (probs.argmax(1) == targets).float().mean().item()
    return dict(valid_loss=losses.mean().item(), accuracy=accuracy, error_rate=1.0 - accuracy)
