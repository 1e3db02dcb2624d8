"""Quality: accuracy, macro recall, wall time and peak memory of `imgtune train` per dataset and
configuration, side by side in one run, each from an empty cache.

    python bench/quality.py                              # every dataset, head-only and default
    python bench/quality.py --datasets elpv --ceiling    # and a long whole-network fine-tune
    python bench/quality.py --configs default "balance=--balance --tta"   # any flags, named
    python bench/quality.py --quick                      # a smoke test on tiny synthetic images
    python bench/quality.py --table bench/results/quality-A.json quality-B.json   # one table of several runs

Datasets (the data options are part of the dataset, the same for every configuration):
- ``pets``: the Oxford pets sample (370 images, 37 breeds), 50/50 stratified, once per ``--seeds``
  (reported as the mean and range over the seeds);
- ``elpv``, ``elpv-binary``: imgtune's embedded solar-cell dataset, 4 classes and defective or not,
  imgtune's default 80/20 split with ``--elpv-seed``;
- ``mouse``: bench/mouse.py's protocol (its functions: windows of mouse sessions drawn at 128 px, one
  session per user held out, the challenge's ROC AUC on the labelled test sessions) on
  ``--mouse-subset`` sessions per user; trained with ``--size 128 --no-augment --valid-pct 0.2``.

Configurations: ``head-only`` (the head on cached features of the frozen body: ``--tune-stages 0``
where ``imgtune train`` has that option, else ``--epochs 0``; and ``--no-balance`` where it has that: the
default before partial fine-tuning and mild class weights), ``default`` (no options at all),
``ceiling`` (``--epochs 6``: the whole network, slow; with ``--ceiling``), or ``NAME=OPTIONS``.

Each run is a subprocess ``imgtune train ... --out <scratch>/<run>`` with a new empty ``IMGTUNE_CACHE``;
its wall time is that of the whole command, its peak memory the largest sum of the resident memory
of the process and its children (polled from /proc every 0.2 s; shared pages of loader processes
count once per process) and the largest single process (from wait4). Accuracy is the run's
``metrics.json``; macro recall (balanced accuracy: the mean of the per-class recalls) is read from it
when the run records it, else computed from the run's predictions on its validation split.

Prints a Markdown table and writes bench/results/quality-<date>.json (rewritten after every run, so
a bench stopped half way keeps what it measured). A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
PETS = HERE.parent.parent / "shared" / "data" / "oxford-pets-sample"
MOUSE = HERE.parent.parent / "shared" / "data" / "mouse-dynamics"
IMGTUNE = [str(Path(sys.executable).with_name("imgtune"))]
PETS_RE = r"^(.+)_\d+\.jpg$"
#: Configurations by name: ``imgtune train`` options (``head-only``'s depend on the version, see :func:`config_flags`).
CONFIGS = {"default": [], "ceiling": ["--epochs", "6"]}
#: What the issue asks of ``imgtune train``'s defaults: dataset -> (metric, at least).
TARGETS = {"elpv": ("accuracy", 0.82), "elpv-binary": ("accuracy", 0.91), "pets": ("accuracy", 0.90),
           "mouse": ("auc", 0.93)}
TIME_TARGET = {"elpv": 180.0, "elpv-binary": 180.0}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["elpv", "elpv-binary", "pets", "mouse"],
                        choices=["elpv", "elpv-binary", "pets", "mouse", "synthetic"])
    parser.add_argument("--configs", nargs="+", default=["head-only", "default"],
                        help="Names (head-only, default, ceiling) or NAME=OPTIONS, e.g. 'bal=--balance'.")
    parser.add_argument("--ceiling", action="store_true", help="Add the ceiling configuration (--epochs 6).")
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44], help="Split seeds of the pets sample.")
    parser.add_argument("--elpv-seed", type=int, default=42, help="Split seed of elpv, elpv-binary and mouse.")
    parser.add_argument("--mouse-subset", type=int, default=2,
                        help="Training sessions per user for mouse (bench/mouse.py --subset); 0: all of them.")
    parser.add_argument("--quick", action="store_true",
                        help="Smoke test: a tiny synthetic dataset of two classes at 64 px, one seed.")
    parser.add_argument("--scratch", type=Path, default=None, help="Run folders and caches (default: a temporary one).")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--table", nargs="+", type=Path, default=None,
                        help="Only print the table of these results files (runs of the same configurations).")
    parser.add_argument("--imgtune", default=None, help=argparse.SUPPRESS)  # the command to run (tests)
    args = parser.parse_args(argv)
    if args.quick:
        args.datasets, args.seeds = ["synthetic"], args.seeds[:1]
    if args.ceiling and "ceiling" not in args.configs:
        args.configs.append("ceiling")
    args.imgtune = shlex.split(args.imgtune) if args.imgtune else IMGTUNE
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.table:
        return print_tables(args.table)
    scratch = args.scratch or Path(os.environ.get("TMPDIR", "/tmp")) / f"imgtune-quality-{os.getpid()}"
    scratch.mkdir(parents=True, exist_ok=True)
    configs = {name: config_flags(name, args.imgtune) for name in args.configs}
    out = args.results / f"quality-{'quick-' if args.quick else ''}{datetime.now():%Y%m%d-%H%M%S}.json"
    record = dict(configs={k: shlex.join(v) for k, v in configs.items()}, runs=[], prepared={},
                  machine=dict(cpus=os.cpu_count(), load_average_at_start=os.getloadavg()),
                  date=datetime.now().isoformat(timespec="seconds"))
    for dataset in args.datasets:
        for seed in args.seeds if dataset == "pets" else [args.elpv_seed]:
            data_args, windows = prepare(dataset, seed, scratch, args, record["prepared"])
            for name, flags in configs.items():
                run = measured_run(dataset, seed, name, [*args.imgtune, "train", *data_args, *flags], scratch,
                                   windows=windows)
                record["runs"].append(run)
                print(run_line(run), flush=True)
                save(record, out)
    record["summary"] = summarise(record["runs"])
    save(record, out)
    print("\n" + markdown_table(record))
    print(f"\nresults written to {out}")
    return record


def config_flags(name: str, imgtune=IMGTUNE) -> list[str]:
    """The ``imgtune train`` options of a configuration name, or of ``NAME=OPTIONS``."""
    if "=" in name:
        return shlex.split(name.split("=", 1)[1])
    if name == "head-only":
        helptext = subprocess.run([*imgtune, "train", "--help"], capture_output=True, text=True, check=False).stdout
        # The default before partial fine-tuning and the mild class weights: the head alone, plain cross-entropy.
        return (["--tune-stages", "0"] if "--tune-stages" in helptext else ["--epochs", "0"]) + \
            (["--no-balance"] if "--no-balance" in helptext else [])
    if name not in CONFIGS:
        raise SystemExit(f"unknown configuration {name!r}: use head-only, {', '.join(CONFIGS)} or NAME=OPTIONS")
    return list(CONFIGS[name])


def prepare(dataset: str, seed: int, scratch: Path, args, prepared: dict) -> tuple[list[str], object]:
    """The data options of ``imgtune train`` for a dataset and split seed, and for mouse its windows
    (drawn once, into ``scratch/mouse``; their time goes to ``prepared``)."""
    if dataset == "pets":
        return [str(PETS), "--label-re", PETS_RE, "--valid-pct", "0.5", "--stratify", "--seed", str(seed)], None
    if dataset in ("elpv", "elpv-binary"):
        return ([] if dataset == "elpv" else [dataset]) + ["--seed", str(seed)], None
    if dataset == "synthetic":
        root = synthetic_images(scratch / "synthetic")
        return [str(root), "--size", "64", "--valid-pct", "0.5", "--seed", str(seed)], None
    from mouse import render_windows

    work = scratch / "mouse"
    if work.exists():
        shutil.rmtree(work)
    windows = render_windows(MOUSE, work, subset=args.mouse_subset or None, size=128)
    prepared["mouse"] = dict(subset=args.mouse_subset or None, render_seconds=windows.seconds,
                             train_windows=windows.rendered["train"].images,
                             test_windows=windows.rendered["test"].images)
    return [str(work / "train"), "--csv", str(windows.rendered["train"].manifest), "--size", "128", "--no-augment",
            "--valid-pct", "0.2", "--seed", str(seed)], windows


def synthetic_images(root: Path, per_class: int = 8) -> Path:
    """Two classes of tiny pictures (dark and bright noise) in class subfolders, for ``--quick``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for label, base in (("dark", 40), ("bright", 200)):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(base + rng.normal(0, 30, (48, 48, 3)), 0, 255).astype("uint8")
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    return root


