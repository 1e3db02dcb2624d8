"""The frozen body as a function of pictures: batches of images in, pooled features out.

On the CPU the body runs on ONNX Runtime when it is installed (2-4x faster than PyTorch eager for
these networks), after checking that its features match PyTorch's within :data:`FEATURE_TOLERANCE`;
the next batch's pictures load in a thread meanwhile, into one of two preallocated batch buffers, so
that memory is that of two batches whatever the number of images (see :func:`_threaded_features`).
On a GPU it runs in PyTorch at the learner's precision (bf16 or fp16), on batches of
:data:`GPU_BATCH` pictures that loader processes decode into pinned memory, normalised and mirrored
on the GPU, the features read back one batch late so that the GPU never waits for the CPU. :mod:`imgtune.train.features` caches them and trains the head on them.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from imgtune.data.cache import ArrayStore, cache_root, file_key
from imgtune.data.loaders import DeviceNormalize, default_num_workers
from imgtune.data.presize import ImageView
from imgtune.data.transforms import ToNormalizedTensor, tensor_transform
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
        self.backend = backend if backend != "auto" else ("onnx" if self.device.type == "cpu" and has_onnx_runtime() else "torch")
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
        with eval_mode(self.body.model), autocast(self.device, self.precision):
            return self.body(images.to(self.device, memory_format=torch.channels_last)).float()

    def _torch(self, images: torch.Tensor) -> torch.Tensor:
        return self.on_device(images).cpu()

    def _onnx(self, images: torch.Tensor) -> torch.Tensor:
        # No copy of a contiguous float32 batch (astype would make one per call).
        batch = np.ascontiguousarray(images.contiguous().numpy(), dtype=np.float32)
        (features,) = self.session.run(None, {"images": batch})
        return torch.from_numpy(features)

    def _session(self):
        return cached_session(lambda: _export_body(self.body, self.size), cache_dir=self.cache_dir,
                              name=self.fingerprint, size=self.size)


def cached_session(export, *, cache_dir, name: str, size: int):
    """An ONNX Runtime session (:func:`imgtune.deploy.onnx_session.open_session`, this process's torch
    threads) on the graph ``export()`` makes, kept in the cache as ``onnx/<name>-<size>.onnx`` and
    exported only when missing there (``cache_dir=False``: in memory only)."""
    from imgtune.deploy.onnx_session import open_session

    if cache_dir is False:  # nothing on disk: the graph stays in memory
        model = export()
    else:
        model = cache_root(cache_dir) / "onnx" / f"{name}-{size}.onnx"
        if not model.is_file():
            atomic_write(model, export())
    return open_session(model, threads=torch.get_num_threads())


def _export_body(body: _Body, size: int) -> bytes:
    """The body as an ONNX graph (dynamic batch)."""
    device = next(body.model.parameters()).device
    with eval_mode(body.model):
        return module_to_onnx(body, torch.zeros(2, 3, size, size, device=device), input_name="images",
                              output_name="features")


@contextmanager
def eval_mode(module: nn.Module):
    """``module`` and its submodules in eval mode while the block runs, each put back in the mode it
    had (a frozen body's BatchNorm layers stay in eval mode in a training model)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


def has_onnx_runtime() -> bool:
    """Whether ONNX Runtime and the exporter's onnx package are installed."""
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
    table = _FeatureTable(len(paths))
    missing = []
    for index, key in enumerate(keys):
        if not table.put(index, store.get(key) if store is not None else None):
            missing.append(index)
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
            table.put(index, array, computed=True)
            if store is not None:
                store.put(keys[index], array)
        if progress is not None:
            progress(min((number + 1) * batch_size, len(missing)), len(missing))
    stats = dict(cached=len(paths) - len(missing), computed=len(missing), seconds=time.perf_counter() - started)
    return table.tensor(), stats


class _FeatureTable:
    """The features of a whole set in one (N, views, F) float32 array, allocated once F is known.

    Each batch's (and each cached entry's) features are copied in and not kept: the arrays that come
    out of the body are freed at once, instead of the whole set's small arrays staying scattered
    among the per-batch buffers, which kept the C allocator from reusing or returning their memory.
    """

    def __init__(self, count: int):
        self.count, self.array = count, None

    def put(self, index: int, features: np.ndarray | None, *, computed: bool = False) -> bool:
        """Copy ``features`` (views, F) into row ``index``; ``False`` for a missing or misshapen cached entry."""
        if features is None or features.ndim != 2 or features.shape[0] != FEATURE_VIEWS:
            if computed:
                raise ValueError(f"features of shape {getattr(features, 'shape', None)}, not ({FEATURE_VIEWS}, F)")
            return False
        if self.array is None:
            self.array = np.empty((self.count, FEATURE_VIEWS, features.shape[1]), np.float32)
        elif features.shape[1] != self.array.shape[2]:
            if computed:
                raise ValueError(f"features of width {features.shape[1]}, not {self.array.shape[2]}")
            return False
        self.array[index] = features
        return True

    def tensor(self) -> torch.Tensor:
        if self.array is None:
            return torch.empty(self.count, FEATURE_VIEWS, 0)
        return torch.from_numpy(self.array)


def _threaded_features(paths, chunks: list[list[int]], extractor: FeatureExtractor, view: ImageView, *, mean, std):
    """``(chunk, features (len(chunk), views, F) as NumPy)`` per chunk, for the CPU, from
    :func:`picture_batches`. The features yielded are a view of the body's output: copy them before
    the next batch."""
    for chunk, images in picture_batches(paths, chunks, view, mean=mean, std=std):
        yield chunk, extractor(images).reshape(FEATURE_VIEWS, len(chunk), -1).transpose(0, 1).numpy()


def picture_batches(paths, chunks: list[list[int]], view: ImageView, *, mean, std):
    """``(chunk, images)`` per chunk: the chunk's normalised pictures, then their mirror images
    (view-major, ``(2 * len(chunk), 3, size, size)`` float32), for a network on the CPU. The next
    chunk's pictures load in a thread while the caller runs the network on this one (ONNX Runtime and
    PyTorch release the GIL), so loading costs no wall time once the presize cache is warm.

    Memory stays that of two batches, whatever the number of images: the pictures go straight from
    their cached uint8 arrays into one of two float32 buffers allocated here (the thread fills one
    while the caller reads the other), are mirrored there and normalised in place; no per-picture
    tensor or PIL image is made, and nothing allocated in the thread is freed by the caller's. The
    images yielded are overwritten two chunks later: use them before asking for the next one.
    """
    if not chunks:
        return
    longest = max(len(chunk) for chunk in chunks)
    buffers = [np.empty((FEATURE_VIEWS * longest, 3, view.size, view.size), np.float32) for _ in range(2)]
    normalize = ToNormalizedTensor(mean, std).normalize_  # in place, bit for bit the loaders' arithmetic

    def load(chunk: list[int], buffer: np.ndarray) -> torch.Tensor:
        for slot, index in enumerate(chunk):
            picture = view.array(paths[index]).transpose(2, 0, 1)  # C x H x W, C = 1 (grey) or 3
            if picture.shape[1:] != buffer.shape[2:]:
                raise ValueError(f"{paths[index]}: presized to {picture.shape[1:]}, not {buffer.shape[2:]}")
            np.copyto(buffer[slot], picture)  # a grey picture fills the three channels
            np.copyto(buffer[len(chunk) + slot], picture[..., ::-1])  # its mirror image
        return normalize(torch.from_numpy(buffer[: FEATURE_VIEWS * len(chunk)]))

    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(load, chunks[0], buffers[0])
        for number, chunk in enumerate(chunks):
            images = pending.result()  # view-major: the pictures, then their mirrors
            if number + 1 < len(chunks):  # into the other buffer, which the caller is done with
                pending = pool.submit(load, chunks[number + 1], buffers[(number + 1) % 2])
            yield chunk, images


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
