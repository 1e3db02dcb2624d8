"""ONNX export: a bundle's model (or any module) as an ONNX graph, checked against PyTorch."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from imgtune.deploy.bundle import ONNX_FILE, load_model, read_meta, weights_sha256
from imgtune.errors import ImgtuneError
from imgtune.files import atomic_write

# float32 logits of the same graph differ only by the order of floating-point sums between the
# two runtimes; 1e-4 is far above that (~1e-5 for efficientnet_lite0) and far below any change of
# prediction.
ONNX_TOLERANCE = 1e-4


def import_onnx(name: str):
    try:
        return __import__(name)
    except ImportError:
        raise ImgtuneError(f"ONNX needs the {name} package (an imgtune dependency): pip install {name}") from None


def module_to_onnx(module: torch.nn.Module, example: torch.Tensor, *, input_name: str,
                   output_name: str | Sequence[str], opset: int = 17) -> bytes:
    """``module`` traced on ``example`` as an ONNX graph whose batch dimension is dynamic
    (``output_name``: one name, or one per output of a module returning several).

    The TorchScript-based exporter (``dynamo=False``): it needs only onnx, traces timm's
    EfficientNet-Lite and ResNet in seconds, and supports dynamic axes. The torch.export-based
    exporter (the default since torch 2.9) also needs onnxscript, another dependency, for the same
    graph of plain convolutions. The legacy exporter warns that it is deprecated; callers check the
    result against PyTorch.
    """
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outputs = [output_name] if isinstance(output_name, str) else list(output_name)
        torch.onnx.export(module, (example,), buffer, input_names=[input_name], output_names=outputs,
                          dynamic_axes={name: {0: "batch"} for name in (input_name, *outputs)},
                          opset_version=opset, dynamo=False)
    return buffer.getvalue()


def export_onnx(run_dir: str | Path, *, opset: int = 17, path: str | Path | None = None,
                overwrite: bool = False) -> Path:
    """Write the bundle's model as ONNX and check it against PyTorch; see :func:`write_onnx`.

    Args:
        run_dir: a bundle folder (``model.safetensors`` + ``model.json``).
        opset: the ONNX opset version.
        path: where to write.  [default: ``model.onnx`` in ``run_dir``]
        overwrite: replace an existing file.

    Returns:
        The ONNX file's path.
    """
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
    onnx = import_onnx("onnx")
    import_onnx("onnxruntime")
    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    path = Path(path) if path is not None else run_dir / ONNX_FILE
    if path.exists() and not overwrite:
        raise ImgtuneError(f"{path}: file exists; pass --overwrite (overwrite=True) to replace it")
    model = load_model(run_dir, meta)
    graph = bundle_graph(run_dir, meta, model, opset=opset)
    onnx.checker.check_model(graph)
    atomic_write(path, graph.SerializeToString())
    difference = onnx_max_difference(run_dir, path, model=model)
    if difference > ONNX_TOLERANCE:
        path.unlink()
        raise ImgtuneError(f"ONNX Runtime's logits differ from PyTorch's by {difference:.2g} "
                           f"(more than {ONNX_TOLERANCE:g}); try another `opset`")
    return path, difference


def bundle_graph(run_dir: Path, meta: dict, model: torch.nn.Module, *, opset: int = 17):
    """The bundle's model as an ``onnx.ModelProto`` (``images`` -> ``logits``, dynamic batch) whose
    metadata describe it: classes, size, resize, mean, std and the SHA-256 of the weights."""
    onnx = import_onnx("onnx")
    example = torch.randn(2, 3, meta["size"], meta["size"])
    graph = onnx.load_from_string(module_to_onnx(model, example, input_name="images", output_name="logits",
                                                 opset=opset))
    onnx.helper.set_model_props(graph, bundle_props(run_dir, meta))
    return graph


def bundle_props(run_dir: Path, meta: dict) -> dict[str, str]:
    """The metadata an exported graph carries so that it can be used without ``model.json``."""
    return dict(classes=json.dumps(meta["classes"]), size=str(meta["size"]), resize=meta.get("resize", "crop"),
                mean=json.dumps(meta["mean"]), std=json.dumps(meta["std"]), tta=meta.get("tta", "none"),
                weights_sha256=weights_sha256(run_dir))


def onnx_max_difference(run_dir: str | Path, path: str | Path | None = None, *, batch_sizes: Sequence[int] = (2, 3),
                        seed: int = 0, model: torch.nn.Module | None = None) -> float:
    """The largest absolute difference between ONNX Runtime's and PyTorch's logits on random inputs.

    One batch per size in ``batch_sizes`` (different sizes prove the batch dimension is dynamic);
    inputs are standard normal, like normalised images, from ``seed``.
    """
    ort = import_onnx("onnxruntime")
    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    model = model if model is not None else load_model(run_dir, meta)
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
