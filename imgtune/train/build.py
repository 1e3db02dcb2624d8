"""Building a Learner for a dataset, and the automatic choices of the lesson's recipe (epochs, rates)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from imgtune.data.loaders import DeviceNormalize, ImageData
from imgtune.deploy.bundle import META_FILE
from imgtune.errors import ImgtuneError
from imgtune.models import NO_WEIGHTS, create_model, get_backbone, layer_groups
from imgtune.train import distributed, partial, schedule
from imgtune.train.callbacks import ProgressCallback
from imgtune.train.config import TrainConfig, read_training_config
from imgtune.train.defaults import AUTO_STEPS
from imgtune.train.device import default_batch_size, default_device
from imgtune.train.features import FeatureSource


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and PyTorch so a CPU run repeats exactly.

    Args:
        seed: any integer (NumPy gets it modulo 2**32).
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def from_data(cls, data: ImageData, arch: str, *, weights, size, resize, bs, augment, num_workers, seed, device,
              progress, callbacks, feature_cache, cache, cache_dir, tune_stages="auto", **kwargs):
    """What :meth:`imgtune.train.learner.Learner.from_data` does (its docstring says it all): the
    model, loaders, config and cached-feature source for ``data``, as a ``cls`` learner, frozen.
    ``tune_stages`` (``"auto"`` or a count; see :mod:`imgtune.train.partial`) is kept by the feature
    source, which decides it before it makes any features."""
    backbone = get_backbone(arch)
    size = size or backbone.size
    if weights is not None and (Path(weights) / META_FILE).is_file():
        read_training_config(weights)  # a run folder: a damaged bundle fails here, naming its model.json
    if "bn_stats" not in kwargs:
        # Pretrained statistics are worth keeping; a randomly initialised network has none yet.
        no_weights = weights is None or str(weights).lower() == NO_WEIGHTS
        kwargs["bn_stats"] = "train" if no_weights else "frozen"
    set_seed(seed)
    model = create_model(arch, len(data.classes), weights=weights)
    mean, std = backbone.mean, backbone.std
    device = torch.device(device) if device else default_device()
    if bs is None:
        bs = default_batch_size(device, size=size, train_images=len(data.train) // distributed.world_size())
    train_dl, valid_dl = data.loaders(size=size, resize=resize, mean=mean, std=std, bs=bs, augment=augment,
                                      num_workers=num_workers, seed=seed, pin_memory=device.type == "cuda",
                                      cache=cache, cache_dir=cache_dir, device=device)
    if device.type == "cuda":  # its loaders send uint8 pictures
        kwargs.setdefault("normalize", DeviceNormalize(mean, std))
    config = TrainConfig(arch=arch, timm_name=backbone.timm_name, weights=str(weights), size=size, resize=resize,
                         mean=list(mean), std=list(std), bs=bs, augment=augment, seed=seed)
    callbacks = ([ProgressCallback()] if progress else []) + list(callbacks)
    features = None
    if feature_cache:
        features = FeatureSource.from_loaders(train_dl, valid_dl, seed=seed, mean=mean, std=std, size=size,
                                              cache=cache, cache_dir=cache_dir, augment=augment,
                                              tune_stages=tune_stages, arch=arch)
    elif tune_stages not in ("auto", 0):
        raise ImgtuneError(f"`tune_stages={tune_stages}` trains on cached activations: it needs the feature cache "
                           "(leave out --no-feature-cache) and image files; pass tune_stages=0")
    learner = cls(model, train_dl, valid_dl, classes=data.classes,
                  groups=layer_groups(model, backbone.body_groups), device=device, callbacks=callbacks,
                  config=config, features=features, **kwargs)
    learner.freeze()
    return learner


def plan(learner, epochs: int | None, base_lr, freeze_epochs: int | None, lr_mult: float):
    """``Learner.fine_tune``'s epochs and rates: ``(freeze_epochs, epochs, head_lr, (low, high))``: the
    automatic epoch counts (see :data:`imgtune.train.defaults.AUTO_STEPS`) and, for ``base_lr=None``, the lr
    finder's suggestion."""
    per_epoch = learner.steps_per_epoch
    if freeze_epochs is None:
        # A head step on cached features costs about a thousandth of a network step: take many.
        key = "frozen_features" if learner.features is not None and not distributed.is_initialized() else "frozen"
        freeze_epochs = schedule.auto_epochs(per_epoch, min_steps=AUTO_STEPS[key], min_epochs=1)
    if epochs is None:
        epochs = learner.auto_unfrozen_epochs()
    if base_lr is None:
        base_lr = learner.lr_find().suggested
    if isinstance(base_lr, (int, float)):
        return freeze_epochs, epochs, float(base_lr), (base_lr / 2 / lr_mult, base_lr / 2)
    return freeze_epochs, epochs, float(base_lr[1]), (float(base_lr[0]), float(base_lr[1]))

