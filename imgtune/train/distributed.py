"""Training on several processes (GPUs or machines) with torch.distributed, launched by torchrun.

``torchrun --nproc_per_node=N -m imgtune train ...`` starts N copies of imgtune; each reads its rank
from the environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``) and :func:`setup` joins them into one process group: NCCL on CUDA, gloo on the CPU.
Each process trains on its own shard of every epoch (:func:`shard_samplers`), DistributedDataParallel
averages the gradients, and the validation set is split without padding and gathered back in order
(:func:`gather_by_index`), so every metric counts each image exactly once. Only the first process
(:func:`is_main`) shows progress and writes files.

Every collective waits at most ``IMGTUNE_DIST_TIMEOUT`` seconds (default 600): a process whose
peer died or hung stops with a one-line error (:func:`lost_peer_message`, printed by the CLI)
instead of waiting forever.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from imgtune.data.shards import ShardSampler
from imgtune.errors import ImgtuneError, first_line

TIMEOUT_ENV = "IMGTUNE_DIST_TIMEOUT"
#: Seconds a collective (or the start-up rendezvous) may wait for the other processes.
DEFAULT_TIMEOUT = 600.0
#: A folder; under torchrun each process appends the training indices of every epoch to
#: ``rank<N>.jsonl`` there (one JSON object per epoch: rank, world_size, phase, epoch, indices).
DEBUG_SHARDS_ENV = "IMGTUNE_DEBUG_SHARDS"


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher that sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def timeout_seconds() -> float:
    """The collective timeout from ``IMGTUNE_DIST_TIMEOUT`` (seconds), else :data:`DEFAULT_TIMEOUT`."""
    value = os.environ.get(TIMEOUT_ENV, "").strip()
    if not value:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ImgtuneError(f"{TIMEOUT_ENV}={value!r}: give the timeout in seconds, a number above 0")
    return seconds


def setup(device: str | torch.device | None = None) -> str | None:
    """Join the process group torchrun describes (once; later calls only return the device).

    NCCL when the device is CUDA (each process takes GPU ``LOCAL_RANK``), gloo otherwise. Outside
    torchrun this does nothing.

    Args:
        device: the device asked for (``None``: CUDA if present, else the CPU).

    Returns:
        The device this process should train on: ``"cuda:<LOCAL_RANK>"`` under torchrun with CUDA,
        otherwise ``device`` unchanged.
    """
    if not launched():
        return None if device is None else str(device)
    wanted = torch.device(device) if device is not None else None
    cuda = wanted.type == "cuda" if wanted is not None else torch.cuda.is_available()
    if cuda:
        if not torch.cuda.is_available():
            raise ImgtuneError("`device=cuda`: no CUDA GPU is visible to this process")
        if local_rank() >= torch.cuda.device_count():
            raise ImgtuneError(f"LOCAL_RANK {local_rank()} but only {torch.cuda.device_count()} GPUs are visible; "
                               "give torchrun --nproc_per_node at most the number of GPUs")
        torch.cuda.set_device(local_rank())
        device = f"cuda:{local_rank()}"
    elif wanted is None:
        device = "cpu"
    if not dist.is_initialized():
        seconds = timeout_seconds()
        try:
            dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=seconds))
        except (RuntimeError, ValueError) as error:
            raise ImgtuneError(f"process {rank()} of {world_size()} could not join the others: "
                               f"{_first_line(error)} (waited up to {seconds:g} s, {TIMEOUT_ENV})") from None
    return str(device)


def teardown() -> None:
    """Wait for every process, then leave the process group (no-op outside one)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# "Application timeout caused pair closure": gloo's words when a peer stopped answering mid-collective.
_COMM_FAILURE = re.compile(r"gloo|nccl|connection (reset|closed|refused)|timed out|broken pipe|"
                           r"process ?group|socket|watchdog|pair closure", re.IGNORECASE)


def lost_peer_message(error: BaseException) -> str | None:
    """A one-line description of ``error`` if it is a failed collective under torch.distributed, else ``None``."""
    if not (launched() and world_size() > 1):
        return None
    if not (isinstance(error, getattr(dist, "DistError", ())) or _COMM_FAILURE.search(str(error))):
        return None
    text = _first_line(error)
    if "timed out" in text.lower() or "timeout" in text.lower():
        why = f"no answer within {timeout_seconds():g} s ({TIMEOUT_ENV}): another process hung or died"
    else:
        why = "another process died (see its output)"
    return f"process {rank()} of {world_size()} lost contact with the others: {why} [{text}]"


def _first_line(error: BaseException) -> str:
    text = re.sub(r"^\[[^\]]*\]\s*", "", first_line(error))  # gloo prefixes its source file and line
    return text[:300]


# --- who am I ---------------------------------------------------------------------------------------

def is_initialized() -> bool:
    """Whether this process is in a torch.distributed process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 outside torch.distributed; from ``RANK`` once the group is gone)."""
    return dist.get_rank() if is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    """How many processes train together (1 outside torch.distributed)."""
    return dist.get_world_size() if is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    """This process's index on its machine (torchrun's ``LOCAL_RANK``), which picks its GPU."""
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    """True for the process that reports and writes files (rank 0), and outside torch.distributed."""
    return rank() == 0


