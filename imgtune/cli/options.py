"""Options several commands share, the parsers of their values, and the keyword arguments they become.

Nothing here imports torch or the library's stages: ``--help`` and usage errors stay quick.
"""

from __future__ import annotations

import click

#: Fewer files than this finish before a progress bar would tell anything.
PROGRESS_MIN_FILES = 100


def parse_lr(value: str | None) -> float | tuple[float, float] | None:
    """``"1e-3"`` -> 1e-3; ``"1e-6:1e-4"`` -> (1e-6, 1e-4); ``None`` or ``"auto"`` -> None (lr finder)."""
    if value is None or value == "auto":
        return None
    try:
        parts = [float(v) for v in value.split(":")]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number or LOW:HIGH pair, e.g. 1e-3 or 1e-6:1e-4") from None
    if len(parts) > 2 or any(p <= 0 for p in parts):
        raise click.BadParameter(f"{value!r}: give one positive rate or a LOW:HIGH pair")
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


def parse_epochs(value: str, name: str) -> int | None:
    """``"auto"`` -> None (chosen from the dataset size); otherwise a count >= 0."""
    if value == "auto":
        return None
    if not value.isdigit():
        raise click.BadParameter(f"{value!r} is not a whole number or 'auto'", param_hint=name)
    return int(value)


def parse_tune_stages(value: str) -> int | str:
    """``"auto"`` -> ``"auto"``; otherwise a count of stages >= 0 (``--tune-stages``)."""
    if value == "auto":
        return value
    if not value.isdigit():
        raise click.BadParameter(f"{value!r} is not a whole number or 'auto'", param_hint="--tune-stages")
    return int(value)


def _apply(options: list, function):
    """Decorate ``function`` with ``options``, the first listed shown first in ``--help``."""
    for option in reversed(options):
        function = option(function)
    return function


def data_options(function):
    """Options that say where the labelled images are and how to split them."""
    return _apply([
        click.argument("data", required=False),
        click.option("--label-re", help="Read labels from file names with this regex's first group, "
                     "e.g. '^(.+)_\\d+\\.(jpe?g|png)$' for Oxford pets.  [default: class subfolders]"),
        click.option("--csv", "csv_path", type=click.Path(dir_okay=False),
                     help="A CSV of file,label[,split][,group]; file names are relative to DATA (or the CSV's folder); "
                     "rows of one group (e.g. a session) stay on one side of the split."),
        click.option("--data-dir", type=click.Path(file_okay=False),
                     help="A local copy of a named dataset (e.g. the pets images), used instead of downloading."),
        click.option("--valid-pct", default=0.2, show_default=True,
                     help="Fraction held out for validation when the data gives no train/valid split."),
        click.option("--stratify", is_flag=True, help="Hold out --valid-pct of each class (instead of overall)."),
        click.option("--seed", default=42, show_default=True, help="Seeds the split, the head, shuffling, augmentation."),
    ], function)


def model_options(function):
    """Options that choose the backbone and how images are fed to it."""
    return _apply([
        click.option("--arch", default="efficientnet_lite0", show_default=True,
                     help="Backbone: efficientnet_lite0/1/2 (offline weights), resnet34, resnet50, or any timm name."),
        click.option("--weights", default="imagenet", show_default=True,
                     help="imagenet, none (random init), a .safetensors/.pth file, or an earlier run folder."),
        click.option("--size", type=int, default=None,
                     help="Image side in pixels.  [default: the backbone's: 224, lite1 240, lite2 260]"),
        click.option("--resize", type=click.Choice(["crop", "squish", "pad"]), default="crop", show_default=True,
                     help="How images become square: centre crop, squish, or pad with black."),
        click.option("--bs", type=click.IntRange(1), default=None,
                     help="Batch size (per process under torchrun).  [default: 32; on a GPU with the free memory for "
                     "it 64 or 128]"),
        click.option("--num-workers", type=int, default=None,
                     help="Loader processes.  [default: one per core, max 8; on a GPU every core but one; "
                     "divided among torchrun's processes]"),
        click.option("--device", default=None, help="cuda, mps or cpu.  [default: the fastest present]"),
    ], function)


