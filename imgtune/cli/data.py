"""``imgtune datasets``, ``imgtune cache`` and ``imgtune render``: what the data is and where it is kept.

None of these import torch.
"""

from __future__ import annotations

import click

from imgtune.cli.options import CACHE_DIR_OPTION


@click.command()
def datasets():
    """List the named datasets and whether each can be used offline right now."""
    from imgtune.data.catalogue import CATALOGUE, DEFAULT

    for info in CATALOGUE.values():
        offline = "available offline" if info.available() else "needs a download (or --data-dir)"
        default = "  [default]" if info.name == DEFAULT else ""
        click.echo(f"{info.name:<12} {offline}{default}\n  {info.description}\n  source: {info.source};"
                   f" license: {info.license}")


@click.group("cache")
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
@click.option("--only", type=click.Choice(["presized", "features", "activations", "onnx"]), multiple=True,
              help="Clear only this kind (repeatable).  [default: all of them; downloaded datasets are kept]")
def cache_clear(cache_dir, only):
    """Delete cached entries; the next run rebuilds what it needs. Downloaded datasets are kept, and so is
    any file imgtune did not write; a folder without imgtune's CACHEDIR.TAG is refused."""
    from imgtune.data import cache

    removed = cache.clear(cache_dir, kinds=only or cache.KINDS)
    files, size = sum(r["files"] for r in removed.values()), sum(r["bytes"] for r in removed.values())
    kept = sum(used["files"] for kind, used in cache.usage(cache_dir).items() if kind in removed)
    others = f"; kept {kept} files imgtune did not write" if kept else ""
    click.echo(f"removed {files} files ({size / 1e6:.1f} MB) from {cache.cache_root(cache_dir)}{others}")


@click.command()
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
@click.option("--overwrite", is_flag=True, help="Allow writing into a non-empty OUT: the images an earlier render "
              "recorded there (OUT/.imgtune-render) are replaced, nothing else is deleted; refused if OUT has a "
              "manifest.csv imgtune did not write.")
def render(source, out, kind, window, overlap, size, style, columns, time_col, workers, overwrite):
    """Draw every session file in SOURCE/<label>/ as images of overlapping windows: OUT/<label>/*.png
    and OUT/manifest.csv (file,label,group,start,end,t_start,t_end; group = the session).

    Train on it with `imgtune train OUT --csv OUT/manifest.csv` (windows of one session stay on one
    side of the split) and score sessions with `imgtune predict RUN OUT --group-by OUT/manifest.csv`.
    """
    from imgtune.sequences.render import find_sessions, render_sessions
    from imgtune.sequences.windows import parse_window

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
