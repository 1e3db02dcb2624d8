"""The command line: thin commands that turn options into keyword arguments for the library.

Errors a user can fix print one line to stderr and exit 1 (2 for usage errors); ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import json
import shlex
import sys
import traceback
from pathlib import Path

import click

from imgtune import __version__
from imgtune.train import distributed
from imgtune.errors import ImgtuneError
from imgtune.train.learner import AUTO_STEPS

EPILOG_TRAIN = """\b
Examples:
  imgtune train                                # the embedded default dataset (elpv)
  imgtune train data/bears                     # one subfolder per class
  imgtune train pets --data-dir ~/pets/images  # a named dataset from a local copy
  imgtune train ~/pets/images --label-re '^(.+)_\\d+\\.jpg$' --valid-pct 0.5 --stratify
  imgtune train --csv labels.csv photos/       # a CSV of file,label[,split]
  imgtune train pets --weights runs/pets-1 --freeze-epochs 0 --epochs 2 --lr 1e-6:1e-4
"""


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


def data_options(function):
    """Options that say where the labelled images are and how to split them."""
    options = [
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
    ]
    for option in reversed(options):
        function = option(function)
    return function


def model_options(function):
    """Options that choose the backbone and how images are fed to it."""
    options = [
        click.option("--arch", default="efficientnet_lite0", show_default=True,
                     help="Backbone: efficientnet_lite0/1/2 (offline weights), resnet34, resnet50, or any timm name."),
        click.option("--weights", default="imagenet", show_default=True,
                     help="imagenet, none (random init), a .safetensors/.pth file, or an earlier run folder."),
        click.option("--size", type=int, default=None,
                     help="Image side in pixels.  [default: the backbone's: 224, lite1 240, lite2 260]"),
        click.option("--resize", type=click.Choice(["crop", "squish", "pad"]), default="crop", show_default=True,
                     help="How images become square: centre crop, squish, or pad with black."),
        click.option("--bs", default=32, show_default=True, help="Batch size (per process under torchrun)."),
        click.option("--num-workers", type=int, default=None, help="Loader processes.  [default: one per core, max 8]"),
        click.option("--device", default=None, help="cuda, mps or cpu.  [default: the fastest present]"),
    ]
    for option in reversed(options):
        function = option(function)
    return function


CACHE_DIR_OPTION = click.option("--cache-dir", type=click.Path(file_okay=False),
                                help="Cache folder.  [default: $IMGTUNE_CACHE or ~/.cache/imgtune]")


def cache_options(function):
    """The options of the disk caches (presized images, frozen-backbone features)."""
    options = [
        click.option("--no-feature-cache", is_flag=True,
                     help="Run the frozen body on every step instead of training the head on features computed "
                     "once per image."),
        click.option("--no-cache", is_flag=True, help="Keep nothing on disk: decode every image every epoch."),
        CACHE_DIR_OPTION,
    ]
    for option in reversed(options):
        function = option(function)
    return function


def parallel_options(function):
    """Options for large effective batches: accumulation, and SyncBatchNorm under torchrun."""
    options = [
        click.option("--accumulate", type=click.IntRange(1), default=1, show_default=True,
                     help="Micro-batches of --bs per optimizer step: the effective batch is bs x processes x N."),
        click.option("--sync-bn", is_flag=True,
                     help="Under torchrun on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm)."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _cache_kwargs(no_feature_cache: bool, no_cache: bool, cache_dir) -> dict:
    return dict(feature_cache=not no_feature_cache, cache=not no_cache, cache_dir=cache_dir)


def _data_kwargs(label_re, csv_path, data_dir, valid_pct, stratify) -> dict:
    return dict(label_re=label_re, csv_path=csv_path, data_dir=data_dir, valid_pct=valid_pct, stratify=stratify)


class ImgtuneGroup(click.Group):
    """Turns every error into one line on stderr and an exit status, as a user expects of a tool."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        args = list(sys.argv[1:] if args is None else args)
        debug = "--debug" in args
        try:
            code = super().main(args, prog_name=prog_name or "imgtune", complete_var=complete_var,
                                standalone_mode=False, **extra)
        except click.UsageError as error:
            hint = f" (see '{error.ctx.command_path} --help')" if error.ctx else ""
            _fail(f"{error.format_message()}{hint}", 2)
        except click.Abort:
            _fail("interrupted", 130)
        except click.ClickException as error:
            _fail(error.format_message(), error.exit_code)
        except ImgtuneError as error:
            if debug:
                traceback.print_exc()
            _fail(str(error), 1)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except Exception as error:  # a bug: still one line, unless --debug
            if debug:
                traceback.print_exc()
            lost = distributed.lost_peer_message(error)  # under torchrun: another process died or hung
            if lost:
                _fail(lost, 1)
            _fail(f"internal error: {type(error).__name__}: {error} (run with --debug for the traceback)", 1)
        sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str, code: int) -> None:
    click.secho(f"imgtune: error: {message}", fg="red", err=True)
    sys.exit(code)


