"""Predictors: classify images with a bundle, on PyTorch (:class:`Predictor`) or ONNX Runtime
(:class:`OnnxPredictor`); :func:`load_predictor` picks the backend."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from imgtune.data.images import load_image, to_rgb
from imgtune.data.transforms import valid_transform
from imgtune.deploy.bundle import ONNX_FILE, WEIGHTS_FILE, check_weights, load_model, read_meta, weights_sha256
from imgtune.deploy.export import import_onnx
from imgtune.errors import ImgtuneError, describe


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


class _ImagePredictor:
    """What every backend shares: the bundle's preprocessing and batching; subclasses give ``logits``."""

    def __init__(self, meta: dict):
        self.meta = meta
        self.classes: list[str] = list(meta["classes"])
        self.transform = valid_transform(meta["size"], meta.get("resize", "crop"), meta["mean"], meta["std"])

    def logits(self, images: Sequence) -> torch.Tensor:
        """Raw model outputs for images given as paths, PIL images or HxWxC uint8 arrays."""
        return self._logits_of(torch.stack([self.transform(self._as_image(image)) for image in images]))

    def predict(self, images: Sequence, *, bs: int = 32) -> Prediction:
        """Class probabilities for ``images``, in batches of ``bs``; columns follow ``classes``."""
        images = list(images)
        chunks = [self.logits(images[i:i + bs]).softmax(1) for i in range(0, len(images), bs)]
        probs = torch.cat(chunks).numpy() if chunks else np.zeros((0, len(self.classes)), dtype=np.float32)
        return Prediction(self.classes, probs)

    def predict_files(self, paths: Sequence[str | Path], *, bs: int = 32
                      ) -> Iterator[tuple[str | Path, Prediction | None, str | None]]:
        """Like ``predict`` for files, where an unreadable file does not stop the others.

        Yields ``(path, prediction, error)`` per file, in order: a one-row ``Prediction`` and ``None``,
        or ``None`` and the one-line reason the file could not be read. Batches hold ``bs`` files.
        """
        paths = list(paths)
        for start in range(0, len(paths), bs):
            chunk = paths[start:start + bs]
            tensors, errors = {}, {}
            for i, path in enumerate(chunk):
                try:
                    tensors[i] = self.transform(self._as_image(path))
                except ImgtuneError as error:
                    errors[i] = str(error)
            probs = self._logits_of(torch.stack(list(tensors.values()))).softmax(1).numpy() if tensors else None
            rows = {i: row for row, i in enumerate(tensors)}
            for i, path in enumerate(chunk):
                if i in errors:
                    yield path, None, errors[i]
                else:
                    yield path, Prediction(self.classes, probs[rows[i]:rows[i] + 1]), None

    def _logits_of(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of preprocessed images (N x 3 x size x size), on the CPU."""
        raise NotImplementedError

    def _as_image(self, image) -> Image.Image:
        if isinstance(image, Image.Image):
            return to_rgb(image)
        if isinstance(image, np.ndarray):
            return to_rgb(Image.fromarray(image))
        if isinstance(image, (str, Path)):
            return load_image(image, min_size=self.meta["size"])
        raise TypeError(f"cannot predict on {type(image).__name__}; give a path, a PIL image or an array")


class Predictor(_ImagePredictor):
    """Loads a bundle and classifies images with PyTorch.

    >>> predictor = Predictor.load("runs/elpv-20261126-120000")
    >>> predictor.predict(["cell.png"]).top_k(3)
    """

    def __init__(self, model: torch.nn.Module, meta: dict, device: str | torch.device = "cpu"):
        super().__init__(meta)
        self.device = torch.device(device)
        self.model = model.to(self.device, memory_format=torch.channels_last).eval()

    @classmethod
    def load(cls, run_dir: str | Path, *, device: str | torch.device = "cpu") -> "Predictor":
        """Rebuild the model from ``model.json`` and load ``model.safetensors`` (no pickle)."""
        run_dir = Path(run_dir)
        meta = read_meta(run_dir)
        return cls(load_model(run_dir, meta), meta, device)

    def _logits_of(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(batch.to(self.device, memory_format=torch.channels_last)).float().cpu()


class OnnxPredictor(_ImagePredictor):
    """Runs a bundle's ``model.onnx`` (written by ``export_onnx``) with ONNX Runtime; no PyTorch model.

    >>> OnnxPredictor.load("runs/elpv-20261126-120000").predict(["cell.png"]).top_k(3)
    """

    def __init__(self, session, meta: dict):
        super().__init__(meta)
        self.session = session

    @classmethod
    def load(cls, run_dir: str | Path, *, device: str = "cpu") -> "OnnxPredictor":
        """Open ``model.onnx`` on the CPU (or CUDA, when ``device`` is cuda and ONNX Runtime has it)."""
        ort = import_onnx("onnxruntime")
        run_dir = Path(run_dir)
        meta = read_meta(run_dir)
        path = run_dir / ONNX_FILE
        if not path.is_file():
            raise ImgtuneError(f"{run_dir}: no {ONNX_FILE}; write it with `imgtune export {run_dir}`")
        providers = ["CPUExecutionProvider"]
        if str(device).startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            session = ort.InferenceSession(str(path), providers=providers)
        except Exception as error:
            raise ImgtuneError(f"{path}: cannot load ({describe(error)})") from None
        sha256 = weights_sha256(run_dir)
        check_weights(run_dir, meta, sha256)  # model.json (classes, preprocessing) belongs to these weights
        if session.get_modelmeta().custom_metadata_map.get("weights_sha256") != sha256:
            raise ImgtuneError(f"{path} was exported from other weights than {WEIGHTS_FILE}; "
                               f"re-export with `imgtune export {run_dir} --overwrite`")
        return cls(session, meta)

    def _logits_of(self, batch: torch.Tensor) -> torch.Tensor:
        (logits,) = self.session.run(["logits"], {"images": batch.numpy().astype(np.float32)})
        return torch.from_numpy(logits)


def load_predictor(run_dir: str | Path, *, backend: str = "auto", device: str = "cpu") -> Predictor | OnnxPredictor:
    """A predictor for the bundle in ``run_dir``.

    Args:
        backend: ``"torch"``, ``"onnx"`` (needs ``model.onnx``), or ``"auto"``: ONNX Runtime when the
            bundle has an up-to-date ``model.onnx``, onnxruntime is installed and ``device`` is the
            CPU, else PyTorch.
        device: ``cpu``, ``cuda`` or ``mps``.
    """
    if backend not in ("auto", "torch", "onnx"):
        raise ImgtuneError(f"unknown backend {backend!r}; choose auto, torch or onnx")
    if backend == "onnx":
        return OnnxPredictor.load(run_dir, device=device)
    if backend == "auto" and str(device) == "cpu" and (Path(run_dir) / ONNX_FILE).is_file():
        try:
            return OnnxPredictor.load(run_dir, device=device)
        except ImgtuneError:
            pass  # onnxruntime missing or a stale model.onnx: PyTorch gives the right answer anyway
    return Predictor.load(run_dir, device=device)
