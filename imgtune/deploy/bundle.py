"""The model bundle: a folder with ``model.safetensors`` and ``model.json``.

``model.safetensors`` holds the weights (loading runs no code); ``model.json`` holds everything needed
to rebuild and use the model: the timm architecture, the classes in output order, image size, resize
method, mean/std, the training config, final metrics, library versions and the SHA-256 of the weights
it belongs to. Loading needs timm and the JSON, not the code version that wrote it.

Both files are written atomically, the weights first: a crash leaves the old pair, the new weights
beside the old ``model.json`` (which loading refuses: the hash differs), or the new pair. Bundles
written before the hash was recorded (imgtune 0.1.0) load without the check.
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path

import timm
import torch

from imgtune.errors import ImgtuneError, describe
from imgtune.files import atomic_write

BUNDLE_FORMAT = 1
WEIGHTS_FILE, META_FILE, ONNX_FILE = "model.safetensors", "model.json", "model.onnx"
INT8_ONNX_FILE = "model.int8.onnx"


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
            ``size``, ``mean`` and ``std``, and is recorded as ``training``; its ``tta`` (``"flip"``, or absent)
            becomes ``model.json``'s top-level ``tta`` (``"flip"`` or ``"none"``), which the predictors read.
        metrics: final metrics to record.

    Returns:
        ``run_dir`` as a Path.
    """
    from safetensors.torch import save

    cfg = dict(config)
    missing = [k for k in ("timm_name", "size", "mean", "std") if k not in cfg]
    if missing:
        raise ImgtuneError(f"the learner's config lacks {', '.join(missing)}: build it with Learner.from_data, "
                           "or give Learner(config=...) the image settings a bundle records")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights = save(state, metadata={"format": "pt"})
    atomic_write(run_dir / WEIGHTS_FILE, weights, fsync=True)
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
        tta=cfg.get("tta") or "none",  # test-time augmentation the predictors apply: "none" or "flip"
        training=cfg,
        metrics=metrics or {},
        versions=versions(),
        weights_sha256=hashlib.sha256(weights).hexdigest(),
    )
    atomic_write(run_dir / META_FILE, json.dumps(meta, indent=2) + "\n", fsync=True)  # last: it vouches for the weights
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
    if not isinstance(meta, dict):
        raise ImgtuneError(f"{meta_path}: not a bundle's model.json (a JSON object)")
    if meta.get("format", 0) > BUNDLE_FORMAT:
        raise ImgtuneError(f"{meta_path}: bundle format {meta['format']} is newer than this imgtune; upgrade imgtune")
    if meta.get("timm_name") is not None:
        check_timm_name(meta["timm_name"], meta_path)
    return meta


def check_timm_name(name, source) -> None:
    """Refuse a ``timm_name`` that is not a plain architecture name: timm reads ``hf-hub:org/model`` or
    ``local-dir:/path`` as a place to fetch or read a config from, which a bundle must not make it do.

    Raises:
        ImgtuneError: naming ``source`` (the ``model.json``).
    """
    if not isinstance(name, str) or not name or any(c in name for c in ":/\\"):
        raise ImgtuneError(f"{source}: timm_name {name!r} is not a plain timm architecture name (no ':' or '/');"
                           " the bundle cannot be loaded")


def load_model(run_dir: Path, meta: dict) -> torch.nn.Module:
    """The bundle's network, rebuilt from ``meta`` (its ``model.json``) with the saved weights, in eval mode.

    Raises:
        ImgtuneError: the weights are not those ``model.json`` was written for (see :func:`check_weights`),
            or do not fit the architecture.
    """
    from safetensors.torch import load

    run_dir = Path(run_dir)
    check_timm_name(meta.get("timm_name"), run_dir / META_FILE)
    data = (run_dir / WEIGHTS_FILE).read_bytes()
    check_weights(run_dir, meta, hashlib.sha256(data).hexdigest())
    try:
        model = timm.create_model(meta["timm_name"], pretrained=False, num_classes=meta["num_classes"])
        model.load_state_dict(load(data))
    except Exception as error:
        raise ImgtuneError(f"{run_dir}: cannot load the bundle ({describe(error)})") from None
    return model.eval()


def check_weights(run_dir: Path, meta: dict, sha256: str | None = None) -> None:
    """Refuse weights that ``model.json`` was not written for: its ``weights_sha256`` must be the
    weights file's (``sha256``, computed when not given). A bundle without the field (imgtune 0.1.0)
    passes.

    Raises:
        ImgtuneError: naming both files.
    """
    recorded = meta.get("weights_sha256")
    if recorded is None:
        return
    if recorded != (sha256 or weights_sha256(Path(run_dir))):
        raise ImgtuneError(f"{run_dir}: {WEIGHTS_FILE} is not the one {META_FILE} was written for (its SHA-256 "
                           "differs): the two files come from different runs or one was cut short; copy both "
                           "from the same run, or train again")


def weights_sha256(run_dir: Path) -> str:
    """The SHA-256 of the bundle's weights file: what an exported model records to prove its origin."""
    return hashlib.sha256((Path(run_dir) / WEIGHTS_FILE).read_bytes()).hexdigest()
