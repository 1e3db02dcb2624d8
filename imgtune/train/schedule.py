"""Pure functions of training progress: the one-cycle policy, the lr-finder sweep, discriminative rates.

``progress`` runs from 0.0 (first step) to 1.0 (last step) of a fit; nothing here touches a model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

#: Smoothing of the lr-finder curve: averages about the last 10 of its ~100 steps.
LR_FIND_BETA = 0.9


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


def one_cycle(progress: float, lr_max: Sequence[float], *, pct_start: float = 0.25, div: float = 25.0,
              div_final: float = 1e5, moms: tuple[float, float, float] = (0.95, 0.85, 0.95)
              ) -> tuple[list[float], float]:
    """The one-cycle policy at ``progress`` for every layer group.

    Args:
        progress: 0.0 at the first step of the fit, 1.0 at its end.
        lr_max: each layer group's peak rate (see :func:`discriminative_lrs`).
        pct_start, div, div_final: see :func:`one_cycle_lr`.
        moms: see :func:`one_cycle_momentum`.

    Returns:
        ``(rates, momentum)``: one rate per layer group, and Adam's beta1.
    """
    rates = [one_cycle_lr(progress, lr, pct_start=pct_start, div=div, div_final=div_final) for lr in lr_max]
    return rates, one_cycle_momentum(progress, moms=moms, pct_start=pct_start)


def lr_find_lr(step: int, num_steps: int, *, start_lr: float = 1e-7, end_lr: float = 10.0) -> float:
    """The exponential sweep of the lr finder: ``start_lr`` at step 0 to ``end_lr`` at the last step."""
    return start_lr * (end_lr / start_lr) ** (step / max(1, num_steps - 1))


def auto_epochs(steps_per_epoch: int, *, min_steps: int, min_epochs: int = 1, max_epochs: int = 50) -> int:
    """Enough epochs for at least ``min_steps`` optimizer steps (and ``min_epochs``), at most ``max_epochs``.

    With a large dataset this is ``min_epochs``; with ten images per class an epoch is one or two
    steps, and a fixed small number of epochs would barely move the weights.
    """
    return max(min_epochs, min(max_epochs, math.ceil(min_steps / max(1, steps_per_epoch))))


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


def suggest_lr(lrs: Sequence[float], losses: Sequence[float], *, beta: float = LR_FIND_BETA) -> dict[str, float]:
    """Suggested learning rates from an lr-finder curve.

    The losses are smoothed without lag (an exponential moving average run forwards then backwards;
    ``beta=0.9`` averages about 10 steps: a one-way average would shift every suggestion by about 10
    steps, most of a decade), and the curve is cut where the smoothed loss first exceeds 4x its
    minimum so far (where the lr finder itself stops) or one loss exceeds twice the starting level.
    Three rules are computed:

    - ``minimum``: the rate at the smoothed minimum, divided by 10;
    - ``valley``: the first rate at which the smoothed loss has covered half of its fall from
      the starting plateau to the minimum, i.e. well inside the descent;
    - ``steepest``: the rate where the smoothed loss falls fastest per decade (for reference: on a
      flat start, noise can make it land far too low).

    ``suggested`` is the smaller of ``valley`` and ``minimum``. With little data the loss can stay
    near zero over decades of rates (the head memorises the data), which pushes the minimum far too
    high; the valley stays where the loss is falling.
    """
    if len(losses) < 3:
        raise ValueError("the lr finder needs at least 3 points")
    # Cut where the running (forward) average first exceeds 4x its running minimum, as lr_find
    # does; the running minimum, not the overall one, or a curve that falls more than 4x would be
    # cut at its first point. Smoothing without lag comes after the cut, so that the blow-up past
    # the divergence cannot leak backwards into the minimum.
    # A single loss above twice the starting level is divergence too: the forward average lags it by
    # about 10 steps, and a head trained on cached features blows up within fewer (the centered
    # smoothing below would then drag those huge losses back over the rates that work).
    first = sorted(losses[: max(3, len(losses) // 10)])
    start = first[len(first) // 2]  # the median raw loss of the first tenth
    best, cut = math.inf, len(losses)
    for i, loss in enumerate(smooth_losses(losses, beta=beta)):
        if loss > 4 * best or losses[i] > 2 * start:
            cut = i
            break
        best = min(best, loss)
    cut = max(cut, 3)
    lrs, smooth = list(lrs[:cut]), smooth_losses(losses[:cut], beta=beta, centered=True)
    i_min = min(range(len(smooth)), key=smooth.__getitem__)
    minimum = lrs[i_min] / 10
    slopes = [
        (smooth[i + 1] - smooth[i]) / (math.log10(lrs[i + 1]) - math.log10(lrs[i])) for i in range(len(smooth) - 1)
    ]
    steepest = lrs[min(range(len(slopes)), key=slopes.__getitem__)] if slopes else minimum
    head = max(3, len(smooth) // 10)
    plateau = sorted(smooth[:head])[head // 2]  # the median loss of the first tenth: the starting level
    valley = minimum
    if plateau > smooth[i_min]:
        target = plateau - (plateau - smooth[i_min]) / 2
        valley = next((lrs[i] for i in range(i_min + 1) if smooth[i] <= target), lrs[i_min])
    return {"suggested": min(minimum, valley), "minimum": minimum, "valley": valley, "steepest": steepest}


def smooth_losses(losses: Sequence[float], *, beta: float = 0.98, centered: bool = False) -> list[float]:
    """Exponential moving average of the losses with bias correction.

    ``centered=True`` runs it forwards and then backwards over the result, which removes the lag
    (for analysing a finished curve; a running check can only use the forward pass).
    """
    forward = _ema(losses, beta)
    return _ema(forward[::-1], beta)[::-1] if centered else forward


def _ema(values: Sequence[float], beta: float) -> list[float]:
    out, avg = [], 0.0
    for i, value in enumerate(values, start=1):
        avg = beta * avg + (1 - beta) * value
        out.append(avg / (1 - beta**i))
    return out


def head_on_features_lr(suggestion: dict[str, float]) -> float:
    """The rate for a head trained on cached features, from a noise-free lr-finder curve (the loss of a
    fixed sample measured after each step, see ``Learner.lr_find``).

    Such a curve has a real minimum, so ``minimum`` (a tenth of the rate there) is the rule to follow;
    ``valley`` lands far too low on it (elpv: 72% at the valley's 3.6e-4, 76% at 3e-3). But where ``minimum``
    is more than ten times ``valley`` the loss kept falling into the large rates (a small dataset the
    head memorises: the pets sample's minimum lies at 10), and ``valley`` is the safe pick.
    """
    minimum, valley = suggestion["minimum"], suggestion["valley"]
    return minimum if minimum <= 10 * valley else valley