# --- reducing and gathering -------------------------------------------------------------------------

def _comm_device() -> torch.device:
    """NCCL reduces tensors on the process's GPU; gloo on the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_across(values: Sequence[float]) -> list[float]:
    """Element-wise sums of ``values`` over all processes (``values`` itself outside torch.distributed)."""
    if not is_initialized() or world_size() == 1:
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def mean_across(value: float) -> float:
    """The mean of ``value`` over all processes, the same number on each."""
    return sum_across([value])[0] / max(1, world_size()) if is_initialized() else float(value)


def gather_by_index(loader, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Put the per-item results of a sharded loader back together, in dataset order, on every process.

    ``tensors`` hold one row per item this process saw, in the order of ``loader.sampler`` (a
    :class:`ShardSampler`). Unless the loader is sharded across several processes they are returned
    as they are.

    Returns:
        One tensor per input, with a row for every item of the dataset, each exactly once.
    """
    sampler = getattr(loader, "sampler", None)
    if not (isinstance(sampler, ShardSampler) and is_initialized() and world_size() > 1):
        return tensors
    device = _comm_device()
    indices = torch.as_tensor(sampler.indices, dtype=torch.long)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([len(indices)], device=device))
    sizes = [int(s.item()) for s in sizes]

    def gather(tensor: torch.Tensor) -> torch.Tensor:
        # all_gather needs equal shapes: pad every shard to the longest (they differ by at most one).
        padded = torch.zeros((max(sizes), *tensor.shape[1:]), dtype=tensor.dtype, device=device)
        padded[: len(tensor)] = tensor.to(device)
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        return torch.cat([part[:n] for part, n in zip(parts, sizes)]).cpu()

    order = gather(indices)
    if not torch.equal(order.sort().values, torch.arange(sampler.total)):
        raise RuntimeError("the validation shards do not cover the dataset exactly once")
    results = []
    for tensor in tensors:
        rows = gather(tensor)
        full = torch.empty_like(rows)
        full[order] = rows
        results.append(full)
    return tuple(results)


def broadcast_buffers(model: nn.Module) -> None:
    """Give every process rank 0's buffers (BatchNorm running statistics).

    DDP copies them from rank 0 before each training forward, so after the last step of an epoch
    each process holds its own update; evaluating with one set keeps the gathered validation equal
    to a single-process evaluation of the saved model.
    """
    if not is_initialized() or world_size() == 1:
        return
    device = _comm_device()
    for buffer in model.buffers():
        if device == buffer.device:
            dist.broadcast(buffer, src=0)
        else:
            copy = buffer.detach().to(device)
            dist.broadcast(copy, src=0)
            buffer.copy_(copy.to(buffer.device))


# --- the model ------------------------------------------------------------------------------------------

def wrap(model: nn.Module, device: torch.device) -> nn.parallel.DistributedDataParallel:
    """DistributedDataParallel over ``model``'s trainable parameters (rank 0's weights are copied to all).

    DDP registers the parameters that require a gradient when it is built, so a learner builds a new
    wrapper whenever freezing changes them.
    """
    device_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


class DataParallel:
    """The module a training step calls: the model itself, or under torch.distributed a
    DistributedDataParallel wrapper of it, rebuilt when freezing changes the trainable parameters
    (DDP only averages the gradients of the parameters that were trainable when it was built).

    Args:
        device: the device this process trains on.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._wrapper: nn.Module | None = None
        self._key: tuple | None = None

    def module(self, model: nn.Module) -> nn.Module:
        """``model``, or its DDP wrapper while a process group is initialised."""
        if not is_initialized():
            return model
        key = (id(model), tuple(p.requires_grad for p in model.parameters()))
        if key != self._key:
            self._wrapper = None  # drop the old wrapper's gradient hooks before the new one adds its own
            self._wrapper, self._key = wrap(model, self.device), key
        return self._wrapper

    @staticmethod
    def no_sync(module: nn.Module, sync: bool):
        """The context of a backward pass: without ``sync`` a DDP wrapper keeps the gradients local (a
        micro-batch before the last of an optimizer step); a plain model is unaffected."""
        if sync or not isinstance(module, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return module.no_sync()


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` with its BatchNorm layers replaced by SyncBatchNorm (same parameters and state-dict keys).

    SyncBatchNorm computes batch statistics over the whole global batch, which matters only when the
    statistics train (``bn_stats="train"``); PyTorch implements it on GPUs only.
    """
    if device.type != "cuda":
        raise ImgtuneError(f"`sync_bn=True` needs CUDA GPUs (PyTorch's SyncBatchNorm does not run on {device.type});"
                           " leave it out on this device")
    return convert_sync_batchnorm(model)


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """``model``'s BatchNorm layers as SyncBatchNorm, each sharing its parameters and buffers.

    timm's converter, not PyTorch's: timm's ``BatchNormAct2d`` (BatchNorm, then its activation and
    dropout, in every EfficientNet-Lite block) becomes a ``SyncBatchNormAct`` that keeps them, where
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` makes a plain SyncBatchNorm that never calls them.
    """
    from timm.layers import convert_sync_batchnorm as timm_convert

    return timm_convert(model)
