"""imgtune: fine-tune an ImageNet-pretrained network on a folder of labelled images, offline, on one machine.

Every public name is imported from its module on first use (PEP 562), so ``from imgtune import
Predictor`` loads the predictor and what it needs, never the training code.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

__all__ = [
    "CATALOGUE",
    "CheckpointCallback",
    "EarlyStopping",
    "History",
    "ImageData",
    "ImgtuneError",
    "Interpretation",
    "Item",
    "LRFinderResult",
    "Learner",
    "PETS_LABEL_RE",
    "Prediction",
    "Predictor",
    "ProgressCallback",
    "REGISTRY",
    "TopLoss",
    "UnreadableImageError",
    "__version__",
    "aggregate_windows",
    "create_model",
    "diagnose",
    "doc",
    "download_images",
    "export_onnx",
    "find_mislabels",
    "find_sessions",
    "imagenet_features",
    "load_data",
    "load_image",
    "load_predictor",
    "render_sessions",
    "run_training",
    "set_seed",
]

#: Where each public name lives: ``"module"``, or ``"module:attribute"`` when the public name differs.
_SOURCES = {
    "CATALOGUE": "imgtune.data.catalogue",
    "CheckpointCallback": "imgtune.train.callbacks",
    "EarlyStopping": "imgtune.train.callbacks",
    "History": "imgtune.train.callbacks",
    "ImageData": "imgtune.data.loaders",
    "ImgtuneError": "imgtune.errors",
    "Interpretation": "imgtune.explain.interpret",
    "Item": "imgtune.data.sources",
    "LRFinderResult": "imgtune.train.lr_find",
    "Learner": "imgtune.train.learner",
    "PETS_LABEL_RE": "imgtune.data.sources",
    "Prediction": "imgtune.deploy.predict",
    "Predictor": "imgtune.deploy.predict",
    "ProgressCallback": "imgtune.train.callbacks",
    "REGISTRY": "imgtune.models",
    "TopLoss": "imgtune.explain.interpret",
    "UnreadableImageError": "imgtune.errors",
    "aggregate_windows": "imgtune.sequences.groups",
    "create_model": "imgtune.models",
    "diagnose": "imgtune.curate.doctor",
    "doc": "imgtune.help",
    "download_images": "imgtune.curate.download",
    "export_onnx": "imgtune.deploy.export",
    "find_mislabels": "imgtune.curate.mislabel",
    "find_sessions": "imgtune.sequences.render",
    "imagenet_features": "imgtune.train.features",
    "load_data": "imgtune.data.loaders",
    "load_image": "imgtune.data.images",
    "load_predictor": "imgtune.deploy.predict",
    "render_sessions": "imgtune.sequences.render",
    # The whole run `imgtune train` makes; `imgtune.train` is the subpackage, so the function gets a verb.
    "run_training": "imgtune.train.run:train",
    "set_seed": "imgtune.train.build",
}


def __getattr__(name: str):
    """Import a public name's module the first time the name is used, and keep the name here."""
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module 'imgtune' has no attribute {name!r}")
    module, _, attribute = source.partition(":")
    value = getattr(importlib.import_module(module), attribute or name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
