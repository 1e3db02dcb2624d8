"""Where a learner computes: the device, mixed precision (autocast and loss scaling), and the advice for
a batch that does not fit in memory.

These are small objects beside the training loop, as Lightning Fabric's precision plugins are: the loop
asks :class:`Precision` to autocast, to run backward and to step, and never looks at dtypes or scalers.
"""

from __future__ import annotations

import contextlib
import math

import torch

from imgtune.errors import ImgtuneError
from imgtune.train import distributed


def default_device() -> torch.device:
    """CUDA if present, else Apple's MPS, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class Precision:
    """Mixed precision on a CUDA device: bfloat16 where the GPU has it (no loss scaling needed), else
    float16 with a GradScaler. Elsewhere, or with ``mixed=False``, plain float32.

    Args:
        device: the device the model trains on.
        mixed: autocast on CUDA (``None``: on CUDA, yes).
    """

    def __init__(self, device: torch.device, mixed: bool | None = None):
        mixed = device.type == "cuda" if mixed is None else mixed
        self.dtype: torch.dtype | None = None
        if mixed and device.type == "cuda":
            self.dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None

    def autocast(self):
        """The context a forward pass runs in (a no-op in float32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of ``loss``, scaled first for float16 so small gradients do not underflow."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, opt: torch.optim.Optimizer) -> None:
        """Bring the gradients back to their true scale (before clipping them)."""
        if self.scaler is not None:
            self.scaler.unscale_(opt)

    def step(self, opt: torch.optim.Optimizer) -> None:
        """One optimizer step on the accumulated gradients (skipped by the GradScaler if they overflowed)."""
        if self.scaler is None:
            opt.step()
        else:
            self.scaler.step(opt)
            self.scaler.update()


def out_of_memory_error(learner, xb: torch.Tensor, yb: torch.Tensor) -> ImgtuneError:
    """The error for a batch that does not fit: tries halves of it (forward and backward on the bare
    model, weights untouched) and names the largest that fits, with the --accumulate that keeps the
    effective batch. We do not retry by ourselves: a silently smaller batch would change the run's
    learning-rate semantics and results.

    Args:
        learner: the :class:`~imgtune.train.learner.Learner` whose step ran out of memory.
        xb, yb: the micro-batch that did not fit.

    Returns:
        A one-line :class:`ImgtuneError` to raise.
    """
    learner.opt.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    batch, fits = len(yb), 0
    trial = batch // 2
    while trial >= 1 and not fits:
        try:
            _loss(learner, xb[:trial], yb[:trial]).backward()
            fits = trial
        except torch.cuda.OutOfMemoryError:
            trial //= 2
        learner.opt.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    where = f"out of memory on {learner.device} in the {learner.phase} phase with a batch of {batch} images of " \
            f"{xb.shape[-1]} px" + (" per process" if distributed.world_size() > 1 else "")
    if not fits:
        return ImgtuneError(f"{where}, and even one image does not fit; use a smaller `size` or `arch`")
    accumulate = learner.accumulate * math.ceil(batch / fits)
    before, after = [n * distributed.world_size() for n in (batch * learner.accumulate, fits * accumulate)]
    effective = f"the same effective batch of {after}" if after == before else f"effective batch {after}, was {before}"
    return ImgtuneError(f"{where}; a batch of {fits} fits: rerun with `bs={fits}` `accumulate={accumulate}`"
                        f" ({effective})")


def _loss(learner, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    """The loss of a batch on the bare model (no DDP wrapper), as a training step computes it."""
    xb = xb.to(learner.device, non_blocking=True, memory_format=learner.memory_format)
    yb = yb.to(learner.device, non_blocking=True)
    with learner.precision.autocast():
        return learner.loss_func(learner.model(xb).float(), yb)
