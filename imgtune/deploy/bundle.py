"""The model bundle: a folder with ``model.safetensors`` and ``model.json``.

``model.safetensors`` holds the weights (loading runs no code); ``model.json`` holds everything needed
to rebuild and use the model: the timm architecture, the classes in output order, image size, resize
method, mean/std, the training config, final metrics and library versions. Loading needs timm and
the JSON, not the code version that wrote it.
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path

import timm
import torch

from imgtune.errors import ImgtuneError

BUNDLE_FORMAT = 1
WEIGHTS_FILE, META_FILE, ONNX_FILE = "model.safetensors", "model.json", "model.onnx"


def versions() -> dict[str, str]:
    """The versions of imgtune and the libraries a bundle was written with (recorded in ``model.json``)."""
    import torchvision

    from imgtune import __version__

    return dict(imgtune=__version__, torch=torch.__version__, torchvision=torchvision.__version__,
                timm=timm.__version__, python=platform.python_version())


def save_bundle(run_dir: str | Path, *, model: torch.nn.Module, classes: Sequence[str], config: Mapping,
                metrics: dict | None = None) -> Path:
    """Write ``model.safetensors`` and ``model.json`` into ``run_dir``.

    Args:
        run_dir: the bundle's folder (made if missing).
        model: the trained network (its state dict is saved).
        classes: the class names in output order.
        config: the training config as plain data (``dict(learner.config)``); it must hold ``timm_name``,
            ``size``, ``mean`` and ``std``, and is recorded as ``training``.
        metrics: final metrics to record.

    Returns:
        ``run_dir`` as a Path.
    """
    from safetensors.torch import save_file

    cfg = dict(config)
    missing = [k for k in ("timm_name", "size", "mean", "std") if k not in cfg]
    if missing:
        raise ImgtuneError(f"the learner's config lacks {', '.join(missing)}: build it with Learner.from_data, "
                           "or give Learner(config=...) the image settings a bundle records")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(run_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    meta = dict(
        format=BUNDLE_FORMAT,
        arch=cfg.get("arch"),
        timm_name=cfg["timm_name"],
        num_classes=len(classes),
        classes=list(classes),
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


def load_model(run_dir: Path, meta: dict) -> torch.nn.Module:
    """The bundle's network, rebuilt from ``meta`` (its ``model.json``) with the saved weights, in eval mode."""
    from safetensors.torch import load_file

    try:
        model = timm.create_model(meta["timm_name"], pretrained=False, num_classes=meta["num_classes"])
        model.load_state_dict(load_file(str(run_dir / WEIGHTS_FILE)))
    except Exception as error:
        raise ImgtuneError(f"{run_dir}: cannot load the bundle ({type(error).__name__}: {str(error)[:150]})") from None
    return model.eval()


def weights_sha256(run_dir: Path) -> str:
    """The SHA-256 of the bundle's weights file: what an exported model records to prove its origin."""
    return hashlib.sha256((run_dir / WEIGHTS_FILE).read_bytes()).hexdigest()