def measured_run(dataset: str, seed: int, config: str, command: list[str], scratch: Path, *, windows=None) -> dict:
    """Run one ``imgtune train`` command with a new empty cache and read its scores.

    Args:
        dataset, seed, config: what the run is, recorded with it.
        command: the command line, without ``--out``.
        scratch: the folder for its run folder and cache (the cache is removed afterwards).
        windows: for mouse, :func:`mouse.render_windows`' result (the AUC needs it).

    Returns:
        A dict: the command, rc, wall seconds, peak memory, accuracy, macro recall and its source, and
        for mouse the AUC and session accuracy.
    """
    run_dir = scratch / f"{dataset}-s{seed}-{config.split('=')[0]}"
    cache = scratch / f"cache-{run_dir.name}"
    for path in (run_dir, cache):
        if path.exists():
            shutil.rmtree(path)
    cache.mkdir(parents=True)
    command = [*command, "--out", str(run_dir)]
    measured = run_measured(command, env=dict(os.environ, IMGTUNE_CACHE=str(cache)), log=scratch / f"{run_dir.name}.log")
    shutil.rmtree(cache, ignore_errors=True)
    run = dict(dataset=dataset, seed=seed, config=config, command=shlex.join(command), **measured)
    if measured["rc"] == 0:
        run.update(read_scores(run_dir))
        if windows is not None:
            from mouse import score_run

            scores = score_run(run_dir, windows)
            run.update(auc=scores["auc"], session_accuracy=scores["session_accuracy"],
                       window_accuracy=scores["window_accuracy"])
    return run


