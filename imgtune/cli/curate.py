"""``imgtune download``, ``imgtune doctor`` and ``imgtune clean``: build and clean your own dataset."""

from __future__ import annotations

import shlex

import click

from imgtune.cli.options import (
    PROGRESS_MIN_FILES,
    data_kwargs,
    data_options,
    device_option,
    fit_threads_to_cores,
    resolve_device,
)
from imgtune.errors import ImgtuneError


@click.command()
@click.argument("source", type=click.Path(dir_okay=False))
@click.option("--dest", required=True, type=click.Path(file_okay=False),
              help="Folder to fill: the class folder for a list of URLs, the dataset folder for a url,label CSV.")
@click.option("--workers", default=8, show_default=True, help="Downloads at the same time.")
@click.option("--timeout", type=click.FloatRange(0, min_open=True), default=10.0, show_default=True,
              help="Seconds to connect and between reads.")
@click.option("--deadline", type=click.FloatRange(0, min_open=True),
              help="Seconds one URL may take in all, however slowly it arrives.  [default: 10 x --timeout]")
@click.option("--retries", type=click.IntRange(0), default=2, show_default=True,
              help="Tries again after a timeout, a connection error, 429 or 5xx, with exponential backoff.")
@click.option("--max-bytes", type=click.IntRange(1), default=20_000_000, show_default=True,
              help="Largest file accepted.")
@click.option("--retry-failed", is_flag=True, help="Also try again URLs that failed for good in an earlier run.")
@click.option("--refuse-private", is_flag=True,
              help="Refuse URLs and redirects to loopback, private or link-local addresses (for lists from the web).")
def download(source, dest, workers, timeout, deadline, retries, max_bytes, retry_failed, refuse_private):
    """Download the images listed in SOURCE (a text file of URLs, or a CSV of url,label) into --dest.

    Only files that decode as images are kept, exact duplicates are skipped, and a manifest in --dest
    (.imgtune-downloads.json) makes a second run fetch only what is still missing.
    """
    from imgtune.curate.download import download_images, read_sources
    from imgtune.progress import progress_bar

    total = len(read_sources(source))
    with progress_bar(total, desc="download", unit="url", disable=total < PROGRESS_MIN_FILES) as bar:
        report = download_images(source, dest, workers=workers, timeout=timeout, deadline=deadline, retries=retries,
                                 max_bytes=max_bytes, retry_failed=retry_failed, refuse_private=refuse_private,
                                 progress=lambda url, outcome: bar.update())
    click.echo(report.summary())


@click.command()
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
    fit_threads_to_cores()
    from imgtune.curate import changelog
    from imgtune.curate import doctor as doc
    from imgtune.train.run import default_run_dir

    if do_undo:
        root = doc.data_root(data, csv_path)
        if root is None:
            raise ImgtuneError("--undo needs the data folder (or --csv) that was changed")
        changes = changelog.undo(root, csv_path=csv_path)
        click.echo(f"undid {len(changes)} changes logged in {changelog.ChangeLog(root).path}")
        return
    diagnosis = doc.diagnose(data, seed=seed, min_side=min_side, max_aspect=max_aspect, near_distance=near_distance,
                             mislabels=0 if no_mislabels else mislabel_count,
                             features=None if no_mislabels else _feature_function(arch, weights),
                             **data_kwargs(label_re, csv_path, data_dir, valid_pct, stratify))
    click.echo(diagnosis.summary())
    default = default_run_dir(data)
    json_path, html_path = doc.write_outputs(diagnosis, out or default.with_name(f"doctor-{default.name}"))
    click.echo(f"report written to {json_path} and {html_path}")
    if do_fix:
        moves = doc.fix(diagnosis, [k.strip() for k in fix_kinds.split(",") if k.strip()])
        again = shlex.join(["imgtune", "doctor", *([str(data)] if data else []),
                            *(["--csv", str(csv_path)] if csv_path else []), "--undo"])
        click.echo(f"moved {len(moves)} files to {changelog.quarantine_dir(diagnosis.root)} (undo: {again})")


def _feature_function(arch: str, weights: str):
    """``paths -> features`` with a progress bar, for the mislabel finder."""
    from functools import partial

    from imgtune.train.features import imagenet_features

    return partial(imagenet_features, arch=arch, weights=weights, progress=True)


@click.command()
@click.argument("data", type=click.Path(file_okay=False))
@click.option("--label-re", help="Labels from file names with this regex's first group (relabelling is then off).")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False),
              help="A CSV of file,label[,split]; relabelling rewrites its rows.")
@click.option("--run", "run_dir", type=click.Path(file_okay=False),
              help="Rank by this run's model (its loss on each image) instead of the out-of-fold mislabel finder.")
@click.option("--arch", default="efficientnet_lite0", show_default=True, help="Backbone for the mislabel finder.")
@click.option("--weights", default="imagenet", show_default=True, help="Its weights (imagenet, none, a file).")
@click.option("--port", type=click.IntRange(0, 65535), default=8001, show_default=True, help="Port on 127.0.0.1.")
@device_option("--run's model")
@click.option("--undo", "do_undo", is_flag=True, help="Undo every logged change (page and doctor --fix), newest first.")
def clean(data, label_re, csv_path, run_dir, arch, weights, port, device, do_undo):
    """Serve a page on 127.0.0.1 showing DATA's images most suspicious first (label vs. the model's
    prediction), with buttons to keep, relabel (move to another class folder, or rewrite the CSV row)
    or quarantine each; every change is logged and can be undone on the page or with --undo."""
    fit_threads_to_cores()
    from imgtune.curate.changelog import ChangeLog, undo
    from imgtune.curate.clean import CleanSession, create_app
    from imgtune.curate.doctor import data_root

    if do_undo:
        root = data_root(data, csv_path)
        if root is None:
            raise ImgtuneError(f"{data}: no such folder; --undo needs the data folder that was changed")
        changes = undo(root, csv_path=csv_path)
        click.echo(f"undid {len(changes)} changes logged in {ChangeLog(root).path}")
        return
    try:
        import uvicorn
    except ImportError:
        raise ImgtuneError("imgtune clean needs uvicorn: pip install 'imgtune[serve]'") from None
    session = CleanSession(data, label_re=label_re, csv_path=csv_path, run_dir=run_dir, arch=arch, weights=weights,
                           device=resolve_device(device))
    click.echo(f"cleaning {session.root}: {len(session.entries)} images on http://127.0.0.1:{port}/ (Ctrl-C stops;"
               f" changes are logged in {session.log.path})")
    uvicorn.run(create_app(session), host="127.0.0.1", port=port, log_level="warning")
