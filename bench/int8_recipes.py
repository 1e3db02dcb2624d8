"""int8 recipes: which quantization choices keep int8 within a point of float32, and how fast each runs.

    python bench/int8_recipes.py runs/pets runs/elpv                  # every recipe on each run folder
    python bench/int8_recipes.py runs/pets --recipes minmax entropy   # some of them
    python bench/int8_recipes.py --list                               # the recipes and what they change

For each run folder (written by ``imgtune train``, with its ``split.csv``): the bundle's float32 graph
quantized with each recipe (a :class:`imgtune.deploy.quantize.Recipe` and a number of calibration
pictures, drawn from the run's training images as ``imgtune export --int8`` draws them), then, as
``write_int8_onnx`` checks it, float32's and int8's accuracy on the run's validation images, their
top-1 agreement and the accuracy drop in points; and the images/s of int8 and float32 on one batch of
32 validation pictures (measured in turns, the median of ``--rounds``; only comparable with each other
on a loaded machine). A recipe counts when it loses at most ``MAX_DROP`` points on every run and int8
stays faster than float32. Activation ranges are measured once per calibration method and sample and
reused by the recipes that share them.

A benchmark, not a test: it prints a table and writes bench/results/int8-recipes-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from imgtune.deploy.bundle import load_model, read_meta
from imgtune.deploy.export import bundle_graph
from imgtune.deploy.onnx_session import open_session
from imgtune.deploy.quantize import (CALIBRATION_IMAGES, MAX_DROP, RECIPE, Recipe, compare_int8,
                                     preprocessed_batches, quantize_graph, run_split)
from speed import compare

HERE = Path(__file__).resolve().parent

#: MinMax ranges, otherwise as :data:`RECIPE`: what ``imgtune export --int8`` used before this benchmark
#: (but for the "same" padding's shape arithmetic, which every recipe keeps in float32 now).
MINMAX = Recipe(calibration="minmax")

#: name -> (recipe, calibration pictures); each changes one thing against ``minmax`` or ``percentile-99.999``.
RECIPES = {
    "minmax": (MINMAX, CALIBRATION_IMAGES),
    "minmax-256": (MINMAX, 256),
    "minmax-mirrors": (replace(MINMAX, mirrors=True), CALIBRATION_IMAGES),
    "entropy": (Recipe(calibration="entropy"), CALIBRATION_IMAGES),
    "s8-8bit": (replace(MINMAX, reduce_range=False), CALIBRATION_IMAGES),
    "u8-8bit": (replace(MINMAX, weights="uint8", reduce_range=False), CALIBRATION_IMAGES),
    "symmetric-activations": (replace(MINMAX, activation_symmetric=True), CALIBRATION_IMAGES),
    "float-stem": (replace(MINMAX, keep_float=("stem",)), CALIBRATION_IMAGES),
    "float-head": (replace(MINMAX, keep_float=("head",)), CALIBRATION_IMAGES),
    "float-pool-classifier": (replace(MINMAX, keep_float=("pool", "classifier")), CALIBRATION_IMAGES),
    "float-classifier": (replace(MINMAX, keep_float=("classifier",)), CALIBRATION_IMAGES),
    "float-add": (replace(MINMAX, keep_float=("add",)), CALIBRATION_IMAGES),
    "percentile-99.99": (Recipe(calibration="percentile", percentile=99.99), CALIBRATION_IMAGES),
    "percentile-99.999": (Recipe(calibration="percentile", percentile=99.999), CALIBRATION_IMAGES),
    "percentile-99.999-256": (Recipe(calibration="percentile", percentile=99.999), 256),
    "percentile-99.999-float-classifier": (Recipe(calibration="percentile", percentile=99.999,
                                                  keep_float=("classifier",)), CALIBRATION_IMAGES),
}


def measure_run(run_dir: Path, names: list[str], args, cache: Path) -> dict:
    """Every recipe of ``names`` on one run folder (see the module's docstring)."""
    meta = read_meta(run_dir)
    train_files, valid_files, targets = run_split(run_dir, meta["classes"])
    fp32_graph = bundle_graph(run_dir, meta, load_model(run_dir, meta), opset=17).SerializeToString()
    fp32 = open_session(fp32_graph)
    valid = list(preprocessed_batches(valid_files, meta, bs=32))
    batch = valid[0]
    out = dict(train=len(train_files), valid=len(valid_files), recipes={})
    for name in names:
        recipe, images = RECIPES[name]
        calibration = random.Random(args.seed).sample(train_files, min(images, len(train_files)))
        # Ranges depend on the method and the pictures only: the other recipes reuse them.
        ranges = cache / (f"{run_dir.name}-{recipe.calibration}-{recipe.percentile:g}-{len(calibration)}-"
                          f"{recipe.mirrors}.json")
        started = time.perf_counter()
        int8_graph = quantize_graph(fp32_graph, preprocessed_batches(calibration, meta), recipe=recipe,
                                    ranges_cache=ranges)
        quantize_seconds = time.perf_counter() - started
        int8 = open_session(int8_graph)
        figures = compare_int8(fp32, int8, valid, targets)
        rates = compare({kind: (lambda session=session: session.run(["logits"], {"images": batch}))
                         for kind, session in (("fp32", fp32), ("int8", int8))}, len(batch),
                        rounds=args.rounds, seconds=args.seconds)
        r = out["recipes"][name] = figures | dict(
            recipe=recipe.describe(), calibration_images=len(calibration), quantize_seconds=quantize_seconds,
            fp32_images_per_s=rates["fp32"], int8_images_per_s=rates["int8"],
            int8_over_fp32=rates["int8"] / rates["fp32"])
        print(f"{run_dir.name:>8} {name:<36} fp32 {100 * r['fp32_accuracy']:6.2f}%  int8 "
              f"{100 * r['int8_accuracy']:6.2f}%  drop {r['accuracy_drop']:+5.2f}  agreement "
              f"{100 * r['agreement']:6.2f}%  int8 {r['int8_images_per_s']:5.1f} vs fp32 "
              f"{r['fp32_images_per_s']:5.1f} img/s ({r['int8_over_fp32']:.2f}x, under load "
              f"{os.getloadavg()[0]:.1f})", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", type=Path, help="Run folders written by `imgtune train`.")
    parser.add_argument("--recipes", nargs="*", choices=list(RECIPES), default=list(RECIPES))
    parser.add_argument("--seed", type=int, default=0, help="Seeds the calibration sample (as imgtune export).")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="Timing per round and graph.")
    parser.add_argument("--list", action="store_true", help="Print the recipes and exit.")
    args = parser.parse_args()
    if args.list or not args.runs:
        for name, (recipe, images) in RECIPES.items():
            print(f"{name:<36} {images:>4} pictures  {recipe.describe()}")
        return
    record = dict(date=datetime.now().isoformat(timespec="seconds"), max_drop=MAX_DROP,
                  adopted=RECIPE.describe(), load_average=os.getloadavg()[0], runs={})
    with tempfile.TemporaryDirectory(prefix="int8-ranges-") as cache:
        for run_dir in args.runs:
            record["runs"][str(run_dir)] = measure_run(run_dir, args.recipes, args, Path(cache))
    for name in args.recipes:
        results = [run["recipes"][name] for run in record["runs"].values()]
        ok = all(r["accuracy_drop"] <= MAX_DROP and r["int8_over_fp32"] > 1 for r in results)
        drops = ", ".join(f"{r['accuracy_drop']:+.2f}" for r in results)
        print(f"{name:<36} drops {drops} points; {'meets' if ok else 'misses'} the rule "
              f"(<= {MAX_DROP:g} points on every run, int8 faster than float32)")
    out = HERE / "results" / f"int8-recipes-{datetime.now():%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