def tune_stages(learner, *, epochs_given: bool = False) -> int:
    """The stages partial fine-tuning trains after the head-only phase (0: none), decided once (see
    :func:`imgtune.train.partial.choose`) and recorded in the learner's config. ``tune_stages="auto"``
    with the epochs given (``epochs_given``) is 0: those epochs are the whole network's."""
    plan = None
    features = learner.features
    auto = features is not None and features.tune_stages == "auto"
    if features is not None and learner.device.type == "cpu" and not distributed.is_initialized() and not (
            auto and epochs_given):
        plan = features.partial_plan(learner.model, learner.device)
    stages = plan.tune_stages if plan is not None else 0
    learner.config.tune_stages = stages or None  # recorded when on, as balance and tta
    return stages


def auto_unfrozen_epochs(learner) -> int:
    """The unfrozen (or partial) epochs ``fine_tune(epochs=None)`` trains.

    On a GPU (or without cached features): enough epochs for ``AUTO_STEPS["unfrozen"]`` steps,
    at least 2. On a CPU with cached features, when partial fine-tuning is planned (see
    :mod:`imgtune.train.partial`): as many epochs of it as fit its time budget. Otherwise on a
    CPU: 0, the head only. There a step of the whole network costs about a thousand head steps on
    cached features, and with ImageNet features the head alone is as accurate on small datasets
    (the pets sample: 87.6% head only in 223 s, 84.3% fine-tuned in 426 s); pass ``epochs`` to
    fine-tune the body anyway.
    """
    if learner.device.type == "cpu" and learner.features is not None and not distributed.is_initialized():
        plan = learner.features.partial_plan(learner.model, learner.device)
        return plan.epochs if plan is not None and plan.epochs is not None else 0
    return schedule.auto_epochs(learner.steps_per_epoch, min_steps=AUTO_STEPS["unfrozen"], min_epochs=2)


def partial_rates(learner, base_lr) -> tuple[float, float]:
    """The partial phase's ``(low, high)`` rates: a given pair as it is, else
    :func:`imgtune.train.partial.rates` (a single ``base_lr`` sets the head-only phase's rate only)."""
    if base_lr is not None and not isinstance(base_lr, (int, float)):
        return float(base_lr[0]), float(base_lr[1])
    return partial.rates(len(learner.groups))


def resume_tune_stages(learner, plan: dict) -> int:
    """The stages a checkpoint's run tuned (0: none), set on ``learner``'s feature source so the resumed
    run trains the same split without measuring again."""
    stages = int(plan.get("tune_stages") or 0)
    if stages and learner.features is None:
        raise ImgtuneError(f"the checkpoint's run fine-tuned {stages} stages on cached activations; resume it "
                           "with the feature cache on (without --no-feature-cache)")
    if learner.features is not None:
        learner.features.fix_partial(stages, plan["epochs"])
    learner.config.tune_stages = stages or None
    return stages
