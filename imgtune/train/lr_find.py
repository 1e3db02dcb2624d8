"""The learning-rate finder: sweep the rate exponentially over training steps, watch the loss, suggest a rate.

The sweep trains for real, so everything it changes is put back afterwards by one context manager,
:func:`restored_afterwards`: weights and buffers, optimizer, loss scaler and every random number generator.
Training after ``lr_find`` is bit-identical to training without it.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from imgtune.errors import ImgtuneError
from imgtune.train import distributed, rng, schedule
from imgtune.train.features import FeatureDataset, head_on_features

#: Training features the lr finder measures its loss on when the head trains on cached features.
PROBE_SIZE = 1024
#: Steps between the sweep's reads of its losses on one CUDA GPU: the CPU queues that many steps ahead
#: of the GPU, and a divergence is seen at most that many steps late (the steps past it are dropped,
#: so the curve and the suggestion are those of a read after every step; their updates are undone
#: with the rest). Elsewhere, and under torchrun, the losses are read after every step.
SYNC_EVERY = 10


@dataclass
class LRFinderResult:
    """The lr-finder curve (one point per step) and the suggested rates (see ``schedule.suggest_lr``)."""

    lrs: list[float]
    losses: list[float]
    suggestion: dict[str, float] = field(default_factory=dict)

    @property
    def suggested(self) -> float:
        """The rate to train with: ``suggestion["suggested"]``."""
        return self.suggestion["suggested"]

    @classmethod
    def from_metrics(cls, metrics: dict) -> LRFinderResult | None:
        """The curve a run recorded in its ``metrics.json`` (``metrics["lr"]["curve"]``).

        Args:
            metrics: a run's ``metrics.json``, loaded.

        Returns:
            An :class:`LRFinderResult`, or ``None`` when the run had no lr finder (its rate was given).
        """
        curve = (metrics.get("lr") or {}).get("curve")
        if not curve:
            return None
        return cls(curve["lrs"], curve["losses"], metrics["lr"].get("suggestion") or {})

    def plot(self):
        """The curve as a matplotlib Figure: raw and smoothed loss against a log-scale learning rate,
        the suggested, minimum and steepest rates marked.

        Returns:
            A :class:`matplotlib.figure.Figure` (not registered with pyplot: nothing to close).
        """
        from matplotlib.figure import Figure

        smooth = schedule.smooth_losses(self.losses, beta=schedule.LR_FIND_BETA, centered=True)
        fig = Figure(figsize=(6, 4), dpi=100)
        ax = fig.subplots()
        ax.plot(self.lrs, self.losses, color="0.75", linewidth=1, label="loss")
        ax.plot(self.lrs, smooth, color="C0", linewidth=2, label="smoothed")
        for key, color in (("suggested", "C3"), ("minimum", "C1"), ("steepest", "C2")):
            if key in self.suggestion:
                value = self.suggestion[key]
                ax.axvline(value, color=color, linestyle="--", label=f"{key} {value:.2g}")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("training loss")
        ax.set_ylim(min(smooth) - 0.1 * abs(min(smooth)), max(smooth[: max(3, len(smooth) // 4)]) * 1.5)
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        return fig


@contextlib.contextmanager
def restored_afterwards(model: nn.Module, opt: torch.optim.Optimizer, *, scaler=None, loader=None):
    """Snapshot the training state and put it back, bit for bit, when the block ends (also by an error).

    Restored: ``model``'s weights and buffers (BatchNorm statistics), the optimizer's state and
    hyper-parameters, the GradScaler's state, the torch, CUDA, Python and NumPy generators, the
    generator ``loader`` shuffles with and the one its dataset picks cached-feature views with (without
    them the fit after the block would see other batches than a fit without it). The gradients the
    block left are dropped.

    Args:
        model, opt: the model and its optimizer.
        scaler: a ``torch.amp.GradScaler``, or ``None``.
        loader: the training loader, or ``None``.
    """
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    saved_scaler = scaler.state_dict() if scaler is not None else None
    saved_rng = rng.capture(loader)
    try:
        yield
    finally:
        model.load_state_dict(saved_model)
        opt.load_state_dict(saved_opt)
        if saved_scaler is not None:
            scaler.load_state_dict(saved_scaler)
        rng.restore(saved_rng, loader)
        opt.zero_grad(set_to_none=True)


def find_lr(learner, start_lr: float = 1e-7, end_lr: float = 10.0, num_steps: int = 100,
            diverge: float = 4.0) -> LRFinderResult:
    """Sweep ``learner``'s learning rate exponentially, one optimizer step per rate, until the loss diverges.

    Each step is one step of the run's effective batch (``accumulate`` micro-batches). On cached
    features the loss is measured after each step on a fixed sample of training features (see
    :func:`feature_probe`). Everything the sweep changes is restored (:func:`restored_afterwards`).

    Returns:
        An :class:`LRFinderResult`; its ``suggested`` rate follows ``schedule.suggest_lr`` (on cached
        features ``schedule.head_on_features_lr``).

    Raises:
        ImgtuneError: fewer than 3 finite losses (the sweep diverged at once).
    """
    with head_on_features(learner):
        started = time.perf_counter()
        with restored_afterwards(learner.model, learner.opt, scaler=learner.precision.scaler, loader=learner.train_dl):
            lrs, losses, probed = _sweep(learner, start_lr, end_lr, num_steps, diverge)
        learner.timings["lr_find"] = learner.timings.get("lr_find", 0.0) + time.perf_counter() - started
    finite = [(lr, loss) for lr, loss in zip(lrs, losses) if math.isfinite(loss)]
    if len(finite) < 3:
        raise ImgtuneError("the lr finder diverged at once; check the data, or set `lr` yourself")
    lrs, losses = [p[0] for p in finite], [p[1] for p in finite]
    suggestion = schedule.suggest_lr(lrs, losses)
    if probed:
        suggestion["suggested"] = schedule.head_on_features_lr(suggestion)
    return LRFinderResult(lrs, losses, suggestion)


def _sweep(learner, start_lr: float, end_lr: float, num_steps: int, diverge: float):
    """The sweep's steps, with the learner's callbacks told as in a fit (phase ``"lr_find"``).
    Returns the rates, the losses and whether they were measured on a feature probe."""
    learner.phase, learner.epochs, learner.step, learner.total_steps = "lr_find", 1, 0, num_steps
    learner.should_stop = False
    lrs, losses = [], []
    learner.call("before_fit")
    every = _read_every(learner.device)
    try:
        learner.train_mode()
        batches = _cycle(learner.train_dl)
        probe = feature_probe(learner.train_dl, learner.device)
        pending = []  # (rate, loss on the device) of the steps not read back yet
        for step in range(num_steps):
            lr = schedule.lr_find_lr(step, num_steps, start_lr=start_lr, end_lr=end_lr)
            micro = learner.train_step(itertools.islice(batches, learner.accumulate), learner.accumulate,
                                       [lr] * len(learner.groups), on_device=True)
            loss = 0.0
            for micro_loss, _ in micro:  # the loss of the run's effective batch, in float64 as Python's floats
                loss += micro_loss.to(_float64_device(micro_loss), torch.float64) / learner.accumulate
            if probe is not None:
                loss = _probe_loss(learner, *probe)
            if every == 1:
                # Every process must take the same steps and stop at the same one: all judge the mean loss.
                loss = distributed.mean_across(loss)
            learner.step, learner.loss = step + 1, loss
            pending.append((lr, loss))
            learner.call("after_batch")
            if len(pending) == every or step == num_steps - 1:
                diverged = _read_back(pending, lrs, losses, diverge)
                pending = []
                if diverged:
                    break
    finally:
        learner.call("after_fit")
    return lrs, losses, probe is not None


def _read_back(pending: list, lrs: list[float], losses: list[float], diverge: float) -> bool:
    """Append the ``pending`` steps' rates and losses (one read from the device) until the loss diverges:
    not finite, or after 10 steps a smoothed loss above ``diverge`` times the best. Returns whether it did."""
    values = torch.stack([torch.as_tensor(loss, dtype=torch.float64) for _, loss in pending]).tolist()
    for (lr, _), value in zip(pending, values):
        lrs.append(lr)
        losses.append(value)
        smoothed = schedule.smooth_losses(losses, beta=schedule.LR_FIND_BETA)
        if not math.isfinite(value) or (len(losses) > 11 and smoothed[-1] > diverge * min(smoothed)):
            return True
    return False


def _read_every(device: torch.device) -> int:
    """Steps between reads of the sweep's losses (see :data:`SYNC_EVERY`)."""
    return SYNC_EVERY if device.type == "cuda" and not distributed.is_initialized() else 1


def _float64_device(tensor: torch.Tensor) -> torch.device:
    return torch.device("cpu") if tensor.device.type == "mps" else tensor.device  # MPS has no float64


def feature_probe(loader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """On cached features, a fixed sample of training features (the pictures' own view): the lr
    finder then records the loss on it after each step instead of the step's batch loss. The
    curve loses the batch-to-batch noise (large on a hard dataset like elpv, where it dragged the
    suggestion ten times too low), and a head's forward pass over it costs well under a millisecond.

    Returns:
        ``(features, targets)`` on ``device``, or ``None`` when ``loader`` is not over cached features.
    """
    dataset = loader.dataset
    if not isinstance(dataset, FeatureDataset):
        return None
    index = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:PROBE_SIZE]
    return dataset.features[index, 0].to(device), dataset.targets[index].to(device)


@torch.no_grad()
def _probe_loss(learner, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    learner.model.eval()
    loss = learner.loss_func(learner.model(features).float(), targets)
    learner.train_mode()
    return loss


def _cycle(loader):
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise ImgtuneError("the training set yields no batches; add images or lower `bs`")