@click.group(cls=ImgtuneGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="imgtune")
@click.option("--debug", is_flag=True, help="Show the full traceback on errors.")
def cli(debug: bool) -> None:
    """imgtune: fine-tune an ImageNet-pretrained network on your labelled images, offline, on one machine."""
    _fit_threads_to_cores()


def _fit_threads_to_cores() -> None:
    """PyTorch's compute threads: no more than the cores usable here (a container's CPU quota included);
    more only take turns on the same cores. Loader processes use one thread each (PyTorch's default)."""
    import torch

    from imgtune.system import usable_cores

    cores = usable_cores()
    if torch.get_num_threads() > cores:
        torch.set_num_threads(cores)


@cli.command(epilog=EPILOG_TRAIN)
@data_options
@model_options
@click.option("--epochs", default="auto", show_default=True,
              help=f"Epochs with the whole network unfrozen; auto: enough for {AUTO_STEPS['unfrozen']} steps, "
              "at least 2.")
@click.option("--freeze-epochs", default="auto", show_default=True,
              help=f"Epochs training the new head only, first; auto: enough for {AUTO_STEPS['frozen']} steps, "
              "at least 1.")
@click.option("--lr", default=None, help="Learning rate: a number, or LOW:HIGH for discriminative rates "
              "(first layers..head) once unfrozen.  [default: auto, from the lr finder]")
@click.option("--no-augment", is_flag=True, help="Turn off training augmentation.")
@cache_options
@parallel_options
@click.option("--no-report", is_flag=True, help="Skip report.html (interpretation and figures) at the end.")
@click.option("--out", type=click.Path(file_okay=False), help="Run folder.  [default: runs/<data>-<timestamp>]")
@click.option("--overwrite", is_flag=True, help="Allow writing into a non-empty --out folder.")
def train(data, label_re, csv_path, data_dir, valid_pct, stratify, seed, arch, weights, size, resize, bs,
          num_workers, device, epochs, freeze_epochs, lr, no_augment, no_feature_cache, no_cache, cache_dir, accumulate,
          sync_bn, no_report, out, overwrite):
    """Fine-tune a pretrained network on DATA: a folder, a dataset name (see `imgtune datasets`),
    or nothing for the embedded default (elpv solar cells).

    Trains the new head with the body frozen, then everything with discriminative learning rates
    (the fast.ai lesson-1 recipe), and writes the model bundle, metrics.json and summary.txt.
    """
    from imgtune.train.run import train as run_training

    device = distributed.setup(device)  # under torchrun: one process per GPU (or share of the CPU)
    result = run_training(
        data, arch=arch, epochs=parse_epochs(epochs, "--epochs"),
        freeze_epochs=parse_epochs(freeze_epochs, "--freeze-epochs"), lr=parse_lr(lr), weights=weights, size=size,
        resize=resize, bs=bs, augment=not no_augment, num_workers=num_workers, seed=seed, device=device, out=out,
        overwrite=overwrite, report=not no_report, command=shlex.join(["imgtune", *sys.argv[1:]]),
        **_cache_kwargs(no_feature_cache, no_cache, cache_dir), accumulate=accumulate, sync_bn=sync_bn,
        **_data_kwargs(label_re, csv_path, data_dir, valid_pct, stratify),
    )
    distributed.teardown()
    if not distributed.is_main():
        return
    click.echo((result.run_dir / "summary.txt").read_text().rstrip())
    click.secho(f"validation accuracy {100 * result.metrics['valid_accuracy']:.2f}%", bold=True)
    click.echo(f"run saved to {result.run_dir} (model.safetensors, model.json, metrics.json, summary.txt"
               f"{', report.html' if not no_report else ''})")


