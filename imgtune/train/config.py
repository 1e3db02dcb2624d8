"""The training config: what a run was trained with, saved with the weights and read back checked.

A :class:`TrainConfig` is written into the bundle's ``model.json`` under ``training`` (the fields that
are set, in this order: the same JSON imgtune 0.1.0 wrote) and read back by :func:`read_training_config`,
which names the file and the field when something is wrong. Bundles written by imgtune 0.1.0 load as
they are; ones from before ``accumulate``, ``world_size`` and ``sync_bn`` were recorded get their defaults.
``balance`` and ``tta`` are recorded only when on (absent: off); ``balance`` is the power of the inverse
class frequency (``true`` in bundles from before the power could be chosen: 1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgtune.data.transforms import RESIZE_METHODS
from imgtune.deploy.bundle import META_FILE, read_meta
from imgtune.errors import ImgtuneError


@dataclass(eq=False)
class TrainConfig(Mapping):
    """The settings of one training run, one commented field each.

    ``None`` means not recorded (a learner built by hand need not know its data's settings). Read it
    as attributes, or as a read-only mapping of the fields that are set: ``config["size"]``,
    ``"lr" in config`` and ``dict(config)`` (what ``model.json`` holds) see exactly those.
    """

    # --- the network
    arch: str | None = None  # the name given to Learner.from_data: a registry name or any timm name
    timm_name: str | None = None  # the timm architecture a bundle is rebuilt from
    weights: str | None = None  # where the body's weights came from: "imagenet", "none" or a file/run folder
    # --- the pictures: a bundle needs size, mean and std to preprocess as in training
    size: int | None = None  # image side in pixels
    resize: str | None = None  # how a picture becomes size x size: "crop", "squish" or "pad"
    mean: list[float] | None = None  # per-channel normalisation, RGB in 0..1
    std: list[float] | None = None
    # --- the batches
    bs: int | None = None  # images per micro-batch (per process under torchrun)
    augment: bool | None = None  # training augmentation: flip, rotate, zoom, lighting
    seed: int | None = None  # seeds the head's initialisation, the shuffling and the augmentation
    accumulate: int = 1  # micro-batches per optimizer step: effective batch bs x world_size x accumulate
    world_size: int = 1  # processes training together (torchrun)
    sync_bn: bool = False  # BatchNorm statistics over the global batch (GPUs under torchrun)
    # --- set by Learner.fine_tune
    lr: dict | None = None  # {"frozen": the head's rate, "unfrozen": [first group's, head's]}
    # --- recorded only when on, so a default run's JSON is 0.1.0's
    balance: float | None = None  # p: the loss weighs classes by inverse frequency to the power p (imgtune.train.balance)
    tta: str | None = None  # "flip": validation predicts the mean of the picture's and its mirror's probabilities
    tune_stages: int | None = None  # body stages trained on cached activations after the head (imgtune.train.partial)

    def __getitem__(self, key: str) -> Any:
        value = getattr(self, key, None) if key in _FIELDS else None
        if value is None:
            raise KeyError(key)
        return value

    def __iter__(self) -> Iterator[str]:
        return (name for name in _FIELDS if getattr(self, name) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    @classmethod
    def copy_of(cls, config: TrainConfig | Mapping | None, *, source: str) -> TrainConfig:
        """A new config: a copy of ``config``, or one from a mapping (checked, see :meth:`from_dict`)."""
        if isinstance(config, TrainConfig):
            return dataclasses.replace(config)
        return cls.from_dict(config or {}, source=source)

    @classmethod
    def from_dict(cls, values: Mapping, *, source: str, required: tuple[str, ...] = ()) -> TrainConfig:
        """A config from a mapping (as ``model.json`` holds it), checked field by field.

        Args:
            values: field name -> value; a field left out or ``None`` is not recorded.
            source: what the values came from, named in errors (a file, ``Learner(config=...)``).
            required: fields that must be present.

        Raises:
            ImgtuneError: not a mapping, an unknown field, a required one missing, or a wrong type.
        """
        if not isinstance(values, Mapping):
            raise ImgtuneError(f"{source}: the training config must be a JSON object, not {type(values).__name__}")
        unknown = [key for key in values if key not in _FIELDS]
        if unknown:
            raise ImgtuneError(f"{source}: unknown training config field(s) {', '.join(map(str, unknown))}; "
                               f"known: {', '.join(_FIELDS)}")
        missing = [key for key in required if values.get(key) is None]
        if missing:
            raise ImgtuneError(f"{source}: the training config lacks {', '.join(missing)}")
        for key, value in values.items():
            check, expected = _CHECKS[key]
            if value is not None and not check(value):
                raise ImgtuneError(f"{source}: training config field {key} must be {expected}, not {value!r}")
        return cls(**{key: value for key, value in values.items() if value is not None})


_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))

#: What a bundle cannot do without (save_bundle refuses to write one that lacks them).
BUNDLE_FIELDS = ("timm_name", "size", "mean", "std")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_rgb(value) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 3 and all(map(_is_number, value))


def _is_lr(value) -> bool:
    return (isinstance(value, dict) and set(value) == {"frozen", "unfrozen"} and _is_number(value["frozen"])
            and isinstance(value["unfrozen"], list) and len(value["unfrozen"]) == 2
            and all(map(_is_number, value["unfrozen"])))


_CHECKS = {
    "arch": (lambda v: isinstance(v, str), "a string"),
    "timm_name": (lambda v: isinstance(v, str), "a string"),
    "weights": (lambda v: isinstance(v, str), "a string"),
    "size": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "resize": (lambda v: v in RESIZE_METHODS, "one of " + ", ".join(RESIZE_METHODS)),
    "mean": (_is_rgb, "a list of 3 numbers"),
    "std": (_is_rgb, "a list of 3 numbers"),
    "bs": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "augment": (lambda v: isinstance(v, bool), "true or false"),
    "seed": (_is_int, "an integer"),
    "accumulate": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "world_size": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "sync_bn": (lambda v: isinstance(v, bool), "true or false"),
    "balance": (lambda v: isinstance(v, bool) or (isinstance(v, (int, float)) and 0 <= v <= 1), "a power from 0 to 1"),
    "tta": (lambda v: v in ("none", "flip"), '"none" or "flip"'),
    "tune_stages": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "lr": (_is_lr, 'an object {"frozen": rate, "unfrozen": [low, high]}'),
}


def read_training_config(run_dir: str | Path) -> TrainConfig:
    """The training config of a bundle (``run_dir/model.json``), checked.

    Args:
        run_dir: a folder written by ``imgtune train`` or ``Learner.save``.

    Raises:
        ImgtuneError: not a bundle, or its ``training`` config is missing or wrong; the message names the file.
    """
    meta = read_meta(run_dir)
    source = str(Path(run_dir) / META_FILE)
    if "training" not in meta:
        raise ImgtuneError(f"{source}: no training config (the bundle has no \"training\" object)")
    return TrainConfig.from_dict(meta["training"], source=source, required=BUNDLE_FIELDS)
