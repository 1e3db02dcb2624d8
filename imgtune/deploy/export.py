"""The model bundle and the Predictor.

A bundle is a folder with ``model.safetensors`` (the weights; loading runs no code) and
``model.json`` (everything needed to rebuild and use the model: the timm architecture, the classes
in output order, image size, resize method, mean/std, the training config, final metrics and
library versions). Loading needs timm and the JSON, not the code version that wrote it.

``export_onnx`` adds ``model.onnx`` to a bundle (checked against PyTorch when written);
``OnnxPredictor`` runs it with ONNX Runtime, and ``load_predictor`` picks a backend.
"""

from __future__ import annotations

import hashlib
import json
import platform
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import timm
import torch
from PIL import Image

from imgtune.data.transforms import valid_transform
from imgtune.errors import ImgtuneError
from imgtune.data.images import load_image, to_rgb

BUNDLE_FORMAT = 1
WEIGHTS_FILE, META_FILE, ONNX_FILE = "model.safetensors", "model.json", "model.onnx"
# float32 logits of the same graph differ only by the order of floating-point sums between the
# two runtimes; 1e-4 is far above that (~1e-5 for efficientnet_lite0) and far below any change of
# prediction.
ONNX_TOLERANCE = 1e-4


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
        return cls(_load_model(run_dir, meta), meta, device)

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
        ort = _import_onnx("onnxruntime")
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
            raise ImgtuneError(f"{path}: cannot load ({type(error).__name__}: {str(error)[:150]})") from None
        if session.get_modelmeta().custom_metadata_map.get("weights_sha256") != _weights_sha256(run_dir):
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


def _load_model(run_dir: Path, meta: dict) -> torch.nn.Module:
    from safetensors.torch import load_file

    try:
        model = timm.create_model(meta["timm_name"], pretrained=False, num_classes=meta["num_classes"])
        model.load_state_dict(load_file(str(run_dir / WEIGHTS_FILE)))
    except Exception as error:
        raise ImgtuneError(f"{run_dir}: cannot load the bundle ({type(error).__name__}: {str(error)[:150]})") from None
    return model.eval()


def _import_onnx(name: str):
    try:
        return __import__(name)
    except ImportError:
        raise ImgtuneError(f"ONNX needs the {name} package (an imgtune dependency): pip install {name}") from None


def _weights_sha256(run_dir: Path) -> str:
    return hashlib.sha256((run_dir / WEIGHTS_FILE).read_bytes()).hexdigest()


def export_onnx(run_dir: str | Path, *, opset: int = 17, path: str | Path | None = None,
                overwrite: bool = False) -> Path:
    """Write the bundle's model as ONNX and check it against PyTorch; see :func:`write_onnx`."""
    return write_onnx(run_dir, opset=opset, path=path, overwrite=overwrite)[0]


def write_onnx(run_dir: str | Path, *, opset: int = 17, path: str | Path | None = None,
               overwrite: bool = False) -> tuple[Path, float]:
    """Write the bundle's model as ONNX and check it against PyTorch.

    The graph takes ``images`` (N x 3 x size x size float32, already normalised with the bundle's
    mean/std) and returns ``logits`` (N x classes); N is dynamic. The classes, size, resize, mean and
    std are stored as metadata in the file, so it can be used without ``model.json``.

    Args:
        run_dir: a bundle folder.
        opset: the ONNX opset version.
        path: where to write.  [default: ``model.onnx`` in ``run_dir``]
        overwrite: replace an existing file.

    Returns:
        The path of the ONNX file and the largest logit difference measured (see
        :func:`onnx_max_difference`).

    Raises:
        ImgtuneError: the file exists, onnx/onnxruntime is missing, or ONNX Runtime's logits differ
            from PyTorch's by more than ``ONNX_TOLERANCE`` (the file is then removed).
    """
    onnx = _import_onnx("onnx")
    _import_onnx("onnxruntime")
    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    path = Path(path) if path is not None else run_dir / ONNX_FILE
    if path.exists() and not overwrite:
        raise ImgtuneError(f"{path}: file exists; pass --overwrite (overwrite=True) to replace it")
    model = _load_model(run_dir, meta)
    example = torch.randn(2, 3, meta["size"], meta["size"])
    # The TorchScript-based exporter (dynamo=False): it needs only onnx, traces timm's EfficientNet-Lite
    # and ResNet in seconds, and supports dynamic_axes. The torch.export-based exporter (the default
    # since torch 2.9) also needs onnxscript, another dependency, for the same graph of plain convolutions.
    # The legacy exporter warns that it is deprecated; the check below is what guards the result.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=opset, dynamo=False)
    graph = onnx.load(str(path))
    described = dict(classes=json.dumps(meta["classes"]), size=str(meta["size"]), resize=meta.get("resize", "crop"),
                     mean=json.dumps(meta["mean"]), std=json.dumps(meta["std"]), weights_sha256=_weights_sha256(run_dir))
    onnx.helper.set_model_props(graph, described)
    onnx.checker.check_model(graph)
    onnx.save(graph, str(path))
    difference = onnx_max_difference(run_dir, path, model=model)
    if difference > ONNX_TOLERANCE:
        path.unlink()
        raise ImgtuneError(f"ONNX Runtime's logits differ from PyTorch's by {difference:.2g} "
                           f"(more than {ONNX_TOLERANCE:g}); try another --opset")
    return path, difference


def onnx_max_difference(run_dir: str | Path, path: str | Path | None = None, *, batch_sizes: Sequence[int] = (2, 3),
                        seed: int = 0, model: torch.nn.Module | None = None) -> float:
    """The largest absolute difference between ONNX Runtime's and PyTorch's logits on random inputs.

    One batch per size in ``batch_sizes`` (different sizes prove the batch dimension is dynamic);
    inputs are standard normal, like normalised images, from ``seed``.
    """
    ort = _import_onnx("onnxruntime")
    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    model = model if model is not None else _load_model(run_dir, meta)
    session = ort.InferenceSession(str(path or run_dir / ONNX_FILE), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    difference = 0.0
    for n in batch_sizes:
        batch = torch.randn(n, 3, meta["size"], meta["size"], generator=generator)
        with torch.no_grad():
            expected = model(batch).numpy()
        (got,) = session.run(["logits"], {"images": batch.numpy()})
        if got.shape != expected.shape:
            raise ImgtuneError(f"{path}: ONNX Runtime gave logits of shape {got.shape}, PyTorch {expected.shape}")
        difference = max(difference, float(np.abs(got - expected).max()))
    return difference