@cli.command("lr-find")
@data_options
@model_options
@click.option("--unfrozen", is_flag=True, help="Sweep with the whole network trainable (default: head only).")
@click.option("--steps", default=100, show_default=True, help="Sweep steps (one batch each) at most.")
@cache_options
@parallel_options
@click.option("--out", type=click.Path(dir_okay=False), help="PNG of the curve.  [default: runs/lr_find-<data>-<timestamp>.png]")
@click.option("--overwrite", is_flag=True, help="Allow replacing an existing --out file.")
def lr_find(data, label_re, csv_path, data_dir, valid_pct, stratify, seed, arch, weights, size, resize, bs,
            num_workers, device, unfrozen, steps, no_feature_cache, no_cache, cache_dir, accumulate, sync_bn, out,
            overwrite):
    """Sweep the learning rate on DATA, print the suggestion and save the curve as a PNG."""
    from imgtune.data.loaders import load_data
    from imgtune.train.learner import Learner
    from imgtune.explain.report import plot_lr_find
    from imgtune.train.run import default_run_dir

    default = default_run_dir(data)
    path = Path(out) if out else default.with_name(f"lr_find-{default.name}.png")
    if path.exists() and not overwrite:
        raise ImgtuneError(f"{path}: file exists; choose another --out or pass --overwrite")
    device = distributed.setup(device)  # under torchrun: every process sweeps its shard, in step
    images = load_data(data, seed=seed, **_data_kwargs(label_re, csv_path, data_dir, valid_pct, stratify))
    learner = Learner.from_data(images, arch, weights=weights, size=size, resize=resize, bs=bs,
                                num_workers=num_workers, seed=seed, device=device, accumulate=accumulate,
                                sync_bn=sync_bn, **_cache_kwargs(no_feature_cache, no_cache, cache_dir))
    if unfrozen:
        learner.unfreeze()
    result = learner.lr_find(num_steps=steps)
    distributed.teardown()
    if not distributed.is_main():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    plot_lr_find(result, path)
    s = result.suggestion
    click.echo(f"suggested lr {s['suggested']:.2g} (minimum/10 {s['minimum']:.2g}, steepest {s['steepest']:.2g})")
    click.echo(f"curve saved to {path}")


PROGRESS_MIN_FILES = 100  # fewer files finish before a progress bar would tell anything


def image_files(paths) -> list[Path]:
    """PATHs as files: a folder gives its image files (recursively, sorted), a file itself."""
    from imgtune.data.sources import is_image_file

    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p))
            if not found:
                raise ImgtuneError(f"{path}: no image files in this folder or below")
            files += found
        else:
            files.append(path)
    return files


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--top-k", default=3, show_default=True, help="How many classes to show per image.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per image instead of text.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False),
              help="Write file,label,probability,top_k,error rows to this CSV instead of printing.")
@click.option("--overwrite", is_flag=True, help="Allow replacing an existing --csv file.")
@click.option("--bs", default=32, show_default=True, help="Images per batch.")
@click.option("--backend", type=click.Choice(["auto", "torch", "onnx"]), default="auto", show_default=True,
              help="onnx: ONNX Runtime on model.onnx (see `imgtune export`); auto: onnx when model.onnx exists.")
@click.option("--device", default="cpu", show_default=True, help="cuda, mps or cpu.")
@click.option("--group-by", "group_by", type=click.Path(dir_okay=False),
              help="A manifest.csv from `imgtune render`: print one prediction per session (the mean "
              "log-probability of its windows) instead of one per image.")
