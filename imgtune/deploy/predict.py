"""Predictors: classify images with a bundle, on PyTorch (:class:`Predictor`) or ONNX Runtime
(:class:`OnnxPredictor`, float32 or int8); :func:`load_predictor` picks the backend.

Test-time augmentation (``tta="flip"``) averages the softmax probabilities of each picture and its
mirror image, as training's validation does; a bundle's ``model.json`` says which one it was trained
to expect (``"tta"``; absent in older bundles: ``"none"``), and a predictor can be told otherwise.
"""

from __future__ import annotations

import itertools
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from imgtune.data.images import load_image, to_rgb
from imgtune.data.transforms import valid_transform
from imgtune.deploy.bundle import (INT8_ONNX_FILE, ONNX_FILE, WEIGHTS_FILE, check_weights, load_model, read_meta,
                                   weights_sha256)
from imgtune.deploy.onnx_session import open_session
from imgtune.errors import ImgtuneError
from imgtune.system import usable_cores

#: Test-time augmentation: ``none`` (the picture) or ``flip`` (the mean of the picture's and its mirror's probabilities).
TTA_MODES = ("none", "flip")


def resolve_tta(meta: dict, tta: str | None) -> str:
    """``tta`` when given, else the bundle's ``"tta"`` (``"none"`` in bundles that lack it).

    Raises:
        ImgtuneError: not one of :data:`TTA_MODES`.
    """
    mode = meta.get("tta", "none") if tta is None else tta
    if mode not in TTA_MODES:
        raise ImgtuneError(f"unknown tta {mode!r}; choose {' or '.join(TTA_MODES)}")
    return mode


@dataclass
class Prediction:
    """Predictions for a batch of images: ``probs[i, j]`` is image i's probability of ``classes[j]``."""

    classes: list[str]
    probs: np.ndarray

    @property
    def labels(self) -> list[str]:
        """The most likely class of each image."""
        return [self.classes[i] for i in self.probs.argmax(1)]

    def top_k(self, k: int = 3) -> list[list[tuple[str, float]]]:
        """For each image, the ``k`` most likely classes with their probabilities, most likely first.

        Args:
            k: classes per image (at most all of them).

        Returns:
            One list of ``(class, probability)`` per image.
        """
        k = min(k, len(self.classes))
        order = np.argsort(-self.probs, axis=1)[:, :k]
        return [[(self.classes[j], float(self.probs[i, j])) for j in row] for i, row in enumerate(order)]

    def _repr_html_(self) -> str:
        """For a notebook: each image's top 3 as small bars (escaped; at most 20 images, then a count)."""
        from imgtune.html_repr import top_k_table

        return top_k_table(self.top_k(3))


