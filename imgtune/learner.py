"""The Learner: a model, its data and an optimizer, with the lesson's training recipe.

The training step is one visible loop (:meth:`Learner._train_epoch`): forward, loss, backward,
step, with the learning rate and momentum computed by pure functions from :mod:`imgtune.schedule`.
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

from imgtune import schedule
from imgtune.callbacks import History, ProgressCallback
from imgtune.data import ImageData
from imgtune.errors import ImgtuneError
from imgtune.models import DEFAULT_ARCH, IMAGENET, NO_WEIGHTS, create_model, get_backbone, layer_groups


#: Optimizer steps the automatic epoch counts of :meth:`Learner.fine_tune` aim for, per phase.
AUTO_STEPS = {"frozen": 60, "unfrozen": 80}


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
    ):
        self.device = torch.device(device) if device else default_device()
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
                                          num_workers=num_workers, seed=seed, pin_memory=device.type == "cuda")
        config = dict(arch=arch, timm_name=backbone.timm_name, weights=str(weights), size=size, resize=resize,
                      mean=list(mean), std=list(std), bs=bs, augment=augment, seed=seed)
        callbacks = ([ProgressCallback()] if progress else []) + list(callbacks)
        learner = cls(model, train_dl, valid_dl, classes=data.classes,
                      groups=layer_groups(model, backbone.body_groups), device=device, callbacks=callbacks,
                      config=config, **kwargs)
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

    def _backward_step(self, loss: torch.Tensor) -> None:
        """Backward and optimizer step; float16 needs its loss scaled so small gradients survive."""
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            self.opt.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()

    def _batch_loss(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        xb = xb.to(self.device, non_blocking=True, memory_format=self.memory_format)
        yb = yb.to(self.device, non_blocking=True)
        with self._autocast():
            return self.loss_func(self.model(xb).float(), yb)

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
        lrs = schedule.discriminative_lrs(lr_max, len(self.groups))
        self.phase, self.epochs, self.step = phase, epochs, 0
        self.total_steps = epochs * len(self.train_dl)
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
        """One pass over the training data; returns the mean training loss."""
        self._train_mode()
        total, count = 0.0, 0
        for xb, yb in self.train_dl:
            lrs, momentum = hyper(self.step / max(1, self.total_steps))
            self._set_hyper(lrs, momentum)
            loss = self._batch_loss(xb, yb)
            self._backward_step(loss)
            self.step += 1
            self.loss = loss.item()
            total, count = total + self.loss * len(yb), count + len(yb)
            self._call("after_batch")
            if self.should_stop:
                break
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
        optimizer steps :data:`AUTO_STEPS` gives each phase (at least 1 frozen, 2 unfrozen).
        """
        per_epoch = len(self.train_dl)
        if freeze_epochs is None:
            freeze_epochs = schedule.auto_epochs(per_epoch, min_steps=AUTO_STEPS["frozen"], min_epochs=1)
        if epochs is None:
            epochs = schedule.auto_epochs(per_epoch, min_steps=AUTO_STEPS["unfrozen"], min_epochs=2)
        self.freeze()
        if base_lr is None:
            base_lr = self.lr_find().suggested
        if isinstance(base_lr, (int, float)):
            head_lr, rates = float(base_lr), (base_lr / 2 / lr_mult, base_lr / 2)
        else:
            head_lr, rates = float(base_lr[1]), (float(base_lr[0]), float(base_lr[1]))
        self.config["lr"] = {"frozen": head_lr, "unfrozen": list(rates)}
        self.fit_one_cycle(freeze_epochs, head_lr, pct_start=0.99, phase="frozen")
        self.unfreeze()
        self.fit_one_cycle(epochs, rates, pct_start=0.3, div=5.0, phase="unfrozen")
        return self

    # --- lr finder --------------------------------------------------------------------------------

    def lr_find(self, start_lr: float = 1e-7, end_lr: float = 10.0, num_steps: int = 100,
                diverge: float = 4.0) -> LRFinderResult:
        """Sweep the learning rate exponentially, one batch per step, until the loss diverges.

        The model's weights, its BatchNorm statistics, the optimizer state and the random number
        generators are restored afterwards, bit for bit.

        Returns:
            An :class:`LRFinderResult`; its ``suggested`` rate follows ``schedule.suggest_lr``.
        """
        saved_model = copy.deepcopy(self.model.state_dict())
        saved_opt = copy.deepcopy(self.opt.state_dict())
        saved_scaler = self.scaler.state_dict() if self.scaler is not None else None
        saved_rng = torch.get_rng_state(), random.getstate(), np.random.get_state()
        saved_cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        # The train loader shuffles with its own generator; without restoring it, the fit after
        # lr_find would see other batches than a fit without it.
        loader_rng = getattr(self.train_dl, "generator", None)
        saved_loader_rng = loader_rng.get_state() if loader_rng is not None else None
        started = time.perf_counter()
        lrs, losses = [], []
        self.phase, self.epochs, self.step, self.total_steps, self.should_stop = "lr_find", 1, 0, num_steps, False
        self._call("before_fit")
        try:
            self._train_mode()
            best = math.inf
            batches = _cycle(self.train_dl)
            for step in range(num_steps):
                lr = schedule.lr_find_lr(step, num_steps, start_lr=start_lr, end_lr=end_lr)
                self._set_hyper([lr] * len(self.groups), None)
                xb, yb = next(batches)
                loss = self._batch_loss(xb, yb)
                self._backward_step(loss)
                self.step, self.loss = step + 1, loss.item()
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
            self.opt.zero_grad(set_to_none=True)
        self.timings["lr_find"] = self.timings.get("lr_find", 0.0) + time.perf_counter() - started
        finite = [(lr, loss) for lr, loss in zip(lrs, losses) if math.isfinite(loss)]
        if len(finite) < 3:
            raise ImgtuneError("the lr finder diverged at once; check the data, or set --lr yourself")
        lrs, losses = [p[0] for p in finite], [p[1] for p in finite]
        return LRFinderResult(lrs, losses, schedule.suggest_lr(lrs, losses))

    # --- evaluation -------------------------------------------------------------------------------

    @torch.no_grad()
    def get_preds(self, dl=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Probabilities, targets and per-item losses over ``dl`` (the validation set by default)."""
        self.model.eval()
        probs, targets, losses = [], [], []
        for xb, yb in dl if dl is not None else self.valid_dl:
            xb, yb = xb.to(self.device, memory_format=self.memory_format), yb.to(self.device)
            with self._autocast():
                logits = self.model(xb).float()
            probs.append(logits.softmax(1).cpu())
            targets.append(yb.cpu())
            losses.append(nn.functional.cross_entropy(logits, yb, reduction="none").cpu())
        return torch.cat(probs), torch.cat(targets), torch.cat(losses)

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
        from imgtune.export import save_bundle

        save_bundle(self, run_dir, **extra)
        return self


def _cycle(loader):
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise ImgtuneError("the training set yields no batches; add images or lower --bs")