def run_measured(command: list[str], *, env: dict, log: Path) -> dict:
    """Run ``command`` (output to ``log``): rc, wall seconds, peak memory of the tree and of one process (MB)."""
    started = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        peak = [0]
        done = threading.Event()

        def poll() -> None:
            while not done.wait(0.2):
                peak[0] = max(peak[0], tree_rss(process.pid))

        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        watcher.join()
    tail = log.read_text(errors="replace")[-1500:] if process.returncode else ""
    return dict(rc=process.returncode, wall_seconds=time.perf_counter() - started,
                peak_tree_mb=peak[0] / 2**20, peak_process_mb=usage.ru_maxrss / 1024, error_tail=tail or None)


def tree_rss(pid: int) -> int:
    """Bytes resident in ``pid`` and all its descendants (0 for processes already gone)."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            with open(f"/proc/{current}/statm") as handle:
                total += int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    todo.extend(int(child) for child in handle.read().split())
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return total


def read_scores(run_dir: Path) -> dict:
    """Accuracy from the run's ``metrics.json``; macro recall from it when recorded (``balanced_accuracy``
    or ``macro_recall``, at the top or in the last epoch), else from the run's predictions."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    last = (metrics.get("history") or [{}])[-1]
    scores = dict(accuracy=metrics["valid_accuracy"], run_seconds=metrics.get("seconds", {}).get("total"))
    if metrics.get("per_class") and len(metrics["per_class"]) <= 10:
        scores["recalls"] = {row["class"]: row["recall"] for row in metrics["per_class"]}
    for key in ("tune_stages", "balance"):  # what the run chose (partial fine-tuning's plan, the class weights)
        if key in metrics:
            scores[key] = {k: v for k, v in metrics[key].items() if k != "activations"} \
                if isinstance(metrics[key], dict) else metrics[key]
    for key in ("balanced_accuracy", "macro_recall"):
        for where, source in ((metrics, "metrics.json"), (last, "metrics.json history")):
            if isinstance(where.get(key), (int, float)):
                return dict(scores, macro_recall=float(where[key]), macro_recall_from=f"{source} {key}")
    return dict(scores, **recall_from_predictions(run_dir))


def recall_from_predictions(run_dir: Path) -> dict:
    """Macro recall and per-class recalls of a run's bundle on its validation split (``split.csv``)."""
    import numpy as np

    from imgtune import Interpretation

    interp = Interpretation.from_run(run_dir)
    matrix = interp.confusion_matrix()
    present = matrix.sum(1) > 0
    recalls = np.diag(matrix)[present] / matrix.sum(1)[present]
    per_class = {c: float(r) for c, r in zip(np.array(interp.classes)[present], recalls)} if len(recalls) <= 10 else None
    return dict(macro_recall=float(recalls.mean()), macro_recall_from="predictions", recalls=per_class)


