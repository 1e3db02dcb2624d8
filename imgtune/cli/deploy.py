"""``imgtune predict``, ``imgtune export`` and ``imgtune serve``: use a trained run; no training code is imported."""

from __future__ import annotations

import contextlib
import csv
import json
from pathlib import Path

import click

from imgtune.cli.options import PROGRESS_MIN_FILES, device_option, fit_threads_to_cores, resolve_device
from imgtune.errors import ImgtuneError

BACKENDS = click.Choice(["auto", "torch", "onnx"])


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


def _top_k_text(top: list[tuple[str, float]]) -> str:
    """``label:prob;label:prob``, the CSV's top_k column."""
    return ";".join(f"{c}:{p:.6f}" for c, p in top)


def _top_k_json(top: list[tuple[str, float]]) -> list[dict]:
    return [{"label": c, "probability": round(p, 6)} for c, p in top]


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--top-k", default=3, show_default=True, help="How many classes to show per image.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per image instead of text.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False),
              help="Write file,label,probability,top_k,error rows to this CSV instead of printing.")
@click.option("--overwrite", is_flag=True, help="Allow replacing an existing --csv file.")
@click.option("--bs", default=32, show_default=True, help="Images per batch.")
@click.option("--backend", type=BACKENDS, default="auto", show_default=True,
              help="onnx: ONNX Runtime on model.onnx (see `imgtune export`); auto: onnx when model.onnx exists.")
@device_option("the model")
@click.option("--int8", is_flag=True, help="Run model.int8.onnx (see `imgtune export --int8`) on ONNX Runtime.")
@click.option("--tta/--no-tta", default=None,
              help="Average each image's probabilities with its mirror image's (--tta) or not. "
              "[default: as the run was trained, its model.json's \"tta\"]")
@click.option("--group-by", "group_by", type=click.Path(dir_okay=False),
              help="A manifest.csv from `imgtune render`: print one prediction per session (the mean "
              "log-probability of its windows) instead of one per image.")
def predict(run_dir, images, top_k, as_json, csv_path, overwrite, bs, backend, device, int8, tta, group_by):
    """Classify IMAGES (files, or folders searched recursively) with the model in RUN_DIR
    (a folder written by `imgtune train`)."""
    fit_threads_to_cores()
    from imgtune.deploy.predict import load_predictor

    if csv_path and Path(csv_path).exists() and not overwrite:
        raise ImgtuneError(f"{csv_path}: file exists; choose another --csv or pass --overwrite")
    predictor = load_predictor(run_dir, backend=backend, device=resolve_device(device), int8=int8,
                               tta=None if tta is None else ("flip" if tta else "none"))
    files = image_files(images)
    _hint_onnx(predictor, Path(run_dir), len(files), backend)
    if group_by:
        return _predict_sessions(predictor, files, group_by, top_k=top_k, as_json=as_json, csv_path=csv_path, bs=bs)
    # A file named on the command line is shown as typed; one found in a folder as found.
    shown = {Path(p): p for p in images}
    with open(csv_path, "w", newline="") if csv_path else contextlib.nullcontext() as out:
        writer = csv.writer(out) if out else None
        if writer:
            writer.writerow(["file", "label", "probability", "top_k", "error"])
        failed = _predict_each(predictor.predict_files(files, bs=bs), len(files), shown, writer=writer,
                               top_k=top_k, as_json=as_json)
    if writer:
        click.echo(f"{len(files) - failed} predictions written to {csv_path}")
    if failed:
        raise ImgtuneError(f"{failed} of {len(files)} images could not be read")


#: From this many files on, ``imgtune predict`` on PyTorch on a CPU says that an export would be faster.
ONNX_HINT_MIN_FILES = PROGRESS_MIN_FILES


def _hint_onnx(predictor, run_dir: Path, files: int, backend: str) -> None:
    """One line on stderr when many files are about to be predicted with PyTorch on a CPU only because
    the run has no ``model.onnx`` (``bench/speed.py deploy``: 18-21 against 57-64 images/s from files)."""
    from imgtune.deploy.bundle import ONNX_FILE
    from imgtune.deploy.predict import Predictor

    if (backend == "auto" and files >= ONNX_HINT_MIN_FILES and isinstance(predictor, Predictor)
            and predictor.device.type == "cpu" and not (run_dir / ONNX_FILE).exists()):
        click.echo(f"imgtune: predicting {files} images with PyTorch; `imgtune export {run_dir}` writes {ONNX_FILE}, "
                   "which ONNX Runtime runs about 3x faster on a CPU (used from then on)", err=True)


def _predict_each(results, total: int, shown: dict, *, writer, top_k: int, as_json: bool) -> int:
    """Write or print each ``(path, prediction, error)`` of ``results``; returns how many failed."""
    from imgtune.progress import progress_bar

    failed = 0
    bar = progress_bar(total, desc="predict", unit="image", disable=total < PROGRESS_MIN_FILES)
    for path, prediction, error in results:
        bar.update()
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
            writer.writerow([name, top[0][0], f"{top[0][1]:.6f}", _top_k_text(top), ""])
        elif as_json:
            click.echo(json.dumps({"file": name, "top_k": _top_k_json(top)}))
        else:
            click.echo(f"{name}: " + "  ".join(f"{c} {100 * p:.1f}%" for c, p in top))
    bar.close()
    return failed