def predict(run_dir, images, top_k, as_json, csv_path, overwrite, bs, backend, device, group_by):
    """Classify IMAGES (files, or folders searched recursively) with the model in RUN_DIR
    (a folder written by `imgtune train`)."""
    import csv

    from tqdm import tqdm

    from imgtune.deploy.predict import load_predictor

    if csv_path and Path(csv_path).exists() and not overwrite:
        raise ImgtuneError(f"{csv_path}: file exists; choose another --csv or pass --overwrite")
    predictor = load_predictor(run_dir, backend=backend, device=device)
    files = image_files(images)
    if group_by:
        return _predict_sessions(predictor, files, group_by, top_k=top_k, as_json=as_json, csv_path=csv_path, bs=bs)
    # A file named on the command line is shown as typed; one found in a folder as found.
    shown = {Path(p): p for p in images}
    out = open(csv_path, "w", newline="") if csv_path else None
    writer = csv.writer(out) if out else None
    if writer:
        writer.writerow(["file", "label", "probability", "top_k", "error"])
    failed = 0
    results = predictor.predict_files(files, bs=bs)
    try:
        for path, prediction, error in tqdm(results, total=len(files), unit="image", file=sys.stderr,
                                            disable=len(files) < PROGRESS_MIN_FILES):
            name = str(shown.get(path, path))
            if error is not None:
                failed += 1
                if writer:
                    writer.writerow([name, "", "", "", error])
                if as_json and not writer:
                    click.echo(json.dumps({"file": name, "error": error}))
                else:
                    click.echo(f"error: {error}", err=True)
                continue
            top = prediction.top_k(top_k)[0]
            if writer:
                writer.writerow([name, top[0][0], f"{top[0][1]:.6f}", ";".join(f"{c}:{p:.6f}" for c, p in top), ""])
            elif as_json:
                click.echo(json.dumps({"file": name, "top_k": [{"label": c, "probability": round(p, 6)} for c, p in top]}))
            else:
                ranked = "  ".join(f"{c} {100 * p:.1f}%" for c, p in top)
                click.echo(f"{name}: {ranked}")
    finally:
        if out:
            out.close()
    if writer:
        click.echo(f"{len(files) - failed} predictions written to {csv_path}")
    if failed:
        raise ImgtuneError(f"{failed} of {len(files)} images could not be read")


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--format", "export_format", type=click.Choice(["onnx"]), default="onnx", show_default=True,
              help="The exported model's format.")
@click.option("--opset", default=17, show_default=True, help="ONNX opset version.")
@click.option("--overwrite", is_flag=True, help="Allow replacing an existing model.onnx.")
def export(run_dir, export_format, opset, overwrite):
    """Write RUN_DIR's model as model.onnx (dynamic batch; input "images", normalised NCHW float32;
    output "logits") and check that ONNX Runtime's logits match PyTorch's within 1e-4."""
    from imgtune.deploy.export import write_onnx

    path, difference = write_onnx(run_dir, opset=opset, overwrite=overwrite)
    click.echo(f"{path}")
    click.echo(f"max logit difference ONNX Runtime vs PyTorch: {difference:.2e} (batches of 2 and 3)")


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@data_options
@click.option("--top-k", "k", default=9, show_default=True, help="How many top losses to show.")
@click.option("--min-count", default=1, show_default=True, help="Smallest count of a confused pair to list.")
@click.option("--device", default="cpu", show_default=True, help="cuda, mps or cpu.")
def interpret(run_dir, data, label_re, csv_path, data_dir, valid_pct, stratify, seed, k, min_count, device):
    """Rebuild RUN_DIR's report.html and print the most confused pairs and the top losses.

    Without DATA it uses the run's own validation set (split.csv); with DATA (any source `train`
    accepts) it uses that data's validation split, whose classes must be among the model's.
    """
    from imgtune.deploy.bundle import read_meta
    from imgtune.explain.interpret import Interpretation
    from imgtune.explain.report import write_report

    images = None
    if data is not None or csv_path is not None:
        from imgtune.data.loaders import load_data

        images = load_data(data, seed=seed, **_data_kwargs(label_re, csv_path, data_dir, valid_pct, stratify))
    interp = Interpretation.from_run(run_dir, images, device=device)
    metrics_path = Path(run_dir) / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    report = write_report(run_dir, interp=interp, metrics=metrics, meta=read_meta(run_dir), k=k)
    click.echo(f"validation accuracy {100 * interp.accuracy:.2f}% on {len(interp.targets)} images")
    pairs = interp.most_confused(min_count)
    click.echo("\nmost confused (actual -> predicted: count)")
    width = max([len(a) for a, _, _ in pairs] + [6])
    for actual, predicted, count in pairs[:20]:
        click.echo(f"  {actual:<{width}} -> {predicted}: {count}")
    if not pairs:
        click.echo("  none")
    click.echo("\ntop losses")
    click.echo(f"  {'loss':>7}  {'p':>5}  actual / predicted  file")
    for item in interp.top_losses(k):
        name = Path(item.path).name if item.path else str(item.index)
        click.echo(f"  {item.loss:>7.3f}  {item.probability:>5.2f}  {item.actual} / {item.predicted}  {name}")
    click.echo(f"\nreport written to {report}")


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 makes the demo reachable from other machines.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port to listen on.")
@click.option("--max-bytes", type=click.IntRange(1), default=10_000_000, show_default=True,
              help="Largest upload accepted (413 above).")
