"""Each process's share of the data under torch.distributed: training shards reshuffled every epoch,
and validation split without padding so every image counts exactly once."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch.distributed as dist
from torch.utils.data import DistributedSampler, Sampler

from imgtune.errors import ImgtuneError

#: A folder; under torchrun each process appends the training indices of every epoch to
#: ``rank<N>.jsonl`` there (one JSON object per epoch: rank, world_size, phase, epoch, indices).
DEBUG_SHARDS_ENV = "IMGTUNE_DEBUG_SHARDS"


def rank() -> int:
    """This process's rank under torch.distributed (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes under torch.distributed (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class ShardSampler(Sampler[int]):
    """Every ``world_size``-th index from ``rank``, in order, without padding: the shards of all
    processes hold each item exactly once (for evaluation; lengths differ by at most one)."""

    def __init__(self, total: int, rank: int, world_size: int):
        self.total, self.rank, self.world_size = total, rank, world_size
        self.indices = list(range(rank, total, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def current_shard() -> tuple[int, int] | None:
    """``(rank, world_size)`` while a process group is initialised, else ``None``."""
    return (rank(), world_size()) if dist.is_available() and dist.is_initialized() else None


def shard_samplers(train_ds, n_valid: int, rank: int, world_size: int, *, seed: int
                   ) -> tuple[DistributedSampler, ShardSampler]:
    """This process's samplers: its share of each shuffled training epoch, and of the validation set.

    The training sampler shuffles with ``seed + epoch`` (see :func:`set_epoch`), the same permutation
    on every process, and deals it out round-robin; when the training set does not divide evenly it
    repeats a few images so that every process takes the same number of steps.
    """
    if len(train_ds) < world_size or n_valid < world_size:
        raise ImgtuneError(f"{world_size} processes need at least {world_size} training and validation images each;"
                           f" found {len(train_ds)} and {n_valid}")
    train = DistributedSampler(train_ds, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False)
    return train, ShardSampler(n_valid, rank, world_size)


def set_epoch(loader, epoch: int) -> None:
    """Reshuffle a sharded training loader for ``epoch`` (a plain loader reshuffles by itself)."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)


def record_shard(loader, *, phase: str, epoch: int) -> None:
    """With ``IMGTUNE_DEBUG_SHARDS=DIR``, append the indices this process trains on this epoch to
    ``DIR/rank<N>.jsonl`` (sharded loaders only: reading a plain loader's order would change it)."""
    directory = os.environ.get(DEBUG_SHARDS_ENV)
    sampler = getattr(loader, "sampler", None)
    if not directory or not isinstance(sampler, DistributedSampler):
        return
    indices = list(sampler)
    if loader.drop_last:
        indices = indices[: len(loader) * loader.batch_size]
    record = dict(rank=rank(), world_size=world_size(), phase=phase, epoch=epoch, indices=indices)
    path = Path(directory) / f"rank{rank()}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
