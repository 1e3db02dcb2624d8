"""The frozen body as a function of pictures: batches of images in, pooled features out.

On the CPU the body runs on ONNX Runtime when it is installed (2-4x faster than PyTorch eager for
these networks), after checking that its features match PyTorch's within :data:`FEATURE_TOLERANCE`;
the next batch's pictures load in a thread meanwhile. On a GPU it runs in PyTorch at the learner's
precision (bf16 or fp16), on batches of :data:`GPU_BATCH` pictures that loader processes decode into
pinned memory, normalised and mirrored on the GPU, the features read back one batch late so that
the GPU never waits for the CPU. :mod:`imgtune.train.features` caches them and trains the head on them.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from imgtune.data.cache import ArrayStore, cache_root, file_key
from imgtune.data.loaders import DeviceNormalize, default_num_workers
from imgtune.data.presize import ImageView
from imgtune.data.transforms import tensor_transform
from imgtune.deploy.export import module_to_onnx
from imgtune.files import atomic_write
from imgtune.train.device import autocast, choose_precision

#: Views cached per image: the picture and its mirror image.
FEATURE_VIEWS = 2

#: Largest difference allowed between ONNX Runtime's and PyTorch's features (else PyTorch is used).
FEATURE_TOLERANCE = 1e-4

#: Pictures per call of the body on the CPU (twice as many images with the mirrors; on 2 CPU cores ONNX
#: Runtime runs 32 images at 96/s, 128 at 60/s) and on a GPU (where larger calls keep it busy).
CPU_BATCH, GPU_BATCH = 16, 128


class _Body(nn.Module):
    """The model without its classifier: images to pooled features."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(images), pre_logits=True)

class FeatureExtractor:
    """The frozen body as a function of a batch of normalised images -> (B, F) float32 on the CPU.

    ``cache_dir``: where the exported graph is kept (``False``: in memory only).
    ``backend``: ``"onnx"`` (ONNX Runtime, CPU), ``"torch"``, or ``"auto"``: ONNX Runtime on the CPU
    when installed and its features match PyTorch's on the first batch, else PyTorch (channels_last,
    inference mode, autocast on CUDA at ``precision``: see :func:`imgtune.train.device.choose_precision`).
    """

    def __init__(self, model: nn.Module, *, size: int, device: torch.device, fingerprint: str,
                 backend: str = "auto", cache_dir=None, precision: str = "auto"):
        self.body = _Body(model)
        self.size, self.device, self.fingerprint = size, torch.device(device), fingerprint
        self.precision = choose_precision(self.device, precision)
        self.cache_dir = cache_dir
        self.backend = backend if backend != "auto" else ("onnx" if self.device.type == "cpu" and _has_ort() else "torch")
        self.session = None
        self.checked = self.backend == "torch"
        self.difference: float | None = None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.backend == "onnx" and self.session is None:
            self.session = self._session()
        if not self.checked:
            self.checked = True
            self.difference = float((self._onnx(images[:4]) - self._torch(images[:4])).abs().max())
            if self.difference > FEATURE_TOLERANCE:
                warnings.warn(f"ONNX Runtime's features differ from PyTorch's by {self.difference:.2g};"
                              " computing them with PyTorch instead")
                self.backend, self.session = "torch", None
        return self._onnx(images) if self.backend == "onnx" else self._torch(images)

    @torch.inference_mode()
    def on_device(self, images: torch.Tensor) -> torch.Tensor:
        """PyTorch's features of normalised ``images``, left on the extractor's device (the CPU does not
        wait for the GPU to compute them)."""
        model = self.body.model
        was_training = model.training
        model.eval()
        try:
            images = images.to(self.device, memory_format=torch.channels_last)
            with autocast(self.device, self.precision):
                return self.body(images).float()
        finally:
            model.train(was_training)

    def _torch(self, images: torch.Tensor) -> torch.Tensor:
        return self.on_device(images).cpu()

    def _onnx(self, images: torch.Tensor) -> torch.Tensor:
        (features,) = self.session.run(None, {"images": images.contiguous().numpy().astype(np.float32)})
        return torch.from_numpy(features)

    def _session(self):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        if self.cache_dir is False:  # nothing on disk: the graph stays in memory
            model = _export_body(self.body, self.size)
        else:
            path = cache_root(self.cache_dir) / "onnx" / f"{self.fingerprint}-{self.size}.onnx"
            if not path.is_file():
                atomic_write(path, _export_body(self.body, self.size))
            model = str(path)
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _export_body(body: _Body, size: int) -> bytes:
    """The body as an ONNX graph (dynamic batch)."""
    model = body.model
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        return module_to_onnx(body, torch.zeros(2, 3, size, size, device=device), input_name="images",
                              output_name="features")
    finally:
        model.train(was_training)


