"""Every random generator training draws from, captured as plain data and put back bit for bit.

Used by the lr finder (which must leave the run exactly as it found it) and by checkpoints (so that a
resumed run draws what an uninterrupted one would): torch's CPU generator, CUDA's (only once something
has started CUDA: asking for it would start it, also under ``--device cpu``), Python's ``random``,
NumPy's legacy generator, and the generators a training loader shuffles with and its dataset picks
cached-feature views with.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

import numpy as np
import torch


def _loader_generators(loader) -> dict[str, torch.Generator]:
    owners = (("loader", loader), ("dataset", getattr(loader, "dataset", None)))
    return {key: owner.generator for key, owner in owners
            if isinstance(getattr(owner, "generator", None), torch.Generator)}


def capture(loader=None) -> dict:
    """The state of every generator, and of ``loader``'s (a training DataLoader, or ``None``)."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return dict(
        torch=torch.get_rng_state(),
        cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        python=[version, list(internal), gauss],
        numpy=[kind, keys.tolist(), int(position), int(has_gauss), float(cached)],
        generators={key: generator.get_state() for key, generator in _loader_generators(loader).items()},
    )


def restore(state: Mapping, loader=None) -> None:
    """Put back a :func:`capture`; ``loader``'s generators only when a loader is given."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    for key, generator in _loader_generators(loader).items():
        if key in state["generators"]:
            generator.set_state(state["generators"][key])
