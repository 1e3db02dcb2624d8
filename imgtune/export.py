"""The model bundle and the Predictor.

A bundle is a folder with ``model.safetensors`` (the weights; loading runs no code) and
``model.json`` (everything needed to rebuild and use the model: the timm architecture, the classes
in output order, image size, resize method, mean/std, the training config, final metrics and
library versions). Loading needs timm and the JSON, not the code version that wrote it.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import timm
import torch
from PIL import Image

from imgtune.data import valid_transform
from imgtune.errors import ImgtuneError
from imgtune.images import load_image, to_rgb

BUNDLE_FORMAT = 1
WEIGHTS_FILE, META_FILE = "model.safetensors", "model.json"


def versions() -> dict[str, str]:
    import torchvision

    from imgtune import __version__

    return dict(imgtune=__version__, torch=torch.__version__, torchvision=torchvision.__version__,
                timm=timm.__version__, python=platform.python_version())


def save_bundle(learner, run_dir: str | Path, *, metrics: dict | None = None) -> Path:
    """Write ``model.safetensors`` and ``model.json`` for ``learner`` into ``run_dir``."""
    from safetensors.torch import save_file

    missing = [k for k in ("timm_name", "size", "mean", "std") if k not in learner.config]
    if missing:
        raise ImgtuneError(f"the learner's config lacks {', '.join(missing)}: build it with Learner.from_data, "
                           "or give Learner(config=...) the image settings a bundle records")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in learner.model.state_dict().items()}
    save_file(state, str(run_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    cfg = learner.config
    meta = dict(
        format=BUNDLE_FORMAT,
        arch=cfg.get("arch"),
        timm_name=cfg["timm_name"],
        num_classes=len(learner.classes),
        classes=list(learner.classes),
        size=cfg["size"],
        resize=cfg.get("resize", "crop"),
        mean=list(cfg["mean"]),
        std=list(cfg["std"]),
        training=cfg,
        metrics=metrics or {},
        versions=versions(),
    )
    (run_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return run_dir


def read_meta(run_dir: str | Path) -> dict:
    """The bundle's ``model.json``, with a clear error when the folder is not a bundle."""
    run_dir = Path(run_dir)
    meta_path = run_dir / META_FILE
    if not meta_path.is_file() or not (run_dir / WEIGHTS_FILE).is_file():
        raise ImgtuneError(f"{run_dir}: not a model bundle (needs {META_FILE} and {WEIGHTS_FILE}); "
                           "pass the folder that `imgtune train` wrote")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as error:
        raise ImgtuneError(f"{meta_path}: not valid JSON ({error})") from None
    if meta.get("format", 0) > BUNDLE_FORMAT:
        raise ImgtuneError(f"{meta_path}: bundle format {meta['format']} is newer than this imgtune; upgrade imgtune")
    return meta


@dataclass
class Prediction:
    """Predictions for a batch of images: ``probs[i, j]`` is image i's probability of ``classes[j]``."""

    classes: list[str]
    probs: np.ndarray

    @property
    def labels(self) -> list[str]:
        return [self.classes[i] for i in self.probs.argmax(1)]

    def top_k(self, k: int = 3) -> list[list[tuple[str, float]]]:
        """For each image, the ``k`` most likely classes with their probabilities, most likely first."""
        k = min(k, len(self.classes))
        order = np.argsort(-self.probs, axis=1)[:, :k]
        return [[(self.classes[j], float(self.probs[i, j])) for j in row] for i, row in enumerate(order)]


class Predictor:
    """Loads a bundle and classifies images.

    >>> predictor = Predictor.load("runs/elpv-20261126-120000")
    >>> predictor.predict(["cell.png"]).top_k(3)
    """

    def __init__(self, model: torch.nn.Module, meta: dict, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device, memory_format=torch.channels_last).eval()
        self.meta = meta
        self.classes: list[str] = list(meta["classes"])
        self.transform = valid_transform(meta["size"], meta.get("resize", "crop"), meta["mean"], meta["std"])

    @classmethod
    def load(cls, run_dir: str | Path, *, device: str | torch.device = "cpu") -> "Predictor":
        """Rebuild the model from ``model.json`` and load ``model.safetensors`` (no pickle)."""
        from safetensors.torch import load_file

        run_dir = Path(run_dir)
        meta = read_meta(run_dir)
        try:
            model = timm.create_model(meta["timm_name"], pretrained=False, num_classes=meta["num_classes"])
            model.load_state_dict(load_file(str(run_dir / WEIGHTS_FILE)))
        except Exception as error:
            raise ImgtuneError(f"{run_dir}: cannot load the bundle ({type(error).__name__}: {str(error)[:150]})") from None
        return cls(model, meta, device)

    def logits(self, images: Sequence) -> torch.Tensor:
        """Raw model outputs for images given as paths, PIL images or HxWxC uint8 arrays."""
        batch = torch.stack([self.transform(self._as_image(image)) for image in images])
        with torch.no_grad():
            return self.model(batch.to(self.device, memory_format=torch.channels_last)).float().cpu()

    def predict(self, images: Sequence, *, bs: int = 32) -> Prediction:
        """Class probabilities for ``images``, in batches of ``bs``; columns follow ``classes``."""
        images = list(images)
        chunks = [self.logits(images[i:i + bs]).softmax(1) for i in range(0, len(images), bs)]
        probs = torch.cat(chunks).numpy() if chunks else np.zeros((0, len(self.classes)), dtype=np.float32)
        return Prediction(self.classes, probs)

    def _as_image(self, image) -> Image.Image:
        if isinstance(image, Image.Image):
            return to_rgb(image)
        if isinstance(image, np.ndarray):
            return to_rgb(Image.fromarray(image))
        if isinstance(image, (str, Path)):
            return load_image(image, min_size=self.meta["size"])
        raise TypeError(f"cannot predict on {type(image).__name__}; give a path, a PIL image or an array")
