"""``imgtune train`` and ``imgtune lr-find``: the library's training code is imported inside each command."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from imgtune.cli.options import (
    COMPILE_OPTION,
    LOG_OPTION,
    PRECISION_OPTION,
    cache_kwargs,
    cache_options,
    data_kwargs,
    data_options,
    fit_threads_to_cores,
    model_options,
    parallel_options,
    parse_epochs,
    parse_lr,
    parse_tune_stages,
)
from imgtune.errors import ImgtuneError
from imgtune.train.defaults import AUTO_STEPS, PARTIAL

EPILOG_TRAIN = """\b
Examples:
  imgtune train                                # the embedded default dataset (elpv)
  imgtune train data/bears                     # one subfolder per class
  imgtune train pets --data-dir ~/pets/images  # a named dataset from a local copy
  imgtune train ~/pets/images --label-re '^(.+)_\\d+\\.jpg$' --valid-pct 0.5 --stratify
  imgtune train --csv labels.csv photos/       # a CSV of file,label[,split]
  imgtune train pets --weights runs/pets-1 --freeze-epochs 0 --epochs 2 --lr 1e-6:1e-4
"""


@click.command(epilog=EPILOG_TRAIN)
@data_options
@model_options
@click.option("--epochs", default="auto", show_default=True,
              help=f"Epochs with the whole network unfrozen (with --tune-stages N: of the partial phase); auto: on a "
              f"GPU enough for {AUTO_STEPS['unfrozen']} steps, at least 2; on a CPU none, or partial fine-tuning "
              "(--tune-stages auto).")
@click.option("--freeze-epochs", default="auto", show_default=True,
              help=f"Epochs training the new head only, first; auto: enough for {AUTO_STEPS['frozen']} steps, "
              "at least 1.")
@click.option("--lr", default=None, help="Learning rate: a number, or LOW:HIGH for discriminative rates "
              "(first layers..head) once unfrozen.  [default: auto, from the lr finder]")
@click.option("--no-augment", is_flag=True, help="Turn off training augmentation.")
@click.option("--balance/--no-balance", default=None,
              help="Weigh the training loss by inverse class frequency, so that each class counts as much as the "
              "others (for imbalanced classes); --no-balance: plain cross-entropy.  [default: mild, inverse "
              "frequency to the power 0.25; plain cross-entropy on balanced classes]")
@click.option("--tta", is_flag=True, help="Test-time augmentation: validate (and, in the bundle, predict) on the mean "
              "probabilities of each picture and its mirror image.")
@click.option("--tune-stages", default="auto", show_default=True, metavar="N|auto",
              help="On a CPU, after the head: fine-tune the body's last N stages on their cached input maps "
              f"(--epochs of them); auto (only without --epochs): when the training split has >= {PARTIAL['min_images_per_class']} images per "
              f"class, the most stages (<= {PARTIAL['max_stages']}) that fit about {PARTIAL['budget_seconds']:.0f} s; "
              "0: the head only. Ignored on a GPU (whole-network fine-tuning).")
@cache_options
@parallel_options
@PRECISION_OPTION
@COMPILE_OPTION
@LOG_OPTION
@click.option("--no-report", is_flag=True, help="Skip report.html (interpretation and figures) at the end.")
@click.option("--out", type=click.Path(file_okay=False), help="Run folder.  [default: runs/<data>-<timestamp>]")
@click.option("--overwrite", is_flag=True, help="Allow writing into a non-empty --out folder (replaces the files "
              "an earlier run wrote there, listed in its run.json; no others).")
@click.option("--resume", type=click.Path(file_okay=False), help="Continue the run in this folder after the last "
              "epoch its checkpoint.pt saved; give the same DATA and options the run was started with (checked).")
@click.option("--checkpoint-every", default=10.0, show_default=True, metavar="SECONDS",
              help="Save checkpoint.pt after an epoch only if this long has passed since the last one (the "
              "last epoch of each phase always); 0: after every epoch.")
def train(data, label_re, csv_path, data_dir, valid_pct, stratify, seed, arch, weights, size, resize, bs,
          num_workers, device, epochs, freeze_epochs, lr, no_augment, balance, tta, tune_stages, no_feature_cache, no_cache, cache_dir,
          accumulate, sync_bn, precision, compile_model, log, no_report, out, overwrite, resume, checkpoint_every):
    """Fine-tune a pretrained network on DATA: a folder, a dataset name (see `imgtune datasets`),
    or nothing for the embedded default (elpv solar cells).

    Trains the new head with the body frozen, then everything with discriminative learning rates
    (the fast.ai lesson-1 recipe), and writes the model bundle, metrics.json and summary.txt.
    """
    epochs, freeze_epochs = parse_epochs(epochs, "--epochs"), parse_epochs(freeze_epochs, "--freeze-epochs")
    lr = parse_lr(lr)  # usage errors first, before the seconds of importing torch
    tune_stages = parse_tune_stages(tune_stages)
    fit_threads_to_cores()
    from imgtune.train import distributed
    from imgtune.train.run import train as run_training

    device = distributed.setup(device)  # under torchrun: one process per GPU (or share of the CPU)
    result = run_training(
        data, arch=arch, epochs=epochs, freeze_epochs=freeze_epochs, lr=lr, weights=weights, size=size,
        resize=resize, bs=bs, augment=not no_augment, num_workers=num_workers, seed=seed, device=device, out=out,
        overwrite=overwrite, report=not no_report, command=shlex.join(["imgtune", *sys.argv[1:]]), resume=resume,
        checkpoint_every=checkpoint_every, balance="mild" if balance is None else balance, tta=tta, log=log, tune_stages=tune_stages,
        **cache_kwargs(no_feature_cache, no_cache, cache_dir), accumulate=accumulate, sync_bn=sync_bn,
        precision=precision, compile_model=compile_model, **data_kwargs(label_re, csv_path, data_dir, valid_pct, stratify),
    )
    distributed.teardown()
    if not distributed.is_main():
        return
    click.echo((result.run_dir / "summary.txt").read_text().rstrip())
    click.secho(f"validation accuracy {100 * result.metrics['valid_accuracy']:.2f}% (balanced accuracy "
                f"{100 * result.metrics['balanced_accuracy']:.2f}%)", bold=True)
    written = ", report.html" if not no_report and "report_error" not in result.metrics else ""
    click.echo(f"run saved to {result.run_dir} (model.safetensors, model.json, metrics.json, summary.txt{written})")


@click.command("lr-find")
@data_options
@model_options
@click.option("--unfrozen", is_flag=True, help="Sweep with the whole network trainable (default: head only).")
@click.option("--steps", default=100, show_default=True, help="Sweep steps (one batch each) at most.")
@cache_options
@parallel_options
@PRECISION_OPTION
@click.option("--out", type=click.Path(dir_okay=False), help="PNG of the curve.  [default: runs/lr_find-<data>-<timestamp>.png]")
@click.option("--overwrite", is_flag=True, help="Allow replacing an existing --out file.")
def lr_find(data, label_re, csv_path, data_dir, valid_pct, stratify, seed, arch, weights, size, resize, bs,
            num_workers, device, unfrozen, steps, no_feature_cache, no_cache, cache_dir, accumulate, sync_bn, precision,
            out, overwrite):
    """Sweep the learning rate on DATA, print the suggestion and save the curve as a PNG."""
    fit_threads_to_cores()
    from imgtune.data.loaders import load_data
    from imgtune.explain.figures import figure_png
    from imgtune.train import distributed
    from imgtune.train.learner import Learner
    from imgtune.train.run import default_run_dir

    default = default_run_dir(data)
    path = Path(out) if out else default.with_name(f"lr_find-{default.name}.png")
    if path.exists() and not overwrite:
        raise ImgtuneError(f"{path}: file exists; choose another --out or pass --overwrite")
    device = distributed.setup(device)  # under torchrun: every process sweeps its shard, in step
    images = load_data(data, seed=seed, **data_kwargs(label_re, csv_path, data_dir, valid_pct, stratify))
    learner = Learner.from_data(images, arch, weights=weights, size=size, resize=resize, bs=bs,
                                num_workers=num_workers, seed=seed, device=device, accumulate=accumulate,
                                sync_bn=sync_bn, precision=precision, **cache_kwargs(no_feature_cache, no_cache, cache_dir))
    if unfrozen:
        learner.unfreeze()
    result = learner.lr_find(num_steps=steps)
    distributed.teardown()
    if not distributed.is_main():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    figure_png(result.plot(), path)
    s = result.suggestion
    click.echo(f"suggested lr {s['suggested']:.2g} (minimum/10 {s['minimum']:.2g}, steepest {s['steepest']:.2g})")
    click.echo(f"curve saved to {path}")
