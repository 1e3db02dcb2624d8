"""The Learner: a model, its data and an optimizer, with the lesson's training recipe.

The training step is one visible loop (:meth:`Learner._train_epoch`): forward, loss, backward,
step, with the learning rate and momentum computed by pure functions from :mod:`imgtune.train.schedule`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from imgtune.train import distributed
from imgtune.train import schedule
from imgtune.train.callbacks import History, ProgressCallback
from imgtune.data.loaders import ImageData
from imgtune.errors import ImgtuneError
from imgtune.train.features import FeatureDataset, FeatureSource, HeadOnFeatures, supports_features
from imgtune.models import DEFAULT_ARCH, IMAGENET, NO_WEIGHTS, create_model, get_backbone, layer_groups
from imgtune.data import shards


#: Optimizer steps the automatic epoch counts of :meth:`Learner.fine_tune` aim for, per phase.
AUTO_STEPS = {"frozen": 60, "unfrozen": 80, "frozen_features": 600}


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and PyTorch so a CPU run repeats exactly."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_device() -> torch.device:
    """CUDA if present, else Apple's MPS, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@dataclass
class LRFinderResult:
    """The lr-finder curve (one point per step) and the suggested rates (see ``schedule.suggest_lr``)."""

    lrs: list[float]
    losses: list[float]
    suggestion: dict[str, float] = field(default_factory=dict)

    @property
    def suggested(self) -> float:
        return self.suggestion["suggested"]