#: ``--precision``'s values (imgtune.train.device.PRECISIONS, spelled out here: no torch import for --help).
PRECISIONS = ("auto", "bf16", "fp16", "fp32")

PRECISION_OPTION = click.option(
    "--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
    help="On a CUDA GPU: bf16 autocast, fp16 autocast with loss scaling, or fp32; auto is bf16 on GPUs that "
    "compute in it natively (compute capability 8.0 on: A100, H100, RTX 30xx...), else fp16. Off CUDA: fp32.")

LOG_OPTION = click.option(
    "--log", type=click.Choice(["tensorboard"]), default=None,
    help="Also log to TensorBoard: event files in the run folder (see them with `tensorboard --logdir runs`; "
    "needs pip install 'imgtune[tensorboard]'). history.csv is always written.")

COMPILE_OPTION = click.option(
    "--compile", "compile_model", is_flag=True,
    help="torch.compile the network for its training steps (not for the head on cached features). For a GPU: "
    "the first steps wait for the compilation; on a CPU a short run loses more than it gains.")


def device_option(what: str):
    """``--device``, default ``auto``: CUDA when a GPU is present, else the CPU (see :func:`resolve_device`)."""
    return click.option("--device", default="auto", show_default=True,
                        help=f"Where {what} runs: cuda, mps or cpu; auto: cuda when a CUDA GPU is present, else cpu.")


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when PyTorch sees a CUDA GPU, else ``"cpu"``; any other value as given.
    Imports torch: call it inside a command, after the usage checks."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


CACHE_DIR_OPTION = click.option("--cache-dir", type=click.Path(file_okay=False),
                                help="Cache folder.  [default: $IMGTUNE_CACHE or ~/.cache/imgtune]")


def cache_options(function):
    """The options of the disk caches (presized images, frozen-backbone features)."""
    return _apply([
        click.option("--no-feature-cache", is_flag=True,
                     help="Run the frozen body on every step instead of training the head on features computed "
                     "once per image."),
        click.option("--no-cache", is_flag=True, help="Keep nothing on disk: decode every image every epoch."),
        CACHE_DIR_OPTION,
    ], function)


def parallel_options(function):
    """Options for large effective batches: accumulation, and SyncBatchNorm under torchrun."""
    return _apply([
        click.option("--accumulate", type=click.IntRange(1), default=1, show_default=True,
                     help="Micro-batches of --bs per optimizer step: the effective batch is bs x processes x N."),
        click.option("--sync-bn", is_flag=True,
                     help="Under torchrun on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm)."),
    ], function)


def cache_kwargs(no_feature_cache: bool, no_cache: bool, cache_dir) -> dict:
    """The cache options as the library's keyword arguments."""
    return {"feature_cache": not no_feature_cache, "cache": not no_cache, "cache_dir": cache_dir}


def data_kwargs(label_re, csv_path, data_dir, valid_pct, stratify) -> dict:
    """The data options (less DATA and --seed) as :func:`imgtune.load_data`'s keyword arguments."""
    return {"label_re": label_re, "csv_path": csv_path, "data_dir": data_dir, "valid_pct": valid_pct,
            "stratify": stratify}


def fit_threads_to_cores() -> None:
    """PyTorch's compute threads: no more than the cores usable here (a container's CPU quota included);
    more only take turns on the same cores. Loader processes use one thread each (PyTorch's default).

    Called first by the commands that compute with PyTorch, so that the others never import it.
    """
    import torch

    from imgtune.system import usable_cores

    cores = usable_cores()
    if torch.get_num_threads() > cores:
        torch.set_num_threads(cores)