class _ImagePredictor:
    """What every backend shares: the bundle's preprocessing, batching and test-time augmentation;
    subclasses give ``_logits_of``."""

    def __init__(self, meta: dict, tta: str | None = None):
        self.meta = meta
        self.classes: list[str] = list(meta["classes"])
        self.transform = valid_transform(meta["size"], meta.get("resize", "crop"), meta["mean"], meta["std"])
        self.tta = resolve_tta(meta, tta)

    def logits(self, images: Sequence) -> torch.Tensor:
        """Raw model outputs for images given as paths, PIL images or HxWxC uint8 arrays (no TTA)."""
        return self._logits_of(torch.stack([self.transform(self._as_image(image)) for image in images]))

    def probs_of(self, batch: torch.Tensor, logits_of=None) -> torch.Tensor:
        """Class probabilities of a batch of preprocessed images, with the predictor's ``tta``: with
        ``flip``, the mean of the softmax of each image and of its mirror (one call on both);
        ``logits_of``: what runs the model (default: the predictor's ``_logits_of``)."""
        logits_of = logits_of or self._logits_of
        if self.tta == "none":
            return logits_of(batch).softmax(1)
        probs = logits_of(torch.cat([batch, batch.flip(-1)])).softmax(1)
        return (probs[:len(batch)] + probs[len(batch):]) / 2

    def predict(self, images: Sequence, *, bs: int = 32) -> Prediction:
        """Class probabilities for ``images``, in batches of ``bs``; columns follow ``classes``."""
        chunks = [self.probs_of(torch.stack([self.transform(self._as_image(image)) for image in chunk]))
                  for chunk in _chunks(images, bs)]
        probs = torch.cat(chunks).numpy() if chunks else np.zeros((0, len(self.classes)), dtype=np.float32)
        return Prediction(self.classes, probs)

    def predict_files(self, paths: Sequence[str | Path], *, bs: int = 32
                      ) -> Iterator[tuple[str | Path, Prediction | None, str | None]]:
        """Like ``predict`` for files, where an unreadable file does not stop the others.

        Yields ``(path, prediction, error)`` per file, in order: a one-row ``Prediction`` and ``None``,
        or ``None`` and the one-line reason the file could not be read. Batches hold ``bs`` files; a
        thread decodes the next batch while the model runs this one.
        """
        chunks = _chunks(paths, bs)
        with ThreadPoolExecutor(1, thread_name_prefix="imgtune-decode") as decoder:
            pending = decoder.submit(self._decode, chunks[0]) if chunks else None
            for number, chunk in enumerate(chunks):
                tensors, errors = pending.result()
                if number + 1 < len(chunks):
                    pending = decoder.submit(self._decode, chunks[number + 1])
                probs = self.probs_of(torch.stack(list(tensors.values()))).numpy() if tensors else None
                yield from self._rows(chunk, tensors, errors, probs)

    def _rows(self, chunk, tensors: dict, errors: dict, probs: np.ndarray | None):
        """``predict_files``' answers for one batch: its decoded pictures' rows of ``probs``, in order."""
        rows = {i: row for row, i in enumerate(tensors)}
        for i, path in enumerate(chunk):
            if i in errors:
                yield path, None, errors[i]
            else:
                yield path, Prediction(self.classes, probs[rows[i]:rows[i] + 1]), None

    def _decode(self, chunk: Sequence[str | Path]) -> tuple[dict[int, torch.Tensor], dict[int, str]]:
        """The preprocessed images of ``chunk`` by position, and the reasons the others failed."""
        tensors, errors = {}, {}
        for i, path in enumerate(chunk):
            try:
                tensors[i] = self.transform(self._as_image(path))
            except ImgtuneError as error:
                errors[i] = str(error)
        return tensors, errors

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

    Args:
        model: the network (moved to ``device``, put in eval mode).
        meta: the bundle's ``model.json`` (classes, size, resize, mean, std).
        device: where it runs.
        tta: ``"flip"`` or ``"none"`` (default: the bundle's; see :func:`resolve_tta`).
    """

    def __init__(self, model: torch.nn.Module, meta: dict, device: str | torch.device = "cpu", tta: str | None = None):
        super().__init__(meta, tta)
        self.device = torch.device(device)
        self.model = model.to(self.device, memory_format=torch.channels_last).eval()

    @classmethod
    def load(cls, run_dir: str | Path, *, device: str | torch.device = "cpu", tta: str | None = None) -> "Predictor":
        """Rebuild the model from ``model.json`` and load ``model.safetensors`` (no pickle).

        Args:
            run_dir: the bundle's folder.
            device: where the model runs.
            tta: ``"flip"`` or ``"none"`` (default: the bundle's; see :func:`resolve_tta`).

        Returns:
            A :class:`Predictor`.
        """
        run_dir = Path(run_dir)
        meta = read_meta(run_dir)
        return cls(load_model(run_dir, meta), meta, device, tta)

    def _logits_of(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(batch.to(self.device, memory_format=torch.channels_last)).float().cpu()


class OnnxPredictor(_ImagePredictor):
    """Runs a bundle's ``model.onnx`` (or ``model.int8.onnx``), written by ``imgtune export``, with ONNX
    Runtime; no PyTorch model.

    >>> OnnxPredictor.load("runs/elpv-20261126-120000").predict(["cell.png"]).top_k(3)

    Args:
        session: the ONNX Runtime session ``predict`` and ``probs_of`` run (all the cores' threads).
        meta: the bundle's ``model.json``.
        tta: ``"flip"`` or ``"none"`` (default: the bundle's).
        model: the graph's file or bytes, for ``predict_files``' one-thread session (see there);
            ``None``: ``predict_files`` decodes in one thread beside ``session`` instead.
    """

    def __init__(self, session, meta: dict, tta: str | None = None, *, model: str | Path | bytes | None = None):
        super().__init__(meta, tta)
        self.session = session
        self.model = model
        self._one_thread = None  # predict_files' session, opened when first needed

    def predict_files(self, paths: Sequence[str | Path], *, bs: int = 32
                      ) -> Iterator[tuple[str | Path, Prediction | None, str | None]]:
        """As :meth:`_ImagePredictor.predict_files`, with every core taking whole batches on the CPU:
        each of :func:`imgtune.system.usable_cores` threads decodes a batch and runs it on a shared
        one-thread session, so decoding and the model fill both cores without the model's threads
        waiting on each other between operators (``bench/speed.py deploy``: ``predict_files`` against
        ``predict_files_one_decoder``). Answers come in order; at most two batches per core are in
        flight, so memory stays a few batches whatever the folder's size.
        """
        workers = usable_cores()
        cpu = self.session.get_providers()[0] == "CPUExecutionProvider"
        if self.model is None or workers < 2 or not cpu:
            yield from super().predict_files(paths, bs=bs)
            return
        if self._one_thread is None:
            self._one_thread = open_session(self.model, threads=1, spinning=False)
        session = self._one_thread

        def run(batch: torch.Tensor) -> torch.Tensor:
            return self._logits_of(batch, session)

        def classify(chunk):
            tensors, errors = self._decode(chunk)
            probs = self.probs_of(torch.stack(list(tensors.values())), run).numpy() if tensors else None
            return chunk, tensors, errors, probs

        chunks = iter(_chunks(paths, bs))
        with ThreadPoolExecutor(workers, thread_name_prefix="imgtune-predict") as pool:
            pending = deque(pool.submit(classify, chunk) for chunk in itertools.islice(chunks, 2 * workers))
            while pending:
                answered = pending.popleft().result()
                pending.extend(pool.submit(classify, chunk) for chunk in itertools.islice(chunks, 1))
                yield from self._rows(*answered)

    @classmethod
    def load(cls, run_dir: str | Path, *, device: str = "cpu", int8: bool = False,
             tta: str | None = None) -> "OnnxPredictor":
        """Open ``model.onnx`` (``int8``: ``model.int8.onnx``) on the CPU (or CUDA, when ``device`` is cuda
        and ONNX Runtime has it), with :func:`imgtune.deploy.onnx_session.session_options` without
        spinning threads: a predictor shares the cores with decoding (``predict_files``' thread, the
        web demo's workers), which threads spinning between operators slow down (``predict_files``
        1.1-1.2x faster without, float32 and int8, in ``bench/speed.py deploy``); ``tta``: see
        :func:`resolve_tta`.

        Raises:
            ImgtuneError: the file is missing, cannot be loaded, or was exported from other weights.
        """
        run_dir = Path(run_dir)
        meta = read_meta(run_dir)
        name = INT8_ONNX_FILE if int8 else ONNX_FILE
        path = run_dir / name
        if not path.is_file():
            raise ImgtuneError(f"{run_dir}: no {name}; write it with `imgtune export {run_dir}{' --int8' if int8 else ''}`")
        session = open_session(path, device=device, spinning=False)
        sha256 = weights_sha256(run_dir)
        check_weights(run_dir, meta, sha256)  # model.json (classes, preprocessing) belongs to these weights
        if session.get_modelmeta().custom_metadata_map.get("weights_sha256") != sha256:
            raise ImgtuneError(f"{path} was exported from other weights than {WEIGHTS_FILE}; "
                               f"re-export with `imgtune export {run_dir}{' --int8' if int8 else ''} --overwrite`")
        return cls(session, meta, tta, model=path)

    def _logits_of(self, batch: torch.Tensor, session=None) -> torch.Tensor:
        images = np.ascontiguousarray(batch.numpy(), dtype=np.float32)
        (logits,) = (session or self.session).run(["logits"], {"images": images})
        return torch.from_numpy(logits)


def _chunks(paths: Sequence, bs: int) -> list[list]:
    paths = list(paths)
    return [paths[start:start + bs] for start in range(0, len(paths), bs)]


def load_predictor(run_dir: str | Path, *, backend: str = "auto", device: str = "cpu", int8: bool = False,
                   tta: str | None = None) -> Predictor | OnnxPredictor:
    """A predictor for the bundle in ``run_dir``.

    Args:
        backend: ``"torch"``, ``"onnx"`` (needs ``model.onnx``), or ``"auto"``: ONNX Runtime when the
            bundle has an up-to-date ``model.onnx``, onnxruntime is installed and ``device`` is the
            CPU, else PyTorch.
        device: ``cpu``, ``cuda`` or ``mps``.
        int8: run ``model.int8.onnx`` (``imgtune export --int8``) on ONNX Runtime; ``backend`` must be
            ``auto`` or ``onnx``.
        tta: ``"flip"`` or ``"none"``.  [default: the bundle's ``model.json``, see :func:`resolve_tta`]

    Raises:
        ImgtuneError: an unknown backend or tta, ``int8`` with the torch backend, or a missing or stale
            ONNX file where ``backend`` or ``int8`` asks for one.
    """
    if backend not in ("auto", "torch", "onnx"):
        raise ImgtuneError(f"unknown backend {backend!r}; choose auto, torch or onnx")
    if tta is not None:
        resolve_tta({}, tta)  # an unknown mode fails here, not as a reason to fall back to PyTorch
    if int8:
        if backend == "torch":
            raise ImgtuneError("int8 runs on ONNX Runtime: choose the onnx (or auto) backend, or drop int8")
        return OnnxPredictor.load(run_dir, device=device, int8=True, tta=tta)
    if backend == "onnx":
        return OnnxPredictor.load(run_dir, device=device, tta=tta)
    if backend == "auto" and str(device) == "cpu" and (Path(run_dir) / ONNX_FILE).is_file():
        try:
            return OnnxPredictor.load(run_dir, device=device, tta=tta)
        except ImgtuneError:
            pass  # onnxruntime missing or a stale model.onnx: PyTorch gives the right answer anyway
    return Predictor.load(run_dir, device=device, tta=tta)