@click.option("--max-pixels", type=click.IntRange(1), default=40_000_000, show_default=True,
              help="Most pixels an image may have, read from its header before decoding (413 above).")
@click.option("--timeout", type=click.FloatRange(0, min_open=True), default=30.0, show_default=True, help="Seconds one prediction may take (504 after).")
@click.option("--backend", type=click.Choice(["auto", "torch", "onnx"]), default="auto", show_default=True,
              help="What runs the predictions; Grad-CAM always uses PyTorch.")
def serve(run_dir, host, port, max_bytes, max_pixels, timeout, backend):
    """Serve a web demo of RUN_DIR's model: a page to upload or photograph an image and see the top
    classes with the Grad-CAM overlay, and its JSON API (POST /api/predict; schema at /openapi.json)."""
    from imgtune.serve.app import create_app

    app = create_app(run_dir, max_bytes=max_bytes, max_pixels=max_pixels, timeout=timeout, backend=backend)
    try:
        import uvicorn
    except ImportError:
        raise ImgtuneError("the web demo needs uvicorn: pip install 'imgtune[serve]'") from None

    click.echo(f"serving {run_dir} on http://{host}:{port}/ (Ctrl-C stops)")
    uvicorn.run(app, host=host, port=port, log_level="info")


@cli.command()
def datasets():
    """List the named datasets and whether each can be used offline right now."""
    from imgtune.data.catalogue import CATALOGUE, DEFAULT

    for info in CATALOGUE.values():
        offline = "available offline" if info.available() else "needs a download (or --data-dir)"
        default = "  [default]" if info.name == DEFAULT else ""
        click.echo(f"{info.name:<12} {offline}{default}\n  {info.description}\n  source: {info.source};"
                   f" license: {info.license}")


# --- Your own dataset (issue 4): download (doctor and clean are further down) ----------------------


@cli.command()
@click.argument("source", type=click.Path(dir_okay=False))
@click.option("--dest", required=True, type=click.Path(file_okay=False),
              help="Folder to fill: the class folder for a list of URLs, the dataset folder for a url,label CSV.")
@click.option("--workers", default=8, show_default=True, help="Downloads at the same time.")
@click.option("--timeout", type=click.FloatRange(0, min_open=True), default=10.0, show_default=True,
              help="Seconds to connect and between reads (a whole download: ten times this).")
@click.option("--retries", type=click.IntRange(0), default=2, show_default=True,
              help="Tries again after a timeout, a connection error, 429 or 5xx, with exponential backoff.")
@click.option("--max-bytes", type=click.IntRange(1), default=20_000_000, show_default=True,
              help="Largest file accepted.")
@click.option("--retry-failed", is_flag=True, help="Also try again URLs that failed for good in an earlier run.")
def download(source, dest, workers, timeout, retries, max_bytes, retry_failed):
    """Download the images listed in SOURCE (a text file of URLs, or a CSV of url,label) into --dest.

    Only files that decode as images are kept, exact duplicates are skipped, and a manifest in --dest
    (.imgtune-downloads.json) makes a second run fetch only what is still missing.
    """
    from tqdm import tqdm

    from imgtune.curate.download import download_images
    from imgtune.curate.download import read_sources

    total = len(read_sources(source))
    with tqdm(total=total, unit="url", file=sys.stderr, disable=total < PROGRESS_MIN_FILES) as bar:
        report = download_images(source, dest, workers=workers, timeout=timeout, retries=retries, max_bytes=max_bytes,
                              retry_failed=retry_failed, progress=lambda url, outcome: bar.update())
    click.echo(report.summary())