def summarise(runs: list[dict]) -> list[dict]:
    """Per dataset and configuration: mean, min and max over seeds of every figure (failed runs counted apart)."""
    rows = []
    for dataset, config in dict.fromkeys((r["dataset"], r["config"]) for r in runs):
        mine = [r for r in runs if r["dataset"] == dataset and r["config"] == config]
        ok = [r for r in mine if r["rc"] == 0]
        row = dict(dataset=dataset, config=config, seeds=[r["seed"] for r in ok], failed=len(mine) - len(ok),
                   commands=[r["command"] for r in mine])
        for key in ("accuracy", "macro_recall", "auc", "wall_seconds", "peak_tree_mb", "peak_process_mb"):
            values = [r[key] for r in ok if r.get(key) is not None]
            if values:
                row[key] = dict(mean=sum(values) / len(values), min=min(values), max=max(values))
        rows.append(row)
    return rows


def _figure(stats: dict | None, kind: str) -> str:
    if stats is None:
        return "-"
    scale, fmt, unit = {"percent": (100, ".1f", "%"), "ratio": (1, ".3f", ""), "seconds": (1, ".0f", " s"),
                        "mb": (1, ".0f", " MB")}[kind]
    text = f"{scale * stats['mean']:{fmt}}{unit}"
    if stats["max"] > stats["min"] and kind in ("percent", "ratio"):
        text += f" ({scale * stats['min']:{fmt}}-{scale * stats['max']:{fmt}})"
    return text


def markdown_table(record: dict) -> str:
    """The README's table: one row per dataset and configuration, then the targets met or missed."""
    lines = ["| dataset | config | accuracy | macro recall | test AUC | wall | peak memory |",
             "|---|---|---|---|---|---|---|"]
    summary = record.get("summary") or summarise(record["runs"])
    for row in summary:
        seeds = ",".join(map(str, row["seeds"])) or "-"
        failed = f" ({row['failed']} failed)" if row["failed"] else ""
        lines.append(f"| {row['dataset']} (seed {seeds}){failed} | {row['config']} | "
                     f"{_figure(row.get('accuracy'), 'percent')} | {_figure(row.get('macro_recall'), 'ratio')} | "
                     f"{_figure(row.get('auc'), 'ratio')} | {_figure(row.get('wall_seconds'), 'seconds')} | "
                     f"{_figure(row.get('peak_tree_mb'), 'mb')} |")
    lines += ["", "Configurations: " + "; ".join(f"`{k}`: `{f'imgtune train DATA {v}'.strip()}`"
                                                 for k, v in record["configs"].items()),
              "", *target_lines(summary)]
    return "\n".join(lines)


def target_lines(summary: list[dict]) -> list[str]:
    """One line per dataset: the default's figure against the issue's target and the head-only's."""
    lines = []
    rows = {(r["dataset"], r["config"]): r for r in summary}
    for (dataset, config), row in rows.items():
        if config != "default" or dataset not in TARGETS:
            continue
        metric, target = TARGETS[dataset]
        if metric not in row:
            continue
        value = row[metric]["mean"]
        text = f"- {dataset}: default {metric} {value:.3f} {'>=' if value >= target else '<'} target {target}"
        if dataset in TIME_TARGET and "wall_seconds" in row:
            wall = row["wall_seconds"]["mean"]
            text += f"; wall {wall:.0f} s {'<=' if wall <= TIME_TARGET[dataset] else '>'} {TIME_TARGET[dataset]:.0f} s"
        base = rows.get((dataset, "head-only"))
        if base and metric in base:
            text += f"; head-only {base[metric]['mean']:.3f} ({'not worse' if value >= base[metric]['mean'] else 'WORSE'})"
        lines.append(text)
    return lines


def run_line(run: dict) -> str:
    if run["rc"] != 0:
        return f"{run['dataset']} seed {run['seed']} {run['config']}: FAILED rc {run['rc']}: {run['error_tail'][-300:]}"
    auc = f", AUC {run['auc']:.3f}" if run.get("auc") is not None else ""
    return (f"{run['dataset']} seed {run['seed']} {run['config']}: accuracy {100 * run['accuracy']:.1f}%, macro recall "
            f"{run['macro_recall']:.3f}{auc}, {run['wall_seconds']:.0f} s, peak {run['peak_tree_mb']:.0f} MB")


def print_tables(paths: list[Path]) -> dict:
    """Print one table of the runs in several results files (each run keeps its own command)."""
    records = [json.loads(path.read_text()) for path in paths]
    merged = dict(configs={k: v for r in records for k, v in r["configs"].items()},
                  runs=[run for r in records for run in r["runs"]])
    merged["summary"] = summarise(merged["runs"])
    print(markdown_table(merged))
    return merged


def save(record: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
