"""Where a learner computes: the device, mixed precision (autocast and loss scaling), the CUDA speed
settings, the default batch size, and the advice for a batch that does not fit in memory.

These are small objects beside the training loop, as Lightning Fabric's precision plugins are: the loop
asks :class:`Precision` to autocast, to run backward and to step, and never looks at dtypes or scalers.
"""

from __future__ import annotations

import contextlib
import inspect
import math

import torch

from imgtune.errors import ImgtuneError
from imgtune.train import distributed

#: The values of ``precision`` (``--precision``): ``auto`` is bf16 on GPUs that compute in it natively,
#: fp16 with loss scaling on older GPUs, fp32 elsewhere.
PRECISIONS = ("auto", "bf16", "fp16", "fp32")

#: The batch size off CUDA (and the least on CUDA): the lesson's.
DEFAULT_BS = 32
#: The largest default batch on CUDA; beyond it the lesson's recipe (rates, steps per epoch) is untested.
MAX_DEFAULT_BS = 128
#: Free GPU memory (GiB) per 32 images of 224 px in the default batch: a ResNet50 trains 32 images in
#: about 3 GiB with bf16 autocast, EfficientNet-Lite0 in about 4 GiB; twice that leaves room for the
#: lr finder's snapshot, cuDNN's workspaces and the allocator's fragmentation.
GIB_PER_32_IMAGES = 8.0


def default_device() -> torch.device:
    """CUDA if present, else Apple's MPS, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def native_bf16(device: torch.device) -> bool:
    """Whether the CUDA GPU computes in bfloat16 natively: compute capability 8.0 or above (Ampere on).

    ``torch.cuda.is_bf16_supported()`` also says yes on a T4 or V100 (7.x), where bfloat16 is only
    emulated and several times slower than float16; its ``including_emulation=False`` (newer torch)
    asks the same question as the capability does.
    """
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def choose_precision(device: str | torch.device, precision: str = "auto") -> str:
    """The precision a model computes in on ``device``: ``"bf16"``, ``"fp16"`` or ``"fp32"``.

    Args:
        device: where the model runs.
        precision: one of :data:`PRECISIONS`. ``"auto"``: bf16 on a CUDA GPU with native bfloat16
            (:func:`native_bf16`), fp16 (with a GradScaler when training) on an older one, fp32 off CUDA.

    Raises:
        ImgtuneError: an unknown ``precision``, or bf16/fp16 asked for off CUDA.
    """
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ImgtuneError(f"`precision` must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if device.type != "cuda":
        if precision in ("bf16", "fp16"):
            raise ImgtuneError(f"`precision={precision}` needs a CUDA GPU; on {device.type} imgtune computes in fp32"
                               " (leave `precision` at auto)")
        return "fp32"
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp16"
    return precision


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def grad_scaler():
    """A CUDA GradScaler: ``torch.amp.GradScaler`` (torch 2.3 on), else ``torch.cuda.amp.GradScaler``
    (torch 2.1-2.2, still allowed by the requirements)."""
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler("cuda")
    return torch.cuda.amp.GradScaler()


def autocast(device: torch.device, name: str):
    """The context a forward pass runs in at precision ``name`` (a no-op in fp32)."""
    dtype = DTYPES[name]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


class Precision:
    """Mixed precision on a CUDA device: bfloat16 where the GPU has it natively (no loss scaling
    needed), else float16 with a GradScaler. Elsewhere, or with ``mixed=False``, plain float32.

    Args:
        device: the device the model trains on.
        mixed: autocast on CUDA (``None``: on CUDA, yes; ``False``: fp32 whatever ``precision`` says).
        precision: one of :data:`PRECISIONS` (see :func:`choose_precision`).
    """

    def __init__(self, device: torch.device, mixed: bool | None = None, precision: str = "auto"):
        self.device = torch.device(device)
        self.name = "fp32" if mixed is False else choose_precision(self.device, precision)
        self.dtype: torch.dtype | None = DTYPES[self.name]
        self.scaler = grad_scaler() if self.name == "fp16" else None

    def autocast(self):
        """The context a forward pass runs in (a no-op in float32)."""
        return autocast(self.device, self.name)

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


def configure_cuda(precision: str) -> None:
    """The process-wide CUDA settings that make training fast: cuDNN picks the fastest convolution
    algorithm for each input shape (imgtune's batches all have one shape), and unless ``precision`` is
    ``"fp32"`` (asked for: exact float32) matrix products and convolutions left in float32 by autocast
    use TF32 tensor cores (Ampere on). Call it only for a CUDA device: it never turns a setting off."""
    torch.backends.cudnn.benchmark = True
    if precision != "fp32":
        torch.set_float32_matmul_precision("high")  # = torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def adamw(param_groups: list[dict], *, device: torch.device, **options) -> torch.optim.AdamW:
    """AdamW over ``param_groups``; on CUDA the fused implementation (one kernel for every parameter,
    where this torch has it), else PyTorch's default (the same numbers as always on the CPU)."""
    if device.type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters:
        options["fused"] = True
    return torch.optim.AdamW(param_groups, **options)


def default_batch_size(device: str | torch.device, *, size: int = 224, train_images: int | None = None) -> int:
    """The batch size when none is given: :data:`DEFAULT_BS` off CUDA; on CUDA 32 images per
    :data:`GIB_PER_32_IMAGES` GiB of free memory at 224 px (fewer for larger pictures), a power of
    two from 32 to :data:`MAX_DEFAULT_BS`, and small enough for 8 steps an epoch.

    Args:
        device: where the model trains.
        size: the picture side in pixels.
        train_images: the images of an epoch (this process's share under torchrun), ``None``: unknown.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return DEFAULT_BS
    free, _ = torch.cuda.mem_get_info(device)
    fits = 32 * free / 2**30 / GIB_PER_32_IMAGES * (224 / size) ** 2
    bs = DEFAULT_BS
    while bs * 2 <= min(fits, MAX_DEFAULT_BS) and (train_images is None or bs * 2 * 8 <= train_images):
        bs *= 2
    return bs


def to_device(images: torch.Tensor, device: torch.device, memory_format: torch.memory_format,
              normalize=None) -> torch.Tensor:
    """A batch on ``device`` in ``memory_format`` (copied without waiting where the source is pinned).

    A uint8 batch of pictures (what the CUDA loaders send: a quarter of float32's bytes) is normalised
    there by ``normalize`` (see :class:`imgtune.data.loaders.DeviceNormalize`); others are copied as they are.
    """
    images = images.to(device, non_blocking=True, memory_format=memory_format)
    if images.dtype == torch.uint8 and normalize is not None:
        images = normalize(images)
    return images


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
    xb = to_device(xb, learner.device, learner.memory_format, learner.normalize)
    yb = yb.to(learner.device, non_blocking=True)
    with learner.precision.autocast():
        return learner.loss_func(learner.model(xb).float(), yb)
