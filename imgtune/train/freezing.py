"""Freezing layer groups, and what BatchNorm does in them (the ``bn_stats`` policy).

A model's parameters are split into layer groups, input side first and the head last (see
:func:`imgtune.models.layer_groups`); ``freeze_to(groups, n)`` trains only groups ``n`` onwards.

Frozen groups are really frozen: their parameters get no gradient and their BatchNorm layers stay in
eval mode (running statistics are not updated), so a frozen body computes exactly the same features
every epoch.

``bn_stats`` says what BatchNorm does in unfrozen groups. ``"frozen"``: the layers keep normalising
with their pretrained running statistics while their scale and shift train, so the features the head
was trained on do not jump when the body is unfrozen and small batches of a small dataset cannot pull
the statistics around. ``"train"``: PyTorch's usual behaviour, batch statistics in training and running
statistics updated; right for a network without pretrained weights, whose initial statistics mean nothing.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

#: The values of ``bn_stats``.
BN_STATS = ("frozen", "train")


def freeze_to(groups: list[list[nn.Parameter]], n: int) -> None:
    """Make layer groups ``n`` onwards trainable and the ones before frozen (negative ``n`` counts from the head)."""
    n = n % len(groups) if n < 0 else min(n, len(groups))
    for i, group in enumerate(groups):
        for p in group:
            p.requires_grad_(i >= n)


def body_frozen(groups: list[list[nn.Parameter]]) -> bool:
    """Whether only the head trains (every layer group but the last is frozen)."""
    return not any(p.requires_grad for group in groups[:-1] for p in group)


def train_mode(model: nn.Module, bn_stats: str) -> None:
    """``model`` in train mode, except BatchNorm layers that keep their running statistics: all of them
    with ``bn_stats="frozen"``, else those whose parameters are frozen."""
    model.train()
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            params = list(module.parameters(recurse=False))
            if bn_stats == "frozen" or (params and not any(p.requires_grad for p in params)):
                module.eval()