# --- Not only vision (issue 8): render sequences as images, predict per session ---------------------


@cli.command()
@click.argument("source", type=click.Path(file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--kind", type=click.Choice(["mouse", "series"]), default="mouse", show_default=True,
              help="mouse: mouse session CSVs (record timestamp,client timestamp,button,state,x,y); "
              "series: CSVs of numeric columns.")
@click.option("--window", default="256", show_default=True,
              help="Window length: events (rows), or seconds with an s suffix, e.g. 10s.")
@click.option("--overlap", type=click.FloatRange(0, 1, max_open=True), default=0.5, show_default=True,
              help="Fraction of each window shared with the next.")
@click.option("--size", type=click.IntRange(16), default=224, show_default=True, help="Image side in pixels.")
@click.option("--style", type=click.Choice(["line", "recurrence", "gaf"]), default="line", show_default=True,
              help="series only: line plot (one band per column), recurrence plot, or Gramian angular field.")
@click.option("--columns", help="series only: comma-separated columns to draw.  [default: all but --time-col]")
@click.option("--time-col", help="series only: a column of seconds (needed for windows in seconds).")
@click.option("--workers", type=click.IntRange(1), default=None, help="Processes.  [default: one per core]")
@click.option("--overwrite", is_flag=True, help="Allow writing into a non-empty OUT (an earlier render's images "
              "listed in its manifest are removed first).")
def render(source, out, kind, window, overlap, size, style, columns, time_col, workers, overwrite):
    """Draw every session file in SOURCE/<label>/ as images of overlapping windows: OUT/<label>/*.png
    and OUT/manifest.csv (file,label,group,start,end,t_start,t_end; group = the session).

    Train on it with `imgtune train OUT --csv OUT/manifest.csv` (windows of one session stay on one
    side of the split) and score sessions with `imgtune predict RUN OUT --group-by OUT/manifest.csv`.
    """
    from imgtune.sequences.render import find_sessions, parse_window, render_sessions

    length, unit = parse_window(window)
    result = render_sessions(
        find_sessions(source), out, kind=kind, size=size, window=length, overlap=overlap, unit=unit, style=style,
        columns=[c.strip() for c in columns.split(",") if c.strip()] if columns else None, time_column=time_col,
        workers=workers, overwrite=overwrite,
    )
    counts = ", ".join(f"{label} {n}" for label, n in sorted(result.counts.items()))
    click.echo(f"{result.images} images from {result.sessions} sessions in {result.seconds:.1f}s: {counts}")
    if result.skipped:
        click.echo(f"{len(result.skipped)} sessions too short to draw: {', '.join(result.skipped[:5])}"
                   f"{' ...' if len(result.skipped) > 5 else ''}")
    click.echo(f"manifest {result.manifest}; train with: imgtune train {out} --csv {result.manifest}")


def _predict_sessions(predictor, files, manifest, *, top_k, as_json, csv_path, bs) -> None:
    """`imgtune predict --group-by`: one line (or CSV row) per session of the manifest."""
    import contextlib
    import csv

    from imgtune.sequences.render import predict_groups, read_manifest

    group_of = read_manifest(manifest)
    missing = [f for f in files if f.resolve() not in group_of]
    if missing:
        raise ImgtuneError(f"{missing[0]}: not listed in {manifest} ({len(missing)} of {len(files)} images are not);"
                           " pass the folder that manifest describes")
    scores, errors = predict_groups(predictor, files, [group_of[f.resolve()] for f in files], bs=bs)
    for _, error in errors:
        click.echo(f"error: {error}", err=True)
    order = (-scores.probs).argsort(axis=1)[:, :min(top_k, len(scores.classes))]
    ranked = [[(scores.classes[j], float(scores.probs[g, j])) for j in row] for g, row in enumerate(order)]
    with open(csv_path, "w", newline="") if csv_path else contextlib.nullcontext() as out:
        writer = csv.writer(out) if out else None
        if writer:
            writer.writerow(["group", "label", "probability", "top_k", "windows"])
        for group, top, count in zip(scores.groups, ranked, scores.counts.tolist()):
            if writer:
                writer.writerow([group, top[0][0], f"{top[0][1]:.6f}", ";".join(f"{c}:{p:.6f}" for c, p in top), count])
            elif as_json:
                click.echo(json.dumps({"group": group, "windows": count,
                                       "top_k": [{"label": c, "probability": round(p, 6)} for c, p in top]}))
            else:
                click.echo(f"{group} ({count} windows): " + "  ".join(f"{c} {100 * p:.1f}%" for c, p in top))
    if writer:
        click.echo(f"{len(scores.groups)} session predictions written to {csv_path}")
    if errors:
        raise ImgtuneError(f"{len(errors)} of {len(files)} images could not be read")


# --- Your own dataset (issue 4), continued: doctor, clean -------------------------------------------


@cli.command()
@data_options
@click.option("--out", type=click.Path(file_okay=False),
              help="Folder for doctor.json and doctor.html.  [default: runs/doctor-<data>-<timestamp>]")
@click.option("--min-side", default=64, show_default=True, help="Images with a shorter side are reported as tiny.")
@click.option("--max-aspect", default=4.0, show_default=True, help="Longer/shorter side above this is reported.")
@click.option("--near-distance", default=4, show_default=True,
              help="Perceptual hashes (64 bits) at most this many bits apart are near duplicates (-1: skip).")
@click.option("--no-mislabels", is_flag=True, help="Skip the mislabel finder (it computes ImageNet features).")
@click.option("--mislabels", "mislabel_count", default=20, show_default=True, help="Suspected mislabels to list.")
@click.option("--arch", default="efficientnet_lite0", show_default=True, help="Backbone whose features judge labels.")
@click.option("--weights", default="imagenet", show_default=True, help="Its weights (imagenet, none, a file).")
@click.option("--fix", "do_fix", is_flag=True,
              help="Move the files of the --fix-kinds problems into a quarantine folder beside the data.")
@click.option("--fix-kinds", default="corrupt,duplicate,conflict", show_default=True,
              help="Problem kinds --fix moves (also: not_image, tiny, aspect, leak, near_duplicate, near_conflict, "
              "near_leak).")
@click.option("--undo", "do_undo", is_flag=True, help="Undo every logged --fix and `imgtune clean` change, newest first.")
def doctor(data, label_re, csv_path, data_dir, valid_pct, stratify, seed, out, min_side, max_aspect, near_distance,
           no_mislabels, mislabel_count, arch, weights, do_fix, fix_kinds, do_undo):
    """Check DATA (any source `train` accepts) for unreadable files, tiny or odd images, exact and near
    duplicates within a class, across classes and across the train/valid split, imbalance, mixed
    grayscale/colour and likely mislabels; write doctor.json and an HTML gallery of the problems.

    --fix quarantines problem files (never deletes, never overwrites) and logs the moves in
    <data>.quarantine/changes.jsonl; --undo moves them back.
    """
    from imgtune.curate import doctor as doc
    from imgtune.train.run import default_run_dir

    if do_undo:
        root = doc.data_root(data, csv_path)
        if root is None:
            raise ImgtuneError("--undo needs the data folder (or --csv) that was changed")
        changes = doc.undo(root)
        click.echo(f"undid {len(changes)} changes logged in {doc.ChangeLog(root).path}")
        return
    diagnosis = doc.diagnose(data, seed=seed, min_side=min_side, max_aspect=max_aspect, near_distance=near_distance,
                           mislabels=0 if no_mislabels else mislabel_count,
                           features=None if no_mislabels else _feature_function(arch, weights),
                           **_data_kwargs(label_re, csv_path, data_dir, valid_pct, stratify))
    click.echo(diagnosis.summary())
    default = default_run_dir(data)
    json_path, html_path = doc.write_outputs(diagnosis, out or default.with_name(f"doctor-{default.name}"))
    click.echo(f"report written to {json_path} and {html_path}")
    if do_fix:
        moves = doc.fix(diagnosis, [k.strip() for k in fix_kinds.split(",") if k.strip()])
        again = shlex.join(["imgtune", "doctor", *([str(data)] if data else []),
                            *(["--csv", str(csv_path)] if csv_path else []), "--undo"])
        click.echo(f"moved {len(moves)} files to {doc.quarantine_dir(diagnosis.root)} (undo: {again})")


def _feature_function(arch: str, weights: str):
    """``paths -> features`` with a progress bar, for the mislabel finder."""
    from functools import partial

    from imgtune.train.features import imagenet_features

    return partial(imagenet_features, arch=arch, weights=weights, progress=True)


@cli.command()
@click.argument("data", type=click.Path(file_okay=False))
@click.option("--label-re", help="Labels from file names with this regex's first group (relabelling is then off).")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False),
              help="A CSV of file,label[,split]; relabelling rewrites its rows.")