def _predict_sessions(predictor, files, manifest, *, top_k, as_json, csv_path, bs) -> None:
    """`imgtune predict --group-by`: one line (or CSV row) per session of the manifest."""
    from imgtune.sequences.groups import predict_groups, read_manifest

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
                writer.writerow([group, top[0][0], f"{top[0][1]:.6f}", _top_k_text(top), count])
            elif as_json:
                click.echo(json.dumps({"group": group, "windows": count, "top_k": _top_k_json(top)}))
            else:
                click.echo(f"{group} ({count} windows): " + "  ".join(f"{c} {100 * p:.1f}%" for c, p in top))
    if writer:
        click.echo(f"{len(scores.groups)} session predictions written to {csv_path}")
    if errors:
        raise ImgtuneError(f"{len(errors)} of {len(files)} images could not be read")


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--format", "export_format", type=click.Choice(["onnx"]), default="onnx", show_default=True,
              help="The exported model's format.")
@click.option("--opset", default=17, show_default=True, help="ONNX opset version.")
@click.option("--int8", is_flag=True,
              help="Write model.int8.onnx instead: quantized statically (QDQ, per-channel weights), calibrated on "
              "a sample of the run's training images and checked against float32 on its validation images.")
@click.option("--max-drop", type=click.FloatRange(0), default=1.0, show_default=True,
              help="With --int8: the most accuracy points int8 may lose against float32 (else nothing is written).")
@click.option("--calibration-images", type=click.IntRange(1), default=128, show_default=True,
              help="With --int8: training images to calibrate the int8 ranges on.")
@click.option("--overwrite", is_flag=True, help="Allow replacing an existing model.onnx (model.int8.onnx).")
def export(run_dir, export_format, opset, int8, max_drop, calibration_images, overwrite):
    """Write RUN_DIR's model as model.onnx (dynamic batch; input "images", normalised NCHW float32;
    output "logits") and check that ONNX Runtime's logits match PyTorch's within 1e-4; or, with --int8,
    as model.int8.onnx, refused when it loses more than --max-drop accuracy points."""
    fit_threads_to_cores()
    if int8:
        from imgtune.deploy.quantize import write_int8_onnx

        path, figures = write_int8_onnx(run_dir, max_drop=max_drop, calibration_images=calibration_images,
                                        opset=opset, overwrite=overwrite, progress=lambda line: click.echo(line, err=True))
        click.echo(f"{path}")
        click.echo(f"int8 vs float32 on {figures['images']} validation images: top-1 agreement "
                   f"{100 * figures['agreement']:.2f}%, accuracy {100 * figures['int8_accuracy']:.2f}% vs "
                   f"{100 * figures['fp32_accuracy']:.2f}% ({-figures['accuracy_drop']:+.2f} points)")
        return
    from imgtune.deploy.export import write_onnx

    path, difference = write_onnx(run_dir, opset=opset, overwrite=overwrite)
    click.echo(f"{path}")
    click.echo(f"max logit difference ONNX Runtime vs PyTorch: {difference:.2e} (batches of 2 and 3)")


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 makes the demo reachable from other machines. On loopback "
              "only requests for 127.0.0.1, [::1] or localhost with the port are answered (421 otherwise).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port to listen on.")
@click.option("--max-bytes", type=click.IntRange(1), default=10_000_000, show_default=True,
              help="Largest upload accepted (413 above).")
@click.option("--max-pixels", type=click.IntRange(1), default=40_000_000, show_default=True,
              help="Most pixels an image may have, read from its header before decoding (413 above).")
@click.option("--timeout", type=click.FloatRange(0, min_open=True), default=30.0, show_default=True,
              help="Seconds decoding and classifying one upload may take (504 after).")
@click.option("--max-concurrent", type=click.IntRange(1),
              help="Uploads decoded and classified at once; one more gets 503 with Retry-After. "
              "[default: twice the usable CPU cores]")
@click.option("--backend", type=BACKENDS, default="auto", show_default=True,
              help="What runs the predictions; Grad-CAM always uses PyTorch.")
@device_option("the model (and Grad-CAM)")
@click.option("--int8", is_flag=True, help="Predict with model.int8.onnx (see `imgtune export --int8`) on ONNX "
              "Runtime; Grad-CAM stays float.")
@click.option("--tta/--no-tta", default=None, help="Average each image's probabilities with its mirror image's "
              "(--tta) or not. [default: as the run was trained, its model.json's \"tta\"]")
@click.option("--max-batch", type=click.IntRange(1), default=16, show_default=True,
              help="Most images classified in one model call: concurrent requests without Grad-CAM are "
              "gathered into batches (also at most --max-concurrent).")
@click.option("--batch-wait-ms", type=click.FloatRange(0), default=10.0, show_default=True,
              help="Milliseconds the first image of a batch waits at most for others being decoded to join it.")
@click.option("--no-batching", is_flag=True, help="Classify each request alone (the same as --max-batch 1).")
def serve(run_dir, host, port, max_bytes, max_pixels, timeout, max_concurrent, backend, device, int8, tta,
          max_batch, batch_wait_ms, no_batching):
    """Serve a web demo of RUN_DIR's model: a page to upload or photograph an image and see the top
    classes with the Grad-CAM overlay, and its JSON API (POST /api/predict; schema at /openapi.json)."""
    fit_threads_to_cores()
    from imgtune.serve.app import create_app

    app = create_app(run_dir, max_bytes=max_bytes, max_pixels=max_pixels, timeout=timeout, backend=backend,
                     max_concurrent=max_concurrent, host=host, device=resolve_device(device), int8=int8,
                     tta=None if tta is None else ("flip" if tta else "none"),
                     max_batch=1 if no_batching else max_batch, batch_wait=batch_wait_ms / 1000)
    try:
        import uvicorn
    except ImportError:
        raise ImgtuneError("the web demo needs uvicorn: pip install 'imgtune[serve]'") from None

    click.echo(f"serving {run_dir} on http://{host}:{port}/ (Ctrl-C stops)")
    uvicorn.run(app, host=host, port=port, log_level="info")
