"""Partial fine-tuning on a CPU: the body's last stages trained on cached activation maps.

On a CPU a step of the whole network costs about a thousand head steps on cached features, so by
default ``fine_tune`` trains the head only there. ``tune_stages=N`` keeps that head-only phase and adds
a second one that trains the last ``N`` stages of the body (and its final convolution) with the head,
on the frozen stages' activation maps computed once per image (:mod:`imgtune.train.activations`): an
epoch costs the upper stages' work only (Lite0 with 2 stages: about 9x faster than the whole network).

The phase (``"partial"`` in the history) trains with the one-cycle policy and discriminative rates:
the trained stages peak at ``PARTIAL["lr"]`` and the head at ``PARTIAL["head_lr_mult"]`` times that
(an ``lr=(low, high)`` pair gives the rates instead), with label smoothing and random mirror and
shift of the maps. BatchNorm follows the learner's ``bn_stats``: with pretrained weights
(``"frozen"``) the trained stages keep their ImageNet running statistics, as the whole-network
fine-tuning does, so the maps the frozen stages feed them and the statistics stay consistent. The
trained modules are the model's own, so the saved bundle is the whole network (frozen part included)
and gives the logits the training model gave.

``tune_stages="auto"`` (the default of ``imgtune train``) decides from the training split and this
machine's measured speed, never from the validation set (see :data:`imgtune.train.defaults.PARTIAL`):

- only on a CPU, outside torchrun, with a timm EfficientNet or ResNet and images on disk (elsewhere
  the usual path: a GPU fine-tunes the whole network; a CPU trains the head only);
- only with at least ``min_images_per_class`` training images per class: with fewer (the pets sample
  has 5), the pretrained features are already the best the data can support and tuning the body
  overfits them;
- the most stages (up to ``max_stages``) whose measured epoch time lets ``min_epochs`` epochs fit
  ``budget_seconds``, and then as many epochs as fit.

The measurement times a few steps of each candidate on random maps, so on a busy machine ``auto`` can
pick fewer stages or epochs than on an idle one; the choice is recorded (``tune_stages`` in
``model.json`` and ``metrics.json``), and ``tune_stages=N`` with ``epochs=E`` repeats it exactly.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from imgtune.errors import ImgtuneError
from imgtune.models import stage_layout
from imgtune.train import distributed
from imgtune.train.activations import LowerBody, UpperStages
from imgtune.train.defaults import PARTIAL
from imgtune.train.extract import eval_mode


@dataclass
class PartialPlan:
    """What partial fine-tuning will do: ``tune_stages`` stages, ``epochs`` (``None``: as given to
    ``fine_tune``), the epoch time the choice was made from, and why."""

    tune_stages: int
    epochs: int | None
    epoch_seconds: float | None
    reason: str


def parse_tune_stages(value) -> int | str:
    """``"auto"`` or a count >= 0 (what ``tune_stages`` accepts), else :class:`ImgtuneError`."""
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ImgtuneError(f"`tune_stages` must be 'auto' or a whole number >= 0, not {value!r}")
    return value


def choose(model: nn.Module, source, device: torch.device, tune_stages, *,
           arch: str = "") -> tuple[PartialPlan | None, str]:
    """The plan for ``tune_stages`` (``"auto"`` or a count) on ``source``'s images, or ``None`` (the
    head only, or on a GPU or under torchrun the usual whole-network fine-tuning), and why: see the
    module's docstring for the rule.

    Raises:
        ImgtuneError: an explicit count for a model that cannot be split, or more stages than it has.
    """
    tune_stages = parse_tune_stages(tune_stages)
    if tune_stages == 0 or source is None:
        return None, "tune_stages=0" if tune_stages == 0 else "no image files"
    if torch.device(device).type != "cpu" or distributed.is_initialized():
        return None, "not on a single CPU process: the usual fine-tuning"
    if tune_stages != "auto":
        UpperStages(model, tune_stages, arch)  # checks the model and the count
        seconds = measure_epoch_seconds(model, tune_stages, source, arch=arch)
        return PartialPlan(tune_stages, _epochs(seconds), seconds, "requested"), "requested"
    try:
        layout = stage_layout(model, arch)
    except ImgtuneError:
        return None, "the model has no stages imgtune can split"
    classes = len({item.label for item in source.train_ds.items})
    per_class = len(source.train_ds.items) / max(1, classes)
    if per_class < PARTIAL["min_images_per_class"]:
        return None, f"{per_class:.0f} training images per class (< {PARTIAL['min_images_per_class']})"
    best, why = None, ""
    for stages in range(1, min(PARTIAL["max_stages"], len(layout.stages)) + 1):
        seconds = measure_epoch_seconds(model, stages, source, arch=arch)
        why = f"{per_class:.0f} training images per class; {stages} stages: {seconds:.1f} s an epoch measured"
        if seconds * PARTIAL["min_epochs"] > PARTIAL["budget_seconds"]:
            break
        best = PartialPlan(stages, _epochs(seconds), seconds, why)
    if best is None:
        return None, f"{why}: {PARTIAL['min_epochs']} epochs exceed {PARTIAL['budget_seconds']:.0f} s"
    return best, best.reason


def _epochs(epoch_seconds: float) -> int:
    """As many epochs as fit the budget, within ``min_epochs`` .. ``max_epochs``."""
    fit = math.floor(PARTIAL["budget_seconds"] / max(epoch_seconds, 1e-9))
    return max(PARTIAL["min_epochs"], min(PARTIAL["max_epochs"], fit))


def measure_epoch_seconds(model: nn.Module, tune_stages: int, source, *, arch: str = "", steps: int = 2) -> float:
    """An epoch's estimated seconds of partial fine-tuning on this machine: ``steps`` forward and
    backward passes of the upper stages on a random batch of maps (after one untimed), scaled to the
    training batches, plus the validation batches at a third of a step each. The weights, BatchNorm
    statistics, gradients and global random state are left as they were."""
    lower, upper = LowerBody(model, tune_stages, arch), UpperStages(model, tune_stages, arch)
    flags = [(p, p.requires_grad) for p in upper.parameters()]
    with eval_mode(model), eval_mode(upper):  # no dropout draws, no statistics updates
        try:
            with torch.no_grad():
                shape = lower(torch.zeros(1, 3, source.size, source.size)).shape[1:]
            generator = torch.Generator().manual_seed(0)
            maps = torch.randn(source.batch_size, *shape, generator=generator).to(memory_format=torch.channels_last)
            for p, _ in flags:
                p.requires_grad_(True)
            for step in range(steps + 1):
                if step == 1:
                    started = time.perf_counter()
                upper(maps).logsumexp(1).mean().backward()
            step_seconds = (time.perf_counter() - started) / steps
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
                p.grad = None
    train_steps = len(source.train_ds.items) / source.batch_size
    valid_steps = len(source.valid_ds.items) / source.batch_size
    return step_seconds * (train_steps + valid_steps / 3)


def rates(num_groups: int) -> tuple[float, float]:
    """The ``(low, high)`` pair that gives the body's last layer group ``PARTIAL["lr"]`` and the head
    ``PARTIAL["head_lr_mult"]`` times it, spread geometrically (see
    :func:`imgtune.train.schedule.discriminative_lrs`)."""
    body, mult = PARTIAL["lr"], PARTIAL["head_lr_mult"]
    return body * mult / mult ** (num_groups - 1), body * mult


def unfreeze_upper(learner, tune_stages: int) -> None:
    """Freeze the body and make its last ``tune_stages`` stages, its tail and the head trainable."""
    learner.freeze()
    for p in UpperStages(learner.model, tune_stages, learner.config.arch or "").parameters():
        p.requires_grad_(True)


def fit(learner, tune_stages: int, epochs: int, lr_pair: tuple[float, float] | None = None, *,
        resume: dict | None = None):
    """The partial phase: the last ``tune_stages`` stages and the head for ``epochs`` one-cycle epochs
    on cached maps (``phase="partial"``), with label smoothing; returns ``learner``."""
    unfreeze_upper(learner, tune_stages)
    saved = learner.loss_func
    if isinstance(saved, nn.CrossEntropyLoss):  # keeps class weights (balance)
        learner.loss_func = nn.CrossEntropyLoss(weight=saved.weight, label_smoothing=PARTIAL["label_smoothing"])
    try:
        learner.fit_one_cycle(epochs, lr_pair or rates(len(learner.groups)), phase="partial", resume=resume)
    finally:
        learner.loss_func = saved
    return learner


def lower_frozen(learner, tune_stages: int) -> bool:
    """Whether ``learner``'s body is frozen below its last ``tune_stages`` stages and something above trains."""
    arch = learner.config.arch or ""
    lower = LowerBody(learner.model, tune_stages, arch)
    upper = UpperStages(learner.model, tune_stages, arch)
    return (not any(p.requires_grad for p in lower.parameters())
            and any(p.requires_grad for p in upper.parameters()))