@click.option("--run", "run_dir", type=click.Path(file_okay=False),
              help="Rank by this run's model (its loss on each image) instead of the out-of-fold mislabel finder.")
@click.option("--arch", default="efficientnet_lite0", show_default=True, help="Backbone for the mislabel finder.")
@click.option("--weights", default="imagenet", show_default=True, help="Its weights (imagenet, none, a file).")
@click.option("--port", type=click.IntRange(0, 65535), default=8001, show_default=True, help="Port on 127.0.0.1.")
@click.option("--device", default="cpu", show_default=True, help="Where --run's model runs: cuda, mps or cpu.")
@click.option("--undo", "do_undo", is_flag=True, help="Undo every logged change (page and doctor --fix), newest first.")
def clean(data, label_re, csv_path, run_dir, arch, weights, port, device, do_undo):
    """Serve a page on 127.0.0.1 showing DATA's images most suspicious first (label vs. the model's
    prediction), with buttons to keep, relabel (move to another class folder, or rewrite the CSV row)
    or quarantine each; every change is logged and can be undone on the page or with --undo."""
    from imgtune.curate.clean import CleanSession, create_app
    from imgtune.curate.doctor import ChangeLog, data_root, undo

    if do_undo:
        root = data_root(data, csv_path)
        if root is None:
            raise ImgtuneError(f"{data}: no such folder; --undo needs the data folder that was changed")
        changes = undo(root)
        click.echo(f"undid {len(changes)} changes logged in {ChangeLog(root).path}")
        return
    try:
        import uvicorn
    except ImportError:
        raise ImgtuneError("imgtune clean needs uvicorn: pip install 'imgtune[serve]'") from None
    session = CleanSession(data, label_re=label_re, csv_path=csv_path, run_dir=run_dir, arch=arch, weights=weights,
                           device=device)
    click.echo(f"cleaning {session.root}: {len(session.entries)} images on http://127.0.0.1:{port}/ (Ctrl-C stops;"
               f" changes are logged in {session.log.path})")
    uvicorn.run(create_app(session), host="127.0.0.1", port=port, log_level="warning")


