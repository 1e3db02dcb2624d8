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
from imgtune.errors import ImgtuneError
from imgtune.learner import AUTO_STEPS

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
                     help="A CSV of file,label[,split]; file names are relative to DATA (or the CSV's folder)."),
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
        click.option("--bs", default=32, show_default=True, help="Batch size."),
        click.option("--num-workers", type=int, default=None, help="Loader processes.  [default: one per core, max 8]"),
        click.option("--device", default=None, help="cuda, mps or cpu.  [default: the fastest present]"),
    ]
    for option in reversed(options):
        function = option(function)
    return function


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
@click.option("--no-report", is_flag=True, help="Skip report.html (interpretation and figures) at the end.")
@click.option("--out", type=click.Path(file_okay=False), help="Run folder.  [default: runs/<data>-<timestamp>]")
@click.option("--overwrite", is_flag=True, help="Allow writing into a non-empty --out folder.")
def train(data, label_re, csv_path, data_dir, valid_pct, stratify, seed, arch, weights, size, resize, bs,
          num_workers, device, epochs, freeze_epochs, lr, no_augment, no_report, out, overwrite):
    """Fine-tune a pretrained network on DATA: a folder, a dataset name (see `imgtune datasets`),
    or nothing for the embedded default (elpv solar cells).

    Trains the new head with the body frozen, then everything with discriminative learning rates
    (the fast.ai lesson-1 recipe), and writes the model bundle, metrics.json and summary.txt.
    """
    from imgtune.runs import train as run_training

    result = run_training(
        data, arch=arch, epochs=parse_epochs(epochs, "--epochs"),
        freeze_epochs=parse_epochs(freeze_epochs, "--freeze-epochs"), lr=parse_lr(lr), weights=weights, size=size,
        resize=resize, bs=bs, augment=not no_augment, num_workers=num_workers, seed=seed, device=device, out=out,
        overwrite=overwrite, report=not no_report, command=shlex.join(["imgtune", *sys.argv[1:]]),
        **_data_kwargs(label_re, csv_path, data_dir, valid_pct, stratify),
    )
    click.echo((result.run_dir / "summary.txt").read_text().rstrip())
    click.secho(f"validation accuracy {100 * result.metrics['valid_accuracy']:.2f}%", bold=True)
    click.echo(f"run saved to {result.run_dir} (model.safetensors, model.json, metrics.json, summary.txt"
               f"{', report.html' if not no_report else ''})")


@cli.command("lr-find")
@data_options
@model_options
@click.option("--unfrozen", is_flag=True, help="Sweep with the whole network trainable (default: head only).")
@click.option("--steps", default=100, show_default=True, help="Sweep steps (one batch each) at most.")
@click.option("--out", type=click.Path(dir_okay=False), help="PNG of the curve.  [default: runs/lr_find-<data>-<timestamp>.png]")
@click.option("--overwrite", is_flag=True, help="Allow replacing an existing --out file.")
def lr_find(data, label_re, csv_path, data_dir, valid_pct, stratify, seed, arch, weights, size, resize, bs,
            num_workers, device, unfrozen, steps, out, overwrite):
    """Sweep the learning rate on DATA, print the suggestion and save the curve as a PNG."""
    from imgtune.data import load_data
    from imgtune.learner import Learner
    from imgtune.report import plot_lr_find
    from imgtune.runs import default_run_dir

    default = default_run_dir(data)
    path = Path(out) if out else default.with_name(f"lr_find-{default.name}.png")
    if path.exists() and not overwrite:
        raise ImgtuneError(f"{path}: file exists; choose another --out or pass --overwrite")
    images = load_data(data, seed=seed, **_data_kwargs(label_re, csv_path, data_dir, valid_pct, stratify))
    learner = Learner.from_data(images, arch, weights=weights, size=size, resize=resize, bs=bs,
                                num_workers=num_workers, seed=seed, device=device)
    if unfrozen:
        learner.unfreeze()
    result = learner.lr_find(num_steps=steps)
    path.parent.mkdir(parents=True, exist_ok=True)
    plot_lr_find(result, path)
    s = result.suggestion
    click.echo(f"suggested lr {s['suggested']:.2g} (minimum/10 {s['minimum']:.2g}, steepest {s['steepest']:.2g})")
    click.echo(f"curve saved to {path}")


PROGRESS_MIN_FILES = 100  # fewer files finish before a progress bar would tell anything


def image_files(paths) -> list[Path]:
    """PATHs as files: a folder gives its image files (recursively, sorted), a file itself."""
    from imgtune.data import is_image_file

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
def predict(run_dir, images, top_k, as_json, csv_path, overwrite, bs, backend, device):
    """Classify IMAGES (files, or folders searched recursively) with the model in RUN_DIR
    (a folder written by `imgtune train`)."""
    import csv

    from tqdm import tqdm

    from imgtune.export import load_predictor

    if csv_path and Path(csv_path).exists() and not overwrite:
        raise ImgtuneError(f"{csv_path}: file exists; choose another --csv or pass --overwrite")
    predictor = load_predictor(run_dir, backend=backend, device=device)
    files = image_files(images)
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
    from imgtune.export import write_onnx

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
    from imgtune.export import read_meta
    from imgtune.interpret import Interpretation
    from imgtune.report import write_report

    images = None
    if data is not None or csv_path is not None:
        from imgtune.data import load_data

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
    from imgtune.serve import create_app

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
    from imgtune.datasets import CATALOGUE, DEFAULT

    for info in CATALOGUE.values():
        offline = "available offline" if info.available() else "needs a download (or --data-dir)"
        default = "  [default]" if info.name == DEFAULT else ""
        click.echo(f"{info.name:<12} {offline}{default}\n  {info.description}\n  source: {info.source};"
                   f" license: {info.license}")


def main() -> None:
    """The ``imgtune`` console script."""
    cli.main()
