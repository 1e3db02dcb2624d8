"""The Learner: a model, its data and an optimizer, with the lesson's training recipe.

The training step is one function, :meth:`Learner.train_step`: the schedule's rates, forward, loss,
backward, optional gradient clipping and the optimizer step. The rates come from the pure functions of
:mod:`imgtune.train.schedule`; precision (:mod:`imgtune.train.device`), the DDP wrapper
(:mod:`imgtune.train.distributed`), the head on cached features (:mod:`imgtune.train.features`) and the
lr finder (:mod:`imgtune.train.lr_find`) are objects and context managers beside the loop, and the
freezing policy (:mod:`imgtune.train.freezing`) and evaluation (:mod:`imgtune.train.evaluate`) functions.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from imgtune.data import shards
from imgtune.data.loaders import ImageData
from imgtune.deploy.bundle import save_bundle
from imgtune.errors import ImgtuneError
from imgtune.models import DEFAULT_ARCH, IMAGENET
from imgtune.train import build, checkpoint, distributed, evaluate, freezing, partial, schedule
from imgtune.train.balance import balance_power, loss_function
from imgtune.train.callbacks import History
from imgtune.train.config import TrainConfig
from imgtune.train.device import Precision, adamw, configure_cuda, default_device, out_of_memory_error, to_device
from imgtune.train.features import FeatureSource, HeadOnFeatures, head_on_features, supports_features
from imgtune.train.lr_find import LRFinderResult, find_lr


class Learner:
    """Fine-tunes a model on labelled images.

    Build one with :meth:`from_data`. The model's parameters are split into layer groups, input side
    first and the head last; ``freeze_to(n)`` trains only groups ``n`` onwards, and ``bn_stats``
    (``"frozen"`` or ``"train"``) says what BatchNorm does in unfrozen groups (see
    :mod:`imgtune.train.freezing`; :meth:`from_data` picks ``"train"`` for ``weights="none"``).
    ``accumulate`` micro-batches make one optimizer step (under torchrun the global batch is
    bs x processes x accumulate); ``max_grad_norm`` clips the gradients' global norm (off by default).

    On CUDA: ``precision`` (``"auto"``, ``"bf16"``, ``"fp16"``, ``"fp32"``; see
    :func:`imgtune.train.device.choose_precision`; ``mixed_precision=False`` is fp32), cuDNN autotuning
    and TF32, fused AdamW, and with ``compile_model`` the training step's network through
    ``torch.compile`` (allowed off CUDA too, where it costs more to start than it saves on a short run).
    ``normalize`` normalises uint8 picture batches on the device (:class:`imgtune.data.loaders.DeviceNormalize`:
    what :meth:`from_data`'s CUDA loaders send).

    ``balance`` weighs the training loss by inverse class frequency, to a power (:mod:`imgtune.train.balance`:
    ``True`` 1, ``"mild"`` 0.25, ``False`` plain cross-entropy; :meth:`from_data` defaults to mild); ``tta``
    computes validation predictions as the mean probabilities of each picture and its mirror image
    (:func:`imgtune.train.evaluate.predict`). Both are recorded in the config (``balance``, ``tta``).

    Args:
        model: the network; ``train_dl`` and ``valid_dl``: its loaders of ``(images, targets)``.
        classes: the class names, in the order of the model's outputs.
        groups: the parameters in layer groups, input side first (default: one group of them all).
        wd: AdamW's weight decay.
        device, mixed_precision, precision, channels_last, compile_model: where and how the steps run.
        bn_stats: ``"frozen"`` or ``"train"``: BatchNorm statistics in the unfrozen groups.
        callbacks: more callbacks (a :class:`History` is always there).
        config: the training config recorded in the bundle.
        features: cached backbone features the head trains on while the body is frozen.
        accumulate, sync_bn, max_grad_norm: micro-batches per step, synchronised BatchNorm under
            torchrun, gradient clipping.
        normalize, balance, tta: as described above.
    """

    def __init__(self, model: nn.Module, train_dl, valid_dl, *, classes: Sequence[str],
                 groups: list[list[nn.Parameter]] | None = None, wd: float = 0.01,
                 device: str | torch.device | None = None, mixed_precision: bool | None = None,
                 channels_last: bool = True, bn_stats: str = "frozen", callbacks: Iterable = (),
                 config: TrainConfig | dict | None = None, features: FeatureSource | None = None,
                 accumulate: int = 1, sync_bn: bool = False, max_grad_norm: float | None = None,
                 precision: str = "auto", compile_model: bool = False, normalize=None, balance: bool | float | str = False,
                 tta: bool = False):
        self.device = torch.device(device) if device else default_device()
        if accumulate < 1:
            raise ImgtuneError(f"`accumulate` must be 1 or more, not {accumulate}")
        if sync_bn:
            model = distributed.sync_batchnorm(model, self.device)  # keeps the parameters `groups` holds
        # channels_last makes convolutions 1.5-2.5x faster on CPU (oneDNN) and on GPU tensor cores.
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=self.memory_format)
        self.train_dl, self.valid_dl = train_dl, valid_dl
        self.classes = list(classes)
        self.groups = groups if groups is not None else [list(model.parameters())]
        train_ds = getattr(train_dl, "dataset", None)
        self.loss_func = loss_function(train_ds, len(self.classes), balance=balance).to(self.device)
        self.tta = tta
        self.opt = adamw([{"params": g} for g in self.groups], device=self.device, lr=1e-3, weight_decay=wd)
        self.precision = Precision(self.device, mixed_precision, precision)
        if self.device.type == "cuda":
            configure_cuda(self.precision.name)
        self.normalize, self.compile_model, self._compiled = normalize, compile_model, None
        self.parallel = distributed.DataParallel(self.device)
        self.history_cb = History()
        self.callbacks = [self.history_cb, *callbacks]
        if bn_stats not in freezing.BN_STATS:
            raise ValueError(f"bn_stats must be 'frozen' or 'train', not {bn_stats!r}")
        self.bn_stats, self.accumulate, self.max_grad_norm = bn_stats, accumulate, max_grad_norm
        self.config = config = TrainConfig.copy_of(config, source="Learner(config=...)")  # its own: records lr
        config.accumulate, config.world_size, config.sync_bn = accumulate, distributed.world_size(), sync_bn
        weighted = getattr(self.loss_func, "weight", None) is not None  # balanced classes: plain cross-entropy
        config.balance = balance_power(balance) if weighted else None  # recorded when on, as tta
        config.tta = evaluate.TTA_FLIP if tta else None
        self.timings: dict[str, float] = {}
        self.phase, self.epoch, self.epochs, self.step, self.total_steps = "fit", 0, 0, 0, 0
        self.loss, self.epoch_metrics, self.should_stop = math.nan, {}, False
        # Cached features for the frozen phase (see imgtune.train.features); only for a timm-style model.
        self.features = features if features is not None and supports_features(model) else None
        self._epochs_trained = 0
        self.plan: dict | None = None  # fine_tune's epochs and rates, kept in checkpoints
        self.valid_preds: tuple[torch.Tensor, torch.Tensor] | None = None  # the last validate()'s

    @classmethod
    def from_data(cls, data: ImageData, arch: str = DEFAULT_ARCH, *, weights: str | None = IMAGENET,
                  size: int | None = None, resize: str = "crop", bs: int | None = None, augment: bool = True,
                  num_workers: int | None = None, seed: int = 42, device: str | None = None, progress: bool = True,
                  callbacks: Iterable = (), feature_cache: bool = True, cache: bool = True, cache_dir=None,
                  balance: bool | float | str = "mild", **kwargs) -> Learner:
        """A learner for ``data`` with a pretrained ``arch`` and a new head, frozen as in the lesson.

        Args:
            data: the images (see :func:`imgtune.load_data`).
            arch: a registry name (``imgtune.REGISTRY``) or any timm model name.
            weights: ``"imagenet"``, ``"none"``, a weights file or a run folder (its ``model.json`` is checked).
            size, resize: image side in pixels (default: the backbone's, 224 for most); ``"crop"``,
                ``"squish"`` or ``"pad"``.
            bs: batch size per step (default: :func:`imgtune.train.device.default_batch_size`: 32 off
                CUDA, more on a GPU with the memory for it; the lr finder sweeps with it too).
            augment: augment training images (flip, rotate, zoom, lighting).
            num_workers: loader processes (default: one per core).
            seed: seeds the head's initialisation, the shuffling and the augmentation.
            device: ``"cuda"``, ``"mps"``, ``"cpu"``; default picks the fastest present.
            progress, callbacks: show progress bars / lines; more callbacks.
            feature_cache: while the body is frozen, train the head on features computed once per
                image (see :mod:`imgtune.train.features`) instead of running the body every step.
            cache: keep presized pictures (and features) on disk, reused by later epochs and runs.
            cache_dir: the cache folder (default ``$IMGTUNE_CACHE`` or ``~/.cache/imgtune``).
            balance: class weights of the loss (see :mod:`imgtune.train.balance`): ``"mild"`` (inverse
                class frequency to the power 0.25; plain cross-entropy on balanced classes), ``True``
                (each class counts alike), ``False`` (plain cross-entropy) or a power from 0 to 1.
            kwargs: ``tune_stages`` (``"auto"``, default, or a count: on a CPU, the body stages
                :meth:`fine_tune` trains on cached activations after the head; see
                :mod:`imgtune.train.partial`) and the other options of :class:`Learner` (``bn_stats``,
                ``accumulate``, ...).
        """
        return build.from_data(cls, data, arch, weights=weights, size=size, resize=resize, bs=bs, augment=augment,
                               num_workers=num_workers, seed=seed, device=device, progress=progress,
                               callbacks=callbacks, feature_cache=feature_cache, cache=cache, cache_dir=cache_dir,
                               balance=balance, **kwargs)

    # --- freezing ---------------------------------------------------------------------------------

    def freeze_to(self, n: int) -> None:
        """Train layer groups ``n`` onwards only (negative ``n`` counts from the head).

        Args:
            n: the first trained group (0: all, ``-1``: the head only).
        """
        freezing.freeze_to(self.groups, n)

    def freeze(self) -> None:
        """Train the head only."""
        self.freeze_to(-1)

    def unfreeze(self) -> None:
        """Train every layer group."""
        self.freeze_to(0)

    def body_frozen(self) -> bool:
        """Whether only the head trains (every layer group but the last is frozen)."""
        return freezing.body_frozen(self.groups)

    def train_mode(self) -> None:
        """Train mode, except BatchNorm layers that keep their running statistics (see ``bn_stats``)."""
        freezing.train_mode(self.model, self.bn_stats)

    # --- training ---------------------------------------------------------------------------------

    def call(self, event: str, *args) -> None:
        """Call ``event(learner, *args)`` on every callback that has such a method.

        Args:
            event: ``"before_fit"``, ``"after_batch"``, ``"after_epoch"``, ``"after_fit"``, ``"on_features"``.
            args: passed on after the learner.
        """
        for cb in self.callbacks:
            method = getattr(cb, event, None)
            if method is not None:
                method(self, *args)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch: the training batches, ``accumulate`` per step (a shorter last step)."""
        return math.ceil(len(self.train_dl) / self.accumulate)

    @property
    def loss(self) -> float:
        """The last step's loss (for callbacks; on a GPU, reading it waits for that step to finish)."""
        return float(self._loss)

    @loss.setter
    def loss(self, value) -> None:
        self._loss = value  # a float, or a 0-d tensor on the device, not read back until asked for

    def train_step(self, micro_batches: Iterable, count: int, lrs: Sequence[float],
                   momentum: float | None = None, *, on_device: bool = False) -> list[tuple[float, int]]:
        """One optimizer step at rates ``lrs`` (one per layer group) and ``momentum`` (Adam's beta1, ``None``:
        unchanged) over ``micro_batches``, the step's ``count`` ``(images, targets)`` pairs (read one at a
        time). Each loss is scaled by 1/count, so the summed gradients equal one batch of them all; under
        DDP only the last averages gradients across processes. Returns each micro-batch's unscaled loss
        and size (``on_device``: the losses as 0-d float32 tensors on the device, so that the CPU does
        not wait for the GPU to finish the step); a CUDA out-of-memory error becomes an ImgtuneError
        naming a batch that fits.

        Args:
            micro_batches: ``count`` ``(images, targets)`` pairs.
            count: how many.
            lrs: one learning rate per layer group.
            momentum: Adam's beta1 for this step (``None``: unchanged).
            on_device: return the losses as device tensors.

        Returns:
            ``(loss, size)`` per micro-batch.
        """
        for group, lr in zip(self.opt.param_groups, lrs):  # the schedule
            group["lr"] = lr
            if momentum is not None:
                group["betas"] = (momentum, group["betas"][1])
        self.opt.zero_grad(set_to_none=True)
        model = self._training_module()  # the model, its DistributedDataParallel wrapper, or their compiled form
        losses, out_of_memory = [], False
        try:
            for i, (xb, yb) in enumerate(micro_batches):
                losses.append((self._micro_step(model, xb, yb, count, sync=i == count - 1), len(yb)))
        except torch.cuda.OutOfMemoryError:
            # Advised below: the failed micro-step's activations lived in _micro_step's frame, freed with
            # the traceback when this block ends, so halves of the batch are tried in the memory it held.
            out_of_memory = True
        if out_of_memory:
            raise out_of_memory_error(self, xb, yb)
        if self.max_grad_norm is not None:
            self.precision.unscale(self.opt)
            nn.utils.clip_grad_norm_([p for group in self.groups for p in group], self.max_grad_norm)
        self.precision.step(self.opt)  # the optimizer step
        return losses if on_device else [(loss.item(), n) for loss, n in losses]

    def _micro_step(self, model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, count: int, sync: bool) -> torch.Tensor:
        """Forward, loss and backward of one micro-batch of a step of ``count``; returns its loss, detached."""
        x = to_device(xb, self.device, self.memory_format, self.normalize)
        y = yb.to(self.device, non_blocking=True)
        with self.parallel.no_sync(model, sync=sync):
            with self.precision.autocast():
                loss = self.loss_func(model(x).float(), y)  # forward, loss
            self.precision.backward(loss * (1.0 / count) if count != 1 else loss)  # backward
        return loss.detach()

    def _training_module(self) -> nn.Module:
        """What a training step calls: the model or its DDP wrapper, through ``torch.compile`` with
        ``compile_model`` (compiled once per module; not the head on cached features, whose step costs
        less than the compilation)."""
        module = self.parallel.module(self.model)
        if not self.compile_model or isinstance(self.model, HeadOnFeatures):
            return module
        if self._compiled is None or self._compiled[0] is not module:
            self._compiled = (module, torch.compile(module))
        return self._compiled[1]

    def fit_one_cycle(self, epochs: int, lr_max: float | Sequence[float] = 1e-3, *, pct_start: float = 0.25,
                      div: float = 25.0, div_final: float = 1e5, moms: tuple[float, float, float] = (0.95, 0.85, 0.95),
                      phase: str = "fit", resume: dict | None = None) -> Learner:
        """Train ``epochs`` epochs with the one-cycle policy (see :func:`imgtune.train.schedule.one_cycle`).

        ``lr_max`` is one rate or a pair ``(low, high)`` spread geometrically over the layer groups.
        ``resume`` continues a fit a checkpoint interrupted (see :func:`imgtune.train.checkpoint.resume_points`):
        ``{"epoch": epochs done, "step": steps done, "random": random state}``, with the weights and
        optimizer already restored; the random state is put back once the fit has made its loaders.

        Args:
            epochs: epochs to train (below 1: nothing happens).
            lr_max: the peak learning rate, or ``(low, high)`` for discriminative rates.
            pct_start: the fraction of the steps spent warming up.
            div, div_final: the start rate is ``lr_max / div``, the final one ``lr_max / div_final``.
            moms: Adam's beta1 at the start, the peak and the end.
            phase: the name recorded in the history (``"frozen"``, ``"unfrozen"``, ``"fit"``).
            resume: as above.

        Returns:
            The learner (``self``).
        """
        if epochs < 1:
            return self
        with head_on_features(self):
            rates = functools.partial(schedule.one_cycle, lr_max=schedule.discriminative_lrs(lr_max, len(self.groups)),
                                      pct_start=pct_start, div=div, div_final=div_final, moms=moms)
            self.phase, self.epochs, self.step = phase, epochs, resume["step"] if resume else 0
            self.total_steps = epochs * self.steps_per_epoch
            self.should_stop = False
            started = time.perf_counter()
            self.call("before_fit")
            if resume is not None:
                checkpoint.restore_random_state(self, resume["random"])
            for epoch in range(resume["epoch"] + 1 if resume else 1, epochs + 1):
                self.epoch, epoch_start = epoch, time.perf_counter()
                train_loss = self._train_epoch(rates)
                self.epoch_metrics = dict(epoch=epoch, phase=phase, train_loss=train_loss, **self.validate(),
                                          seconds=time.perf_counter() - epoch_start)
                self.call("after_epoch")
                if self.should_stop:
                    break
            self.call("after_fit")
            self.timings[phase] = self.timings.get(phase, 0.0) + time.perf_counter() - started
        return self

    def _train_epoch(self, rates) -> float:
        """One pass over the training data, ``rates(progress)`` giving each step's rates and momentum;
        returns the mean training loss (over every process)."""
        self.train_mode()
        shards.set_epoch(self.train_dl, self._epochs_trained)
        shards.record_shard(self.train_dl, phase=self.phase, epoch=self._epochs_trained)
        self._epochs_trained += 1
        # The losses add up on the device, read back once at the end of the epoch; in float64, where a
        # float32 loss converts exactly, the sums are the ones Python floats give.
        total, count = torch.zeros((), dtype=torch.float64, device=_sum_device(self.device)), 0
        for micro, micro_batches in _steps(self.train_dl, self.accumulate):
            losses = self.train_step(micro_batches, micro, *rates(self.step / max(1, self.total_steps)), on_device=True)
            step_loss = 0.0
            for loss, n in losses:
                loss = loss.to(total.device, torch.float64)
                step_loss += loss / micro
                total, count = total + loss * n, count + n
            self.step, self.loss = self.step + 1, step_loss
            self.call("after_batch")
            if self.should_stop:
                break
        distributed.broadcast_buffers(self.model)
        total, count = distributed.sum_across([total, count])
        return total / max(1, count)

    def fine_tune(self, epochs: int | None = None, base_lr: float | Sequence[float] | None = None, *,
                  freeze_epochs: int | None = None, lr_mult: float = 100.0, resume: dict | None = None) -> Learner:
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

        On a CPU with partial fine-tuning planned (``tune_stages`` of :meth:`from_data`, see
        :mod:`imgtune.train.partial`), step 2 trains only the body's last stages and the head, for
        ``epochs`` (``None``: as many as fit its time budget) on the frozen stages' cached activation
        maps (``phase="partial"``); a given pair ``(low, high)`` are then its rates. With
        ``tune_stages="auto"``, a given ``epochs`` unfreezes the whole network as asked instead.

        ``resume`` (a checkpoint, see :mod:`imgtune.train.checkpoint`) continues a run that stopped: its
        weights, optimizer, history and random state come back and training goes on after the last epoch
        it saved, with its epochs and rates (``epochs`` and ``freeze_epochs`` must then agree or be ``None``).

        Args:
            epochs: unfrozen epochs (``None``: automatic).
            base_lr: the rate, a ``(low, high)`` pair, or ``None`` for the lr finder's suggestion.
            freeze_epochs: head-only epochs first (``None``: automatic).
            lr_mult: the head's rate over the first layers' in the unfrozen phase.
            resume: a checkpoint to continue from.

        Returns:
            The learner (``self``).

        Raises:
            ImgtuneError: ``resume`` with other epochs than the checkpoint's run.
        """
        self.freeze()
        if resume is not None:
            plan = checkpoint.restore_training_state(self, resume)
            if epochs not in (None, plan["epochs"]) or freeze_epochs not in (None, plan["freeze_epochs"]):
                raise ImgtuneError(f"the checkpoint's run trains {plan['freeze_epochs']} frozen and {plan['epochs']}"
                                   " unfrozen epochs; resume with the same `freeze_epochs` and `epochs`")
            freeze_epochs, epochs = plan["freeze_epochs"], plan["epochs"]
            head_lr, rates = plan["lr"]["frozen"], tuple(plan["lr"]["unfrozen"])
            stages = build.resume_tune_stages(self, plan)
        else:
            asked = epochs
            freeze_epochs, epochs, head_lr, rates = build.plan(self, epochs, base_lr, freeze_epochs, lr_mult)
            # partial fine-tuning instead of unfreezing (imgtune.train.partial); "auto" only with epochs=None
            stages = build.tune_stages(self, epochs_given=asked is not None)
            rates = build.partial_rates(self, base_lr) if stages else rates
        self.config.lr = {"frozen": head_lr, "unfrozen": list(rates)}
        self.plan = dict(freeze_epochs=freeze_epochs, epochs=epochs, lr=dict(self.config.lr))
        if stages:  # only then: a checkpoint's plan is as it was without partial fine-tuning
            self.plan["tune_stages"] = stages
        second = "partial" if stages else "unfrozen"
        points = checkpoint.resume_points(resume, [("frozen", freeze_epochs), (second, epochs)]) if resume else {}
        if points.get("frozen") is not False:
            self.fit_one_cycle(freeze_epochs, head_lr, pct_start=0.99, phase="frozen", resume=points.get("frozen"))
        if epochs > 0 and stages:
            if points.get("partial") is not False:
                partial.fit(self, stages, epochs, rates, resume=points.get("partial"))
        elif epochs > 0:
            self.unfreeze()
            if points.get("unfrozen") is not False:
                self.fit_one_cycle(epochs, rates, pct_start=0.3, div=5.0, phase="unfrozen",
                                   resume=points.get("unfrozen"))
        return self

    def auto_unfrozen_epochs(self) -> int:
        """The unfrozen epochs ``fine_tune(epochs=None)`` trains (see :func:`imgtune.train.build.auto_unfrozen_epochs`)."""
        return build.auto_unfrozen_epochs(self)

    def lr_find(self, start_lr: float = 1e-7, end_lr: float = 10.0, num_steps: int = 100,
                diverge: float = 4.0) -> LRFinderResult:
        """Sweep the learning rate exponentially, one step per rate, until the loss diverges; weights,
        BatchNorm statistics, optimizer and random generators are restored bit for bit afterwards.

        Args:
            start_lr, end_lr: the range swept.
            num_steps: steps (rates) at most.
            diverge: stop once the smoothed loss exceeds this many times its minimum.

        Returns:
            An :class:`LRFinderResult` (see :func:`imgtune.train.lr_find.find_lr`).
        """
        return find_lr(self, start_lr, end_lr, num_steps, diverge)

    # --- evaluation -------------------------------------------------------------------------------

    def get_preds(self, dl=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Probabilities, targets and per-item losses over ``dl`` (the validation set by default; from
        its cached features while the body is frozen); with ``tta``, the mean over picture and mirror.

        Args:
            dl: a loader of ``(images, targets)`` (default: the validation set).

        Returns:
            ``(probs, targets, losses)``: ``(N, C)``, ``(N,)`` and ``(N,)`` CPU tensors.
        """
        if dl is None:
            self.model.eval()  # the whole model, also when only its head runs on cached features
            with head_on_features(self):
                return self.get_preds(self.valid_dl)
        return evaluate.predict(self.model, dl, device=self.device, memory_format=self.memory_format,
                                precision=self.precision, normalize=self.normalize, tta=self.tta)

    def validate(self, dl=None) -> dict[str, float]:
        """``valid_loss``, ``accuracy``, ``error_rate``, ``balanced_accuracy`` and ``macro_f1`` over ``dl``
        (the validation set by default; see :func:`imgtune.train.evaluate.metrics`). The validation set's
        probabilities and targets are kept as ``valid_preds`` (for per-class figures without another pass).

        Args:
            dl: a loader of ``(images, targets)`` (default: the validation set).

        Returns:
            The metrics, by name.
        """
        probs, targets, losses = self.get_preds(dl)
        if dl is None:
            self.valid_preds = (probs, targets)
        return evaluate.metrics(probs, targets, losses)

    @property
    def history(self) -> list[dict]:
        """One dict per epoch trained: epoch, phase, train_loss, valid_loss, accuracy, error_rate,
        balanced_accuracy, macro_f1, seconds."""
        return self.history_cb.records

    def plot_losses(self):
        """Train and valid loss and valid accuracy per epoch, as a matplotlib Figure (the report's
        ``training.png``; see :func:`imgtune.explain.figures.plot_training`)."""
        from imgtune.explain.figures import plot_training

        return plot_training(self.history)

    def show_results(self, n: int = 9, *, seed: int = 0):
        """``n`` validation pictures titled predicted / actual, the wrong ones in red, as a Figure
        (see :func:`imgtune.explain.figures.plot_results`).

        Args:
            n: how many pictures.
            seed: picks the pictures.

        Returns:
            A :class:`matplotlib.figure.Figure`.
        """
        from imgtune.explain.figures import plot_results
        from imgtune.explain.interpret import Interpretation

        return plot_results(Interpretation.from_learner(self), n, seed=seed)

    def save(self, run_dir, *, metrics: dict | None = None) -> Learner:
        """Write the model bundle (``model.safetensors`` + ``model.json``) to ``run_dir``.

        Args:
            run_dir: the folder (made if missing; the two files in it are replaced).
            metrics: final metrics recorded in ``model.json``.

        Returns:
            The learner (``self``).
        """
        save_bundle(run_dir, model=self.model, classes=self.classes, config=dict(self.config), metrics=metrics)
        return self


def _sum_device(device: torch.device) -> torch.device:
    """Where float64 sums of losses are kept: on the device, except on Apple's MPS (no float64)."""
    return torch.device("cpu") if device.type == "mps" else device


def _steps(loader, accumulate: int):
    """The loader's batches as optimizer steps: ``(micro-batches in the step, an iterator over them)``.

    The batches are fetched one at a time as the step consumes them, and the loader is left as a plain
    ``for`` loop leaves it: its closing ``next()`` ends the sampler's pass (which draws from the
    loader's generator), so the next epoch shuffles as it would have.
    """
    batches, total = iter(loader), len(loader)
    for start in range(0, total, accumulate):
        yield min(accumulate, total - start), itertools.islice(batches, accumulate)
    next(batches, None)