def _has_ort() -> bool:
    try:
        import onnx  # noqa: F401  (the exporter needs it)
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def compute_features(
    paths: Sequence[str | Path],
    extractor: FeatureExtractor,
    view: ImageView,
    *,
    mean,
    std,
    store: ArrayStore | None = None,
    batch_size: int | None = None,
    progress=None,
) -> tuple[torch.Tensor, dict]:
    """The features of every file in ``paths``, for :data:`FEATURE_VIEWS` views (picture, mirror).

    Args:
        paths: image files (already checked readable).
        extractor: the frozen body.
        view: how a file becomes the picture (its presize cache is used).
        mean, std: the input normalisation.
        store: where features are cached (``None``: not cached).
        batch_size: pictures per extractor call (twice as many images with the mirrors); default
            :data:`CPU_BATCH` on the CPU, :data:`GPU_BATCH` on a GPU.
        progress: a callable ``progress(done, total)`` called after each batch.

    Returns:
        ``(features, stats)``: a float32 tensor (N, views, F) and ``{"cached": hits, "computed": misses,
        "seconds": ...}``.
    """
    started = time.perf_counter()
    keys = [file_key(path) for path in paths]
    found: dict[int, np.ndarray] = {}
    if store is not None:
        for index, key in enumerate(keys):
            array = store.get(key)
            if array is not None and array.shape[0] == FEATURE_VIEWS:
                found[index] = array
    missing = [i for i in range(len(paths)) if i not in found]
    streamed = extractor.backend == "torch" and extractor.device.type != "cpu"
    batch_size = batch_size or (GPU_BATCH if streamed else CPU_BATCH)
    if missing and progress is not None:
        progress(0, len(missing))
    chunks = [missing[start : start + batch_size] for start in range(0, len(missing), batch_size)]
    if streamed:
        batches = _streamed_features(paths, chunks, extractor, view, mean=mean, std=std)
    else:
        batches = _threaded_features(paths, chunks, extractor, view, mean=mean, std=std)
    for number, (chunk, features) in enumerate(batches):
        for index, array in zip(chunk, features):
            found[index] = array
            if store is not None:
                store.put(keys[index], array)
        if progress is not None:
            progress(min((number + 1) * batch_size, len(missing)), len(missing))
    stacked = torch.from_numpy(np.stack([found[i] for i in range(len(paths))])) if paths else torch.empty(0, FEATURE_VIEWS, 0)
    stats = dict(cached=len(paths) - len(missing), computed=len(missing), seconds=time.perf_counter() - started)
    return stacked, stats


def _threaded_features(paths, chunks: list[list[int]], extractor: FeatureExtractor, view: ImageView, *, mean, std):
    """``(chunk, features (len(chunk), views, F) as NumPy)`` per chunk, for the CPU: the next chunk's
    pictures load in a thread while the body runs on this one (ONNX Runtime and PyTorch release the
    GIL), so loading costs no wall time once the presize cache is warm."""
    to_tensor = tensor_transform(mean, std)

    def load(chunk: list[int]) -> torch.Tensor:
        return torch.stack([to_tensor(view(paths[i])) for i in chunk])

    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(load, chunks[0]) if chunks else None
        for number, chunk in enumerate(chunks):
            images = pending.result()
            if number + 1 < len(chunks):
                pending = pool.submit(load, chunks[number + 1])
            batch = torch.cat([images, images.flip(-1)])  # the views of the chunk, view-major
            yield chunk, extractor(batch).reshape(FEATURE_VIEWS, len(chunk), -1).transpose(0, 1).numpy()


class _Pictures(Dataset):
    """One chunk of pictures per item, as a uint8 batch (for loader processes to decode)."""

    def __init__(self, paths, chunks: list[list[int]], view: ImageView):
        self.paths, self.chunks, self.view = paths, chunks, view
        self.to_tensor = tensor_transform((0, 0, 0), (1, 1, 1), normalize=False)

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, number: int) -> torch.Tensor:
        return torch.stack([self.to_tensor(self.view(self.paths[i])) for i in self.chunks[number]])


def _streamed_features(paths, chunks: list[list[int]], extractor: FeatureExtractor, view: ImageView, *, mean,
                       std, workers: int | None = None):
    """As :func:`_threaded_features`, for a GPU: loader processes decode uint8 chunks into pinned memory,
    each is copied without waiting, normalised and mirrored on the GPU, and its features come back by a
    copy that the CPU waits for only after queueing the next chunk, so the GPU never waits for the CPU."""
    device = extractor.device
    cuda = device.type == "cuda"
    workers = default_num_workers(device) if workers is None else workers
    loader = DataLoader(_Pictures(paths, chunks, view), batch_size=None, num_workers=workers, pin_memory=cuda)
    normalize = DeviceNormalize(mean, std)
    previous = None
    for chunk, images in zip(chunks, loader):
        images = normalize(images.to(device, non_blocking=True))
        features = extractor.on_device(torch.cat([images, images.flip(-1)]))  # the views, view-major
        host = torch.empty(features.shape, dtype=features.dtype, pin_memory=cuda)
        host.copy_(features, non_blocking=cuda)
        copied = torch.cuda.Event() if cuda else None
        if copied is not None:
            copied.record()
        if previous is not None:
            yield _read(*previous)
        previous = chunk, host, copied
    if previous is not None:
        yield _read(*previous)


def _read(chunk: list[int], host: torch.Tensor, copied) -> tuple[list[int], np.ndarray]:
    if copied is not None:
        copied.synchronize()  # this chunk's copy only: the GPU goes on with the next one
    return chunk, host.reshape(FEATURE_VIEWS, len(chunk), -1).transpose(0, 1).numpy()
