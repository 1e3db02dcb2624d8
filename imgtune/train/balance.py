"""Class balance: a loss that weighs each class by the inverse of its frequency in the training split, to a power.

On imbalanced data plain cross-entropy rewards predicting the common classes: on elpv (4 classes,
the rarest ten times rarer than the commonest) the head-only run never predicts ``likely_defective``.
``balance`` gives class ``c`` the weight

    w_c = (N / (K * n_c)) ** p,  rescaled so that their mean over the training images is 1

where ``n_c`` is the number of training images of class ``c``, ``N`` their total, ``K`` the number of
classes that have training images, and ``p`` the power: ``balance=True`` (``imgtune train --balance``)
is ``p = 1``, where each class counts as much as the others; ``balance=False`` (``--no-balance``) is
plain cross-entropy; the default, ``"mild"``, is ``p = 0.25`` (:data:`MILD`): on elpv a class ten times
rarer weighs 1.8 times more, not 10. The loss keeps the scale of plain cross-entropy (and the lr
finder's rates still apply); a class with no training images gets weight 0; on balanced data every
weight is 1 and the loss is plain cross-entropy. The weights come from the training split only, never
the validation set.

Why mild by default (measured with partial fine-tuning, 1 stage, 5 epochs, on elpv seeds 42 and 43 and
elpv-binary; the README's "Imbalanced classes"): ``p = 1`` costs 23 accuracy points (76.2% to 53.0%),
``p = 0.5`` 1.5-3 points, while ``p = 0.25`` keeps the accuracy (76.9% and 74.5% against 76.2% and
75.1%) and lifts the macro recall by 2.5-4.5 points, and the rarest class is recognised at all.

The alternative to a weighted loss, balanced sampling (a ``WeightedRandomSampler`` drawing each class
equally often), was measured beside it on elpv (``bench/balance.py``, head only, seed 42): the two lift
the macro recall alike (60.7% and 59.6%, from 44.8%), the weighted loss recognises the rarest class
more often (recall 0.65 against 0.61) and the sampler keeps more accuracy (64.8% against 57.5%, from
75.4%). The weighted loss needs no change to the loaders, so it works alike on pictures, on cached
features, on cached activations, under torchrun and on resume; it is what ships.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from imgtune.errors import ImgtuneError


#: The default power of the inverse class frequency (``balance="mild"``).
MILD = 0.25

#: ``balance`` by name.
NAMED = {"none": 0.0, "mild": MILD, "full": 1.0}


def balance_power(balance: bool | float | str | None) -> float:
    """The power ``p`` of the inverse class frequency that ``balance`` asks for (see the module's docstring).

    Args:
        balance: ``True`` (1), ``False`` or ``None`` (0: plain cross-entropy), a number from 0 to 1, or
            ``"none"``, ``"mild"`` (:data:`MILD`), ``"full"``.

    Raises:
        ImgtuneError: anything else.
    """
    if balance is None or isinstance(balance, bool):
        return float(bool(balance))
    if isinstance(balance, str) and balance in NAMED:
        return NAMED[balance]
    if isinstance(balance, (int, float)) and 0 <= balance <= 1:
        return float(balance)
    raise ImgtuneError(f"balance must be true, false, a power from 0 to 1 or one of {', '.join(NAMED)}, "
                       f"not {balance!r}")


def describe(power: float) -> str:
    """The training loss in words, as the run's summary says it."""
    if not power:
        return "cross-entropy"
    if power == 1:
        return "cross-entropy weighted by inverse class frequency (balance)"
    return f"cross-entropy weighted by inverse class frequency to the power {power:g} (balance)"


def class_weights(targets: Sequence[int] | torch.Tensor, num_classes: int, power: float = 1.0) -> torch.Tensor:
    """The weight of each class: ``(N / (K * n_c)) ** power``, rescaled to a mean of 1 over ``targets``
    (see the module's docstring).

    Args:
        targets: the class index of every training item.
        num_classes: the number of classes ``C`` (the model's outputs).
        power: ``p``; 1 makes every class count alike.

    Returns:
        A float32 tensor of ``C`` weights whose mean over ``targets`` is 1.

    Raises:
        ImgtuneError: no targets, or one outside ``0..C-1``.
    """
    targets = torch.as_tensor(targets, dtype=torch.int64).reshape(-1)
    if len(targets) == 0:
        raise ImgtuneError("balance: the training set is empty; there are no class frequencies to weigh by")
    if targets.min() < 0 or targets.max() >= num_classes:
        raise ImgtuneError(f"balance: a training target is outside 0..{num_classes - 1}")
    counts = torch.bincount(targets, minlength=num_classes).double()
    present = int((counts > 0).sum())
    weights = torch.where(counts > 0, len(targets) / (present * counts.clamp(min=1)), torch.zeros_like(counts))
    weights = weights ** power
    weights[counts == 0] = 0.0
    return (weights * len(targets) / (weights * counts).sum()).float()


def dataset_targets(dataset) -> list[int]:
    """The class index of every item of a training dataset, without loading an image.

    Reads an image dataset's ``items`` and ``class_index`` (:class:`imgtune.data.loaders.ImageDataset`),
    a ``targets`` sequence (the cached-features dataset, torchvision's folders) or a
    ``TensorDataset``'s second tensor.

    Raises:
        ImgtuneError: the dataset has none of these.
    """
    if hasattr(dataset, "items") and hasattr(dataset, "class_index"):
        return [dataset.class_index[item.label] for item in dataset.items]
    if hasattr(dataset, "targets"):
        return [int(t) for t in dataset.targets]
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None and len(tensors) >= 2:
        return [int(t) for t in tensors[1]]
    raise ImgtuneError(f"balance: cannot read the class of each training item from a {type(dataset).__name__}; "
                       "give it `targets` (a class index per item) or pass balance=False")


def loss_function(train_dataset, num_classes: int, *, balance: bool | float | str | None) -> nn.CrossEntropyLoss:
    """The training loss: cross-entropy weighted by :func:`class_weights` of ``train_dataset`` to the power
    :func:`balance_power` of ``balance``; plain cross-entropy when that is 0 or when every weight is 1
    (balanced classes).

    PyTorch's weighted mean divides each batch's sum of weighted losses by the sum of its weights.

    Raises:
        ImgtuneError: ``balance`` is not one :func:`balance_power` knows, or there is no training data to count.
    """
    power = balance_power(balance)
    if not power:
        return nn.CrossEntropyLoss()
    if train_dataset is None:
        raise ImgtuneError("balance: the learner has no training data to count the classes of; pass balance=False")
    weights = class_weights(dataset_targets(train_dataset), num_classes, power)
    if torch.allclose(weights, torch.ones_like(weights)):
        return nn.CrossEntropyLoss()
    return nn.CrossEntropyLoss(weight=weights)
