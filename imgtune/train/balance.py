"""Class balance: a loss that weighs each class by the inverse of its frequency in the training split.

On imbalanced data plain cross-entropy rewards predicting the common classes: on elpv (4 classes,
the rarest ten times rarer than the commonest) the head-only run never predicts ``likely_defective``.
``balance=True`` (``imgtune train --balance``) gives class ``c`` the weight

    w_c = N / (K * n_c)

where ``n_c`` is the number of training images of class ``c``, ``N`` their total and ``K`` the number of
classes that have training images. Averaged over the training images the weight is exactly 1, so the
loss keeps the scale of plain cross-entropy (and the lr finder's rates still apply); a class with no
training images gets weight 0. The weights come from the training split only, never the validation set.

The alternative, balanced sampling (a ``WeightedRandomSampler`` drawing each class equally often), was
measured beside it on elpv (``bench/balance.py``, head only, seed 42; the README's "Imbalanced classes"):
the two lift the macro recall alike (60.7% and 59.6%, from 44.8%; one rare image apart), the weighted
loss recognises the rarest class more often (recall 0.65 against 0.61) and the sampler keeps more
accuracy (64.8% against 57.5%, from 75.4%). The weighted loss needs no change to the loaders, so it
works alike on pictures, on cached features, under torchrun and on resume; it is what ships.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from imgtune.errors import ImgtuneError


def class_weights(targets: Sequence[int] | torch.Tensor, num_classes: int) -> torch.Tensor:
    """The weight of each class: ``N / (K * n_c)`` (see the module's docstring).

    Args:
        targets: the class index of every training item.
        num_classes: the number of classes ``C`` (the model's outputs).

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
    return weights.float()


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


def loss_function(train_dataset, num_classes: int, *, balance: bool) -> nn.CrossEntropyLoss:
    """The training loss: cross-entropy, with ``balance`` weighted by :func:`class_weights` of ``train_dataset``.

    PyTorch's weighted mean divides each batch's sum of weighted losses by the sum of its weights.
    """
    if not balance:
        return nn.CrossEntropyLoss()
    if train_dataset is None:
        raise ImgtuneError("balance: the learner has no training data to count the classes of")
    return nn.CrossEntropyLoss(weight=class_weights(dataset_targets(train_dataset), num_classes))