# --- the disk caches (presized images, features) -------------------------------------------------

@cli.group("cache")
def cache_group() -> None:
    """See or clear the caches that make later runs fast (presized images, backbone features)."""


@cache_group.command("info")
@CACHE_DIR_OPTION
def cache_info(cache_dir):
    """Where the cache is and how much each kind of entry takes."""
    from imgtune.data import cache

    click.echo(f"cache: {cache.cache_root(cache_dir)}")
    for kind, used in cache.usage(cache_dir).items():
        click.echo(f"  {kind:<9} {used['files']:>7} files  {used['bytes'] / 1e6:>9.1f} MB")


@cache_group.command("clear")
@CACHE_DIR_OPTION
@click.option("--only", type=click.Choice(["presized", "features", "onnx"]), multiple=True,
              help="Clear only this kind (repeatable).  [default: all three; downloaded datasets are kept]")
def cache_clear(cache_dir, only):
    """Delete cached entries; the next run rebuilds what it needs. Downloaded datasets are kept."""
    from imgtune.data import cache

    removed = cache.clear(cache_dir, kinds=only or cache.KINDS)
    files, size = sum(r["files"] for r in removed.values()), sum(r["bytes"] for r in removed.values())
    click.echo(f"removed {files} files ({size / 1e6:.1f} MB) from {cache.cache_root(cache_dir)}")


def main() -> None:
    """The ``imgtune`` console script."""
    cli.main()
