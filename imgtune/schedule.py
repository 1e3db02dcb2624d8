"""Pure functions of training progress: the one-cycle policy, the lr-finder sweep, discriminative rates.

``progress`` runs from 0.0 (first step) to 1.0 (last step) of a fit; nothing here touches a model.
"""

from __future__ import annotations

import math
from typing import Sequence


def cosine(start: float, end: float, pct: float) -> float:
    """Anneal from ``start`` to ``end`` along half a cosine as ``pct`` goes 0 -> 1."""
    return end + (start - end) / 2 * (1 + math.cos(math.pi * pct))


def one_cycle_lr(progress: float, lr_max: float, *, pct_start: float = 0.25, div: float = 25.0,
                 div_final: float = 1e5) -> float:
    """The one-cycle learning rate: warm up from ``lr_max/div`` to ``lr_max`` over the first
    ``pct_start`` of training, then anneal (cosine) to ``lr_max/div_final``."""
    if progress < pct_start:
        return cosine(lr_max / div, lr_max, progress / pct_start)
    return cosine(lr_max, lr_max / div_final, (progress - pct_start) / (1 - pct_start))


def one_cycle_momentum(progress: float, *, moms: tuple[float, float, float] = (0.95, 0.85, 0.95),
                       pct_start: float = 0.25) -> float:
    """Momentum (Adam's beta1) cycled inversely to the learning rate: high, low at the peak, high again."""
    if progress < pct_start:
        return cosine(moms[0], moms[1], progress / pct_start)
    return cosine(moms[1], moms[2], (progress - pct_start) / (1 - pct_start))


def lr_find_lr(step: int, num_steps: int, *, start_lr: float = 1e-7, end_lr: float = 10.0) -> float:
    """The exponential sweep of the lr finder: ``start_lr`` at step 0 to ``end_lr`` at the last step."""
    return start_lr * (end_lr / start_lr) ** (step / max(1, num_steps - 1))


def discriminative_lrs(lr: float | Sequence[float], num_groups: int) -> list[float]:
    """One learning rate per layer group, input side first.

    A single rate applies to every group. A pair ``(low, high)`` is spread geometrically: the first
    group gets ``low``, the head gets ``high`` (the lesson's ``1e-6 .. 1e-4``).
    """
    if isinstance(lr, (int, float)):
        return [float(lr)] * num_groups
    low, high = (float(v) for v in lr)
    if low <= 0 or high <= 0:
        raise ValueError(f"learning rates must be positive, got ({low}, {high})")
    if num_groups == 1:
        return [high]
    ratio = (high / low) ** (1 / (num_groups - 1))
    return [low * ratio**i for i in range(num_groups)]


def suggest_lr(lrs: Sequence[float], losses: Sequence[float], *, beta: float = 0.98) -> dict[str, float]:
    """Suggested learning rates from an lr-finder curve.

    The losses are smoothed (exponential moving average with bias correction, like fastai's), and
    the curve is cut where the smoothed loss first exceeds 4x its minimum. Two rules are reported:
    ``minimum`` is the rate at the smoothed minimum divided by 10 (the point where the loss is still
    falling fast but well before it diverges), ``steepest`` the rate where the smoothed loss falls
    fastest per decade (reported for comparison). ``suggested`` is ``minimum``: on a noisy curve
    the steepest point can land on a blip, while the minimum is stable.
    """
    smooth = smooth_losses(losses, beta=beta)
    if len(smooth) < 3:
        raise ValueError("the lr finder needs at least 3 points")
    best = min(smooth)
    cut = next((i for i, loss in enumerate(smooth) if i > 0 and loss > 4 * best), len(smooth))
    lrs, smooth = list(lrs[:cut]), smooth[:cut]
    i_min = min(range(len(smooth)), key=smooth.__getitem__)
    minimum = lrs[i_min] / 10
    slopes = [(smooth[i + 1] - smooth[i]) / (math.log10(lrs[i + 1]) - math.log10(lrs[i])) for i in range(len(smooth) - 1)]
    steepest = lrs[min(range(len(slopes)), key=slopes.__getitem__)] if slopes else minimum
    return {"suggested": minimum, "minimum": minimum, "steepest": steepest}


def smooth_losses(losses: Sequence[float], *, beta: float = 0.98) -> list[float]:
    """Exponential moving average of the losses with bias correction."""
    out, avg = [], 0.0
    for i, loss in enumerate(losses, start=1):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta**i))
    return out
