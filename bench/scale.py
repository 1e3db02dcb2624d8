"""Scale: seconds per image and peak memory of ``imgtune train`` on 1k, 5k and 20k images, side by side.

    python bench/scale.py --scratch /tmp/scale                        # 1000, 5000, 20000 images x 3 runs
    python bench/scale.py --scratch /tmp/scale --sizes 1000 5000 --runs 2

Generates class folders of 400 x 300 JPEGs under ``--scratch`` (10 classes; random crops of the Oxford
pets sample, seeded, so the same size always gives the same files; never inside the repository), then
runs ``imgtune train <folder> --no-report`` with imgtune's defaults as a subprocess, each run with an
empty cache (``IMGTUNE_CACHE`` pointing at a fresh folder), under ``/usr/bin/time -v``. For each run
it records the wall seconds, seconds per image, the peak resident memory of the largest process
(``time``'s "Maximum resident set size") and of the whole process tree (``/proc`` polled every 0.2 s,
loader processes included), and the seconds of each phase from the run's ``metrics.json``.

Targets (issue 14): peak RSS on 20k images within 1.3x of its peak on 1k and under 3 GB, in every run;
seconds per image within 1.2x across sizes. A benchmark, not a test: it prints a table and writes
bench/results/scale-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
PETS_SAMPLE = HERE.parent.parent / "shared" / "data" / "oxford-pets-sample"
IMGTUNE = Path(sys.executable).with_name("imgtune")
WIDTH, HEIGHT, CLASSES = 400, 300, 10
PAGE = os.sysconf("SC_PAGE_SIZE")


def generate(folder: Path, count: int, *, source: Path = PETS_SAMPLE, seed: int = 0) -> Path:
    """``count`` JPEGs in ``folder/class_<k>/`` (made once: a folder that is complete is reused)."""
    done = folder / ".complete"
    if done.is_file() and done.read_text() == str(count):
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    sources = sorted(source.glob("*.jpg"))
    if not sources:
        raise SystemExit(f"{source}: no JPEGs (pass --pets)")
    rng = random.Random(seed)
    for index in range(count):
        with Image.open(sources[index % len(sources)]) as image:
            image = image.convert("RGB")
            width, height = image.size
            scale = rng.uniform(0.6, 1.0)
            w, h = max(8, int(width * scale)), max(8, int(height * scale))
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            picture = image.crop((left, top, left + w, top + h)).resize((WIDTH, HEIGHT))
        target = folder / f"class_{index % CLASSES}" / f"{index:06d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        picture.save(target, quality=90)
    done.write_text(str(count))
    return folder


def tree_rss(root: int) -> int:
    """Resident bytes of process ``root`` and all its descendants (read from /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            pages = int((entry / "statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
        pid = int(entry.name)
        children.setdefault(int(fields[1]), []).append(pid)
        rss[pid] = pages * PAGE
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack += children.get(pid, [])
    return total


def run_once(folder: Path, scratch: Path, run: int, extra: list[str], program: list[str]) -> dict:
    """One ``imgtune train`` on ``folder`` with an empty cache; its seconds and peak memory."""
    cache, out = scratch / f"cache-{folder.name}-{run}", scratch / f"run-{folder.name}-{run}"
    for path in (cache, out):
        shutil.rmtree(path, ignore_errors=True)
    command = ["/usr/bin/time", "-v", *program, "train", str(folder), "--no-report", "--out", str(out), *extra]
    started = time.perf_counter()
    process = subprocess.Popen(command, env=dict(os.environ, IMGTUNE_CACHE=str(cache)),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def poll() -> None:
        while process.poll() is None:
            peak[0] = max(peak[0], tree_rss(process.pid))
            time.sleep(0.2)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    stdout, stderr = process.communicate()
    seconds = time.perf_counter() - started
    poller.join()
    if process.returncode != 0:
        raise SystemExit(f"imgtune train failed ({process.returncode}):\n{stderr[-3000:]}")
    largest = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)[1]) * 1024
    metrics = json.loads((out / "metrics.json").read_text())
    shutil.rmtree(cache, ignore_errors=True)
    return dict(seconds=seconds, peak_rss=largest, peak_tree_rss=peak[0], phases=metrics["seconds"],
                features=(metrics.get("cache") or {}).get("features"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scratch", type=Path, required=True, help="where images, caches and runs go")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000])
    parser.add_argument("--runs", type=int, default=3, help="runs per size")
    parser.add_argument("--pets", type=Path, default=PETS_SAMPLE, help="the pets sample folder")
    parser.add_argument("--train-args", default="", help="more options for imgtune train, as one string")
    parser.add_argument("--imgtune", default=str(IMGTUNE),
                        help="the command that runs imgtune, as one string (e.g. another checkout's)")
    args = parser.parse_args()
    if args.scratch.resolve().is_relative_to(HERE.parent):
        raise SystemExit("--scratch must be outside the repository")
    path = HERE / "results" / f"scale-{datetime.now():%Y%m%d-%H%M%S}.json"
    path.parent.mkdir(exist_ok=True)
    record = dict(date=datetime.now().isoformat(timespec="seconds"), imgtune=args.imgtune,
                  machine=platform.processor() or platform.machine(), cores=len(os.sched_getaffinity(0)),
                  command=sys.argv, results=[])
    results = record["results"]
    for size in args.sizes:
        folder = generate(args.scratch / f"images-{size}", size, source=args.pets)
        for run in range(args.runs):
            result = dict(images=size, run=run, **run_once(folder, args.scratch, run, args.train_args.split(),
                                                                args.imgtune.split()))
            result["seconds_per_image"] = result["seconds"] / size
            results.append(result)
            print(f"{size:>6} images run {run}: {result['seconds']:7.1f} s ({1000 * result['seconds_per_image']:.1f} ms/img)"
                  f"  peak RSS {result['peak_rss'] / 2**30:.2f} GB (tree {result['peak_tree_rss'] / 2**30:.2f} GB)",
                  flush=True)
            path.write_text(json.dumps(record, indent=1) + "\n")  # after every run: a stopped benchmark keeps its runs
    sizes = sorted({r["images"] for r in results})
    summary = {}
    for size in sizes:
        runs = [r for r in results if r["images"] == size]
        summary[size] = dict(peak_rss_max=max(r["peak_rss"] for r in runs),
                             peak_tree_rss_max=max(r["peak_tree_rss"] for r in runs),
                             seconds_per_image_min=min(r["seconds_per_image"] for r in runs))
    small, large = summary[min(sizes)], summary[max(sizes)]
    verdict = dict(rss_ratio=large["peak_rss_max"] / small["peak_rss_max"],
                   rss_under_3gb=all(r["peak_rss"] < 3 * 2**30 for r in results),
                   seconds_per_image_ratio=max(s["seconds_per_image_min"] for s in summary.values())
                   / min(s["seconds_per_image_min"] for s in summary.values()))
    print(json.dumps(verdict, indent=1))
    record.update(summary=summary, verdict=verdict)
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
