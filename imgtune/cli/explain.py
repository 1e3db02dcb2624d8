"""``imgtune interpret``: rebuild a run's report and print what the model confuses."""

from __future__ import annotations

import json
from pathlib import Path

import click

from imgtune.cli.options import data_kwargs, data_options, device_option, fit_threads_to_cores, resolve_device


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@data_options
@click.option("--top-k", "k", default=9, show_default=True, help="How many top losses to show.")
@click.option("--min-count", default=1, show_default=True, help="Smallest count of a confused pair to list.")
@device_option("the model")
def interpret(run_dir, data, label_re, csv_path, data_dir, valid_pct, stratify, seed, k, min_count, device):
    """Rebuild RUN_DIR's report.html and print the most confused pairs and the top losses.

    Without DATA it uses the run's own validation set (split.csv); with DATA (any source `train`
    accepts) it uses that data's validation split, whose classes must be among the model's.
    """
    fit_threads_to_cores()
    from imgtune.deploy.bundle import read_meta
    from imgtune.explain.interpret import Interpretation
    from imgtune.explain.report import write_report
    from imgtune.train.lr_find import LRFinderResult

    images = None
    if data is not None or csv_path is not None:
        from imgtune.data.loaders import load_data

        images = load_data(data, seed=seed, **data_kwargs(label_re, csv_path, data_dir, valid_pct, stratify))
    interp = Interpretation.from_run(run_dir, images, device=resolve_device(device))
    metrics_path = Path(run_dir) / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    report = write_report(run_dir, interp=interp, metrics=metrics, meta=read_meta(run_dir), k=k,
                          lr_finder=LRFinderResult.from_metrics(metrics))
    click.echo(f"validation accuracy {100 * interp.accuracy:.2f}% on {len(interp.targets)} images")
    _print_tables(interp, k=k, min_count=min_count)
    click.echo(f"\nreport written to {report}")


def _print_tables(interp, *, k: int, min_count: int) -> None:
    """The most confused pairs (20 at most) and the ``k`` top losses, as text tables."""
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