class Learner:
    """Fine-tunes a model on labelled images.

    Build one with :meth:`from_data`. The model's parameters are split into layer groups, input side
    first and the head last; ``freeze_to(n)`` trains only groups ``n`` onwards.

    Frozen groups are really frozen: their parameters get no gradient and their BatchNorm layers stay
    in eval mode (running statistics are not updated), so a frozen body computes exactly the same
    features every epoch.

    ``bn_stats`` says what BatchNorm does in unfrozen groups. ``"frozen"`` (the default): the layers
    keep normalising with their pretrained running statistics while their scale and shift train, so
    the features the head was trained on do not jump when the body is unfrozen and small batches of
    a small dataset cannot pull the statistics around. ``"train"``: PyTorch's usual behaviour, batch
    statistics in training and running statistics updated; :meth:`from_data` picks it for a network
    without pretrained weights (``weights="none"``), whose initial statistics mean nothing.
    """

    def __init__(
        self,
        model: nn.Module,
        train_dl,
        valid_dl,
        *,
        classes: Sequence[str],
        groups: list[list[nn.Parameter]] | None = None,
        wd: float = 0.01,
        device: str | torch.device | None = None,
        mixed_precision: bool | None = None,
        channels_last: bool = True,
        bn_stats: str = "frozen",
        callbacks: Iterable = (),
        config: dict | None = None,
        features: FeatureSource | None = None,
        accumulate: int = 1,
        sync_bn: bool = False,
    ):
        self.device = torch.device(device) if device else default_device()
        if accumulate < 1:
            raise ImgtuneError(f"--accumulate must be 1 or more, not {accumulate}")
        if sync_bn:
            model = distributed.sync_batchnorm(model, self.device)  # keeps the parameters `groups` holds
        # channels_last makes convolutions 1.5-2.5x faster on CPU (oneDNN) and on GPU tensor cores.
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=self.memory_format)
        self.train_dl, self.valid_dl = train_dl, valid_dl
        self.classes = list(classes)
        self.groups = groups if groups is not None else [list(model.parameters())]
        self.loss_func = nn.CrossEntropyLoss()
        self.opt = torch.optim.AdamW([{"params": g} for g in self.groups], lr=1e-3, weight_decay=wd)
        mixed_precision = self.device.type == "cuda" if mixed_precision is None else mixed_precision
        # bfloat16 where the GPU has it (no loss scaling needed), else float16 with a GradScaler.
        self.amp_dtype = None
        if mixed_precision and self.device.type == "cuda":
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.history_cb = History()
        self.callbacks = [self.history_cb, *callbacks]
        if bn_stats not in ("frozen", "train"):
            raise ValueError(f"bn_stats must be 'frozen' or 'train', not {bn_stats!r}")
        self.bn_stats = bn_stats
        self.config = dict(config or {})
        self.timings: dict[str, float] = {}
        self.phase, self.epoch, self.epochs, self.step, self.total_steps = "fit", 0, 0, 0, 0
        self.loss, self.epoch_metrics, self.should_stop = math.nan, {}, False
        # Cached features for the frozen phase (see imgtune.train.features); only for a timm-style model.
        self.features = features if features is not None and supports_features(model) else None
        self._on_features_depth = 0
        # Micro-batches per optimizer step; under torchrun the global batch is bs x processes x accumulate.
        self.accumulate = accumulate
        self.config.update(accumulate=accumulate, world_size=distributed.world_size(), sync_bn=sync_bn)
        self._ddp, self._ddp_key, self._epochs_trained = None, None, 0

    @classmethod
    def from_data(
        cls,
        data: ImageData,
        arch: str = DEFAULT_ARCH,
        *,
        weights: str | None = IMAGENET,
        size: int | None = None,
        resize: str = "crop",
        bs: int = 32,
        augment: bool = True,
        num_workers: int | None = None,
        seed: int = 42,
        device: str | None = None,
        progress: bool = True,
        callbacks: Iterable = (),
        feature_cache: bool = True,
        cache: bool = True,
        cache_dir=None,
        **kwargs,
    ) -> "Learner":
        """A learner for ``data`` with a pretrained ``arch`` and a new head, frozen as in the lesson.

        Args:
            data: the images (see :func:`imgtune.load_data`).
            arch: a registry name (``imgtune.REGISTRY``) or any timm model name.
            weights: ``"imagenet"``, ``"none"`` or a path to a weights file.
            size: image side in pixels (default: the backbone's, 224 for most).
            resize: ``"crop"``, ``"squish"`` or ``"pad"``.
            bs: batch size per step.
            augment: augment training images (flip, rotate, zoom, lighting).
            num_workers: loader processes (default: one per core).
            seed: seeds the head's initialisation, the shuffling and the augmentation.
            device: ``"cuda"``, ``"mps"``, ``"cpu"``; default picks the fastest present.
            progress: show progress bars / lines.
            callbacks: more callbacks.
            feature_cache: while the body is frozen, train the head on features computed once per
                image (see :mod:`imgtune.train.features`) instead of running the body every step.
            cache: keep presized pictures (and features) on disk, reused by later epochs and runs.
            cache_dir: the cache folder (default ``$IMGTUNE_CACHE`` or ``~/.cache/imgtune``).
        """
        backbone = get_backbone(arch)
        size = size or backbone.size
        if "bn_stats" not in kwargs:
            # Pretrained statistics are worth keeping; a randomly initialised network has none yet.
            no_weights = weights is None or str(weights).lower() == NO_WEIGHTS
            kwargs["bn_stats"] = "train" if no_weights else "frozen"
        set_seed(seed)
        model = create_model(arch, len(data.classes), weights=weights)
        mean, std = backbone.mean, backbone.std
        device = torch.device(device) if device else default_device()
        train_dl, valid_dl = data.loaders(size=size, resize=resize, mean=mean, std=std, bs=bs, augment=augment,
                                          num_workers=num_workers, seed=seed, pin_memory=device.type == "cuda",
                                         cache=cache, cache_dir=cache_dir)
        config = dict(arch=arch, timm_name=backbone.timm_name, weights=str(weights), size=size, resize=resize,
                      mean=list(mean), std=list(std), bs=bs, augment=augment, seed=seed)
        callbacks = ([ProgressCallback()] if progress else []) + list(callbacks)
        features = None
        if feature_cache:
            features = FeatureSource.from_loaders(train_dl, valid_dl, seed=seed, mean=mean, std=std, size=size,
                                                  cache=cache, cache_dir=cache_dir, augment=augment)
        learner = cls(model, train_dl, valid_dl, classes=data.classes,
                      groups=layer_groups(model, backbone.body_groups), device=device, callbacks=callbacks,
                      config=config, features=features, **kwargs)
        learner.freeze()
        return learner

    # --- freezing ---------------------------------------------------------------------------------

    def freeze_to(self, n: int) -> None:
        """Train layer groups ``n`` onwards only (negative ``n`` counts from the head)."""
        n = n % len(self.groups) if n < 0 else min(n, len(self.groups))
        for i, group in enumerate(self.groups):
            for p in group:
                p.requires_grad_(i >= n)

    def freeze(self) -> None:
        """Train the head only."""
        self.freeze_to(-1)

    def unfreeze(self) -> None:
        """Train every layer group."""
        self.freeze_to(0)

    def _train_mode(self) -> None:
        """Train mode, except BatchNorm layers that keep their running statistics (see ``bn_stats``)."""
        self.model.train()
        for module in self.model.modules():
            if isinstance(module, _BatchNorm):
                params = list(module.parameters(recurse=False))
                if self.bn_stats == "frozen" or (params and not any(p.requires_grad for p in params)):
                    module.eval()

    # --- cached features ---------------------------------------------------------------------------

    def body_frozen(self) -> bool:
        """Whether only the head trains (every layer group but the last is frozen)."""
        return not any(p.requires_grad for group in self.groups[:-1] for p in group)

    @contextlib.contextmanager
    def _on_features(self):
        """While the body is frozen and features are enabled: the head as the model and loaders of
        cached features as the data (computed on first use), so each step costs a head's work."""
        if self._on_features_depth or self.features is None or not self.body_frozen() or _distributed():
            self._on_features_depth += 1
            try:
                yield
            finally:
                self._on_features_depth -= 1
            return
        saved = self.model, self.train_dl, self.valid_dl, self.memory_format
        started = time.perf_counter()
        train_dl, valid_dl = self.features.loaders(self.model, self.device, progress=self._feature_progress)
        if self.features.stats.get("computed"):
            self.timings["features"] = self.timings.get("features", 0.0) + time.perf_counter() - started
        self.model = HeadOnFeatures(self.model)
        self.train_dl, self.valid_dl, self.memory_format = train_dl, valid_dl, torch.contiguous_format
        self._on_features_depth += 1
        try:
            yield
        finally:
            self._on_features_depth -= 1
            self.model, self.train_dl, self.valid_dl, self.memory_format = saved

    #: Training features the lr finder measures its loss on when the head trains on cached features.
    LR_FIND_PROBE = 1024

    def _feature_probe(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """On cached features, a fixed sample of training features (the pictures' own view): the lr
        finder then records the loss on it after each step instead of the step's batch loss. The
        curve loses the batch-to-batch noise (large on a hard dataset like elpv, where it dragged the
        suggestion ten times too low), and a head's forward pass over it costs well under a millisecond."""
        dataset = self.train_dl.dataset
        if not isinstance(dataset, FeatureDataset):
            return None
        index = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[: self.LR_FIND_PROBE]
        return dataset.features[index, 0].to(self.device), dataset.targets[index].to(self.device)

    @torch.no_grad()
    def _probe_loss(self, features: torch.Tensor, targets: torch.Tensor) -> float:
        self.model.eval()
        loss = self.loss_func(self.model(features).float(), targets).item()
        self._train_mode()
        return loss

    def _feature_progress(self, done: int, total: int) -> None:
        """Tells callbacks with an ``on_features(learner, done, total)`` method how extraction goes."""
        for cb in self.callbacks:
            method = getattr(cb, "on_features", None)
            if method is not None:
                method(self, done, total)

    # --- training ---------------------------------------------------------------------------------

    def _call(self, event: str) -> None:
        for cb in self.callbacks:
            method = getattr(cb, event, None)
            if method is not None:
                method(self)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype)

    def _batch_loss(self, xb: torch.Tensor, yb: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        xb = xb.to(self.device, non_blocking=True, memory_format=self.memory_format)
        yb = yb.to(self.device, non_blocking=True)
        with self._autocast():
            return self.loss_func((model or self._training_model())(xb).float(), yb)

    def _training_model(self) -> nn.Module:
        """The module a training step calls: the model, or under torch.distributed a
        DistributedDataParallel wrapper of it, rebuilt when freezing changes the trainable parameters
        (DDP only averages the gradients of the parameters that were trainable when it was built)."""
        if not distributed.is_initialized():
            return self.model
        key = (id(self.model), tuple(p.requires_grad for p in self.model.parameters()))
        if key != self._ddp_key:
            self._ddp = None  # drop the old wrapper's gradient hooks before the new one adds its own
            self._ddp, self._ddp_key = distributed.wrap(self.model, self.device), key
        return self._ddp

    def _forward_backward(self, xb: torch.Tensor, yb: torch.Tensor, *, scale: float = 1.0,
                          sync: bool = True) -> torch.Tensor:
        """Forward and backward of one micro-batch, its loss multiplied by ``scale`` (1/accumulate);
        without ``sync`` DDP keeps the gradients local (a micro-batch before the last of a step).

        Returns the unscaled loss. A CUDA out-of-memory error becomes a one-line ImgtuneError that
        names a batch size that fits (see :meth:`_out_of_memory_error`).
        """
        try:
            model = self._training_model()
            no_sync = model.no_sync() if not sync and model is not self.model else contextlib.nullcontext()
            with no_sync:
                loss = self._batch_loss(xb, yb, model)
                scaled = loss * scale if scale != 1.0 else loss
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            return loss.detach()
        except torch.cuda.OutOfMemoryError:
            pass  # leave the except block first, so its traceback no longer holds the batch's activations
        raise self._out_of_memory_error(xb, yb)

    def _optimizer_step(self) -> None:
        """One optimizer step on the accumulated gradients (through the GradScaler for float16)."""
        if self.scaler is None:
            self.opt.step()
        else:
            self.scaler.step(self.opt)
            self.scaler.update()

    def _out_of_memory_error(self, xb: torch.Tensor, yb: torch.Tensor) -> ImgtuneError:
        """The error for a batch that does not fit: tries halves of it (forward and backward on the
        bare model, weights untouched) and names the largest that fits, with the --accumulate that
        keeps the effective batch. We do not retry by ourselves: a silently smaller batch would change
        the run's learning-rate semantics and results."""
        self.opt.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        batch, fits = len(yb), 0
        trial = batch // 2
        while trial >= 1 and not fits:
            try:
                self._batch_loss(xb[:trial], yb[:trial], self.model).backward()
                fits = trial
            except torch.cuda.OutOfMemoryError:
                trial //= 2
            self.opt.zero_grad(set_to_none=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        where = f"out of memory on {self.device} in the {self.phase} phase with a batch of {batch} images of " \
                f"{xb.shape[-1]} px" + (" per process" if distributed.world_size() > 1 else "")
        if not fits:
            return ImgtuneError(f"{where}, and even one image does not fit; use a smaller --size or --arch")
        accumulate = self.accumulate * math.ceil(batch / fits)
        before, after = [n * distributed.world_size() for n in (batch * self.accumulate, fits * accumulate)]
        effective = f"the same effective batch of {after}" if after == before else f"effective batch {after}, was {before}"
        return ImgtuneError(f"{where}; a batch of {fits} fits: rerun with --bs {fits} --accumulate {accumulate}"
                            f" ({effective})")

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch: the training batches, ``accumulate`` per step (a shorter last step)."""
        return math.ceil(len(self.train_dl) / self.accumulate)

    def _set_hyper(self, lrs: Sequence[float], momentum: float | None) -> None:
        for group, lr in zip(self.opt.param_groups, lrs):
            group["lr"] = lr
            if momentum is not None:
                group["betas"] = (momentum, group["betas"][1])

    def fit_one_cycle(
        self,
        epochs: int,
        lr_max: float | Sequence[float] = 1e-3,
        *,
        pct_start: float = 0.25,
        div: float = 25.0,
        div_final: float = 1e5,
        moms: tuple[float, float, float] = (0.95, 0.85, 0.95),
        phase: str = "fit",
    ) -> "Learner":
        """Train ``epochs`` epochs with the one-cycle policy.

        ``lr_max`` is one rate or a pair ``(low, high)`` spread geometrically over the layer groups.
        """
        if epochs < 1:
            return self
        with self._on_features():
            return self._fit_one_cycle(epochs, lr_max, pct_start=pct_start, div=div, div_final=div_final,
                                       moms=moms, phase=phase)

    def _fit_one_cycle(self, epochs, lr_max, *, pct_start, div, div_final, moms, phase) -> "Learner":
        lrs = schedule.discriminative_lrs(lr_max, len(self.groups))
        self.phase, self.epochs, self.step = phase, epochs, 0
        self.total_steps = epochs * self.steps_per_epoch
        self.should_stop = False
        started = time.perf_counter()
        self._call("before_fit")
        for epoch in range(1, epochs + 1):
            self.epoch = epoch
            epoch_start = time.perf_counter()

            def hyper(progress: float) -> tuple[list[float], float]:
                kw = dict(pct_start=pct_start)
                return ([schedule.one_cycle_lr(progress, lr, div=div, div_final=div_final, **kw) for lr in lrs],
                        schedule.one_cycle_momentum(progress, moms=moms, **kw))

            train_loss = self._train_epoch(hyper)
            metrics = self.validate()
            self.epoch_metrics = dict(epoch=epoch, phase=phase, train_loss=train_loss, **metrics,
                                      seconds=time.perf_counter() - epoch_start)
            self._call("after_epoch")
            if self.should_stop:
                break
        self._call("after_fit")
        self.timings[phase] = self.timings.get(phase, 0.0) + time.perf_counter() - started
        return self

    def _train_epoch(self, hyper) -> float:
        """One pass over the training data; returns the mean training loss (over every process).

        Each optimizer step sums the gradients of ``accumulate`` micro-batches, each loss scaled by
        1/(micro-batches in the step), so it equals one step on their concatenation (the last step of
        an epoch may have fewer). Under DDP only the last micro-batch of a step averages gradients.
        """
        self._train_mode()
        shards.set_epoch(self.train_dl, self._epochs_trained)
        shards.record_shard(self.train_dl, phase=self.phase, epoch=self._epochs_trained)
        self._epochs_trained += 1
        total, count, batches = 0.0, 0, len(self.train_dl)
        for i, (xb, yb) in enumerate(self.train_dl):
            first, last = i % self.accumulate == 0, (i + 1) % self.accumulate == 0 or i + 1 == batches
            if first:
                micro = min(self.accumulate, batches - i)
                lrs, momentum = hyper(self.step / max(1, self.total_steps))
                self._set_hyper(lrs, momentum)
                self.opt.zero_grad(set_to_none=True)
                step_loss = 0.0
            loss = self._forward_backward(xb, yb, scale=1.0 / micro, sync=last).item()
            step_loss += loss / micro
            total, count = total + loss * len(yb), count + len(yb)
            if last:
                self._optimizer_step()
                self.step += 1
                self.loss = step_loss
                self._call("after_batch")
                if self.should_stop:
                    break
        distributed.broadcast_buffers(self.model)
        total, count = distributed.sum_across([total, count])
        return total / max(1, count)

    def fine_tune(self, epochs: int | None = None, base_lr: float | Sequence[float] | None = None, *,
                  freeze_epochs: int | None = None, lr_mult: float = 100.0) -> "Learner":
        """The lesson's recipe.

        1. Freeze the body and train the head for ``freeze_epochs`` at ``base_lr`` (one-cycle with a
           long warm-up, ``pct_start=0.99``).
        2. Unfreeze and train everything for ``epochs`` with discriminative rates from
           ``base_lr / 2 / lr_mult`` (first layers) to ``base_lr / 2`` (head).

        ``base_lr=None`` runs :meth:`lr_find` on the frozen model and uses its suggestion. A pair
        ``(low, high)`` gives the unfrozen phase's rates exactly; the frozen phase then trains the
        head at ``high``. ``freeze_epochs=None`` and ``epochs=None`` mean enough epochs for the
        optimizer steps :data:`AUTO_STEPS` gives each phase (at least 1 frozen, 2 unfrozen; the
        frozen phase on cached features takes ``"frozen_features"`` steps), except that
        ``epochs=None`` on a CPU with cached features trains the head only (see
        :meth:`auto_unfrozen_epochs`). With ``epochs=0`` the body stays frozen at the end.
        """
        per_epoch = self.steps_per_epoch
        if freeze_epochs is None:
            # A head step on cached features costs about a thousandth of a network step: take many.
            key = "frozen_features" if self.features is not None and not _distributed() else "frozen"
            freeze_epochs = schedule.auto_epochs(per_epoch, min_steps=AUTO_STEPS[key], min_epochs=1)
        if epochs is None:
            epochs = self.auto_unfrozen_epochs()
        self.freeze()
        if base_lr is None:
            base_lr = self.lr_find().suggested
        if isinstance(base_lr, (int, float)):
            head_lr, rates = float(base_lr), (base_lr / 2 / lr_mult, base_lr / 2)
        else:
            head_lr, rates = float(base_lr[1]), (float(base_lr[0]), float(base_lr[1]))
        self.config["lr"] = {"frozen": head_lr, "unfrozen": list(rates)}
        self.fit_one_cycle(freeze_epochs, head_lr, pct_start=0.99, phase="frozen")
        if epochs > 0:
            self.unfreeze()
            self.fit_one_cycle(epochs, rates, pct_start=0.3, div=5.0, phase="unfrozen")
        return self

    def auto_unfrozen_epochs(self) -> int:
        """The unfrozen epochs ``fine_tune(epochs=None)`` trains.

        On a GPU (or without cached features): enough epochs for ``AUTO_STEPS["unfrozen"]`` steps,
        at least 2. On a CPU with cached features: 0, the head only. There a step of the whole
        network costs about a thousand head steps on cached features, and with ImageNet features the
        head alone is as accurate on small datasets (the pets sample: 87.6% head only in 223 s, 84.3%
        fine-tuned in 426 s); pass ``epochs`` to fine-tune the body anyway.
        """
        if self.device.type == "cpu" and self.features is not None and not _distributed():
            return 0
        return schedule.auto_epochs(self.steps_per_epoch, min_steps=AUTO_STEPS["unfrozen"], min_epochs=2)

    # --- lr finder --------------------------------------------------------------------------------

    def lr_find(self, start_lr: float = 1e-7, end_lr: float = 10.0, num_steps: int = 100,
                diverge: float = 4.0) -> LRFinderResult:
        """Sweep the learning rate exponentially, one batch per step, until the loss diverges.

        The model's weights, its BatchNorm statistics, the optimizer state and the random number
        generators are restored afterwards, bit for bit.

        Returns:
            An :class:`LRFinderResult`; its ``suggested`` rate follows ``schedule.suggest_lr``.
        """
        with self._on_features():
            return self._lr_find(start_lr, end_lr, num_steps, diverge)

    def _lr_find(self, start_lr: float, end_lr: float, num_steps: int, diverge: float) -> LRFinderResult:
        saved_model = copy.deepcopy(self.model.state_dict())
        saved_opt = copy.deepcopy(self.opt.state_dict())
        saved_scaler = self.scaler.state_dict() if self.scaler is not None else None
        saved_rng = torch.get_rng_state(), random.getstate(), np.random.get_state()
        saved_cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        # The train loader shuffles with its own generator; without restoring it, the fit after
        # lr_find would see other batches than a fit without it.
        loader_rng = getattr(self.train_dl, "generator", None)
        saved_loader_rng = loader_rng.get_state() if loader_rng is not None else None
        # Cached features pick a random view per item with the dataset's own generator.
        view_rng = getattr(self.train_dl.dataset, "generator", None)
        saved_view_rng = view_rng.get_state() if view_rng is not None else None
        started = time.perf_counter()
        lrs, losses = [], []
        self.phase, self.epochs, self.step, self.total_steps, self.should_stop = "lr_find", 1, 0, num_steps, False
        self._call("before_fit")
        try:
            self._train_mode()
            best = math.inf
            batches = _cycle(self.train_dl)
            probe = self._feature_probe()
            for step in range(num_steps):
                lr = schedule.lr_find_lr(step, num_steps, start_lr=start_lr, end_lr=end_lr)
                self._set_hyper([lr] * len(self.groups), None)
                self.opt.zero_grad(set_to_none=True)
                loss = 0.0
                for micro in range(self.accumulate):  # one step of the run's effective batch
                    xb, yb = next(batches)
                    loss += self._forward_backward(xb, yb, scale=1.0 / self.accumulate,
                                                   sync=micro == self.accumulate - 1).item() / self.accumulate
                self._optimizer_step()
                if probe is not None:
                    loss = self._probe_loss(*probe)
                # Every process must take the same steps and stop at the same one: all judge the mean loss.
                self.step, self.loss = step + 1, distributed.mean_across(loss)
                lrs.append(lr)
                losses.append(self.loss)
                self._call("after_batch")
                smoothed = schedule.smooth_losses(losses, beta=schedule.LR_FIND_BETA)[-1]
                best = min(best, smoothed)
                if not math.isfinite(self.loss) or (step > 10 and smoothed > diverge * best):
                    break
        finally:
            self._call("after_fit")
            self.model.load_state_dict(saved_model)
            self.opt.load_state_dict(saved_opt)
            if saved_scaler is not None:
                self.scaler.load_state_dict(saved_scaler)
            torch.set_rng_state(saved_rng[0])
            random.setstate(saved_rng[1])
            np.random.set_state(saved_rng[2])
            if saved_cuda is not None:
                torch.cuda.set_rng_state_all(saved_cuda)
            if saved_loader_rng is not None:
                loader_rng.set_state(saved_loader_rng)
            if saved_view_rng is not None:
                view_rng.set_state(saved_view_rng)
            self.opt.zero_grad(set_to_none=True)
        self.timings["lr_find"] = self.timings.get("lr_find", 0.0) + time.perf_counter() - started
        finite = [(lr, loss) for lr, loss in zip(lrs, losses) if math.isfinite(loss)]
        if len(finite) < 3:
            raise ImgtuneError("the lr finder diverged at once; check the data, or set --lr yourself")
        lrs, losses = [p[0] for p in finite], [p[1] for p in finite]
        suggestion = schedule.suggest_lr(lrs, losses)
        if probe is not None:
            suggestion["suggested"] = schedule.head_on_features_lr(suggestion)
        return LRFinderResult(lrs, losses, suggestion)

    # --- evaluation -------------------------------------------------------------------------------

    def get_preds(self, dl=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Probabilities, targets and per-item losses over ``dl`` (the validation set by default; from
        its cached features while the body is frozen)."""
        if dl is None:
            self.model.eval()  # the whole model, also when only its head runs on cached features
            with self._on_features():
                return self._get_preds(self.valid_dl)
        return self._get_preds(dl)

    @torch.no_grad()
    def _get_preds(self, dl) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.model.eval()
        probs, targets, losses = [], [], []
        for xb, yb in dl:
            xb, yb = xb.to(self.device, memory_format=self.memory_format), yb.to(self.device)
            with self._autocast():
                logits = self.model(xb).float()
            probs.append(logits.softmax(1).cpu())
            targets.append(yb.cpu())
            losses.append(nn.functional.cross_entropy(logits, yb, reduction="none").cpu())
        # Under torchrun each process predicted its shard of the validation set: put it back together.
        return distributed.gather_by_index(dl, torch.cat(probs), torch.cat(targets), torch.cat(losses))

    def validate(self, dl=None) -> dict[str, float]:
        """``valid_loss``, ``accuracy`` and ``error_rate`` over ``dl`` (the validation set by default)."""
        probs, targets, losses = self.get_preds(dl)
        accuracy = (probs.argmax(1) == targets).float().mean().item()
        return dict(valid_loss=losses.mean().item(), accuracy=accuracy, error_rate=1.0 - accuracy)

    @property
    def history(self) -> list[dict]:
        """One dict per epoch trained: epoch, phase, train_loss, valid_loss, accuracy, error_rate, seconds."""
        return self.history_cb.records

    def save(self, run_dir, **extra) -> "Learner":
        """Write the model bundle (``model.safetensors`` + ``model.json``) to ``run_dir``."""
        from imgtune.deploy.bundle import save_bundle

        save_bundle(self, run_dir, **extra)
        return self


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _cycle(loader):
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise ImgtuneError("the training set yields no batches; add images or lower --bs")
