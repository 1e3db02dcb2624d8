"""Feature extraction speed on the CPU: ONNX Runtime session settings and batch sizes, side by side.

    python bench/extract_speed.py                     # EfficientNet-Lite0 at 224, 6 rounds
    python bench/extract_speed.py --rounds 3 --seconds 4

Exports the frozen body of ``--arch`` (ImageNet weights) as imgtune does, then times each variant
below on batches of real pictures and their mirrors (images/s, a mirror image counting as one),
the variants taking turns round after round so that a busy machine slows them all alike; the median
of the rounds is reported, with its ratio to ``current`` (the settings imgtune shipped with).
A benchmark, not a test: it prints a table and writes bench/results/extract-speed-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from imgtune.models import create_model
from imgtune.system import usable_cores
from imgtune.train.extract import _Body, _export_body

HERE = Path(__file__).resolve().parent


def variants(cores: int) -> dict[str, dict]:
    """name -> session settings and images per call (pictures x 2 with the mirrors)."""
    current = dict(intra=torch.get_num_threads(), inter=1, level="all", spin=True, arena=True, batch=32)
    return {
        "current": current,
        "no spinning": dict(current, spin=False),
        "intra = 1": dict(current, intra=1),
        "batch 16": dict(current, batch=16),
        "batch 64": dict(current, batch=64),
        "no arena": dict(current, arena=False),
        "io binding": dict(current, binding=True),
        "denormals as zero": dict(current, denormal=True),
    }


def session(model: str, settings: dict) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings["intra"]
    options.inter_op_num_threads = settings["inter"]
    options.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}[settings["level"]]
    options.enable_cpu_mem_arena = settings["arena"]
    if settings.get("denormal"):
        options.add_session_config_entry("session.set_denormal_as_zero", "1")
    if not settings["spin"]:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def real_batch(folder: Path, count: int, size: int, arch: str) -> np.ndarray:
    """``count`` normalised pictures of the JPEGs in ``folder`` (half of them mirrored), as imgtune feeds them."""
    from imgtune.data.presize import ImageView
    from imgtune.data.transforms import tensor_transform
    from imgtune.models import get_backbone

    backbone, view = get_backbone(arch), ImageView(size, cache_dir=False)
    to_tensor = tensor_transform(backbone.mean, backbone.std)
    pictures = torch.stack([to_tensor(view(path)) for path in sorted(folder.glob("*.jpg"))[: count // 2]])
    return torch.cat([pictures, pictures.flip(-1)]).numpy()


def runner(model: str, settings: dict, images: np.ndarray):
    """A function that runs one batch, and the images in it."""
    sess = session(model, settings)
    batch = np.ascontiguousarray(images[: settings["batch"]])
    if not settings.get("binding"):
        return lambda: sess.run(None, {"images": batch}), settings["batch"]
    width = sess.run(None, {"images": batch[:2]})[0].shape[1]
    out = np.empty((settings["batch"], width), np.float32)
    binding = sess.io_binding()
    binding.bind_cpu_input("images", batch)
    binding.bind_output("features", "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
    def run():  # ``batch`` and ``out`` must outlive the binding: ONNX Runtime uses their memory
        sess.run_with_iobinding(binding)
        return batch, out

    return run, settings["batch"]


def rate(function, images: int, seconds: float) -> float:
    function()  # warm-up
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        function()
        done += images
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="efficientnet_lite0")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=5.0, help="per variant and round")
    parser.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    parser.add_argument("--weights", default="imagenet", help="imagenet or none (random)")
    parser.add_argument("--images", type=Path, default=HERE.parent.parent / "shared" / "data" / "oxford-pets-sample",
                        help="JPEGs to feed (real pictures: denormal numbers depend on the data)")
    args = parser.parse_args()
    cores = usable_cores()
    chosen = {k: v for k, v in variants(cores).items() if not args.only or k in args.only or k == "current"}
    with tempfile.TemporaryDirectory() as scratch:
        model = create_model(args.arch, 10, weights=args.weights).eval()
        images = real_batch(args.images, max(v["batch"] for v in chosen.values()), args.size, args.arch)
        path = Path(scratch) / "body.onnx"
        path.write_bytes(_export_body(_Body(model), args.size))
        rates = {name: [] for name in chosen}
        for number in range(args.rounds):
            for name, settings in chosen.items():  # one session at a time: each holds its own arena
                function, count = runner(str(path), settings, images)
                rates[name].append(rate(function, count, args.seconds))
                del function
            print(f"round {number + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items()), flush=True)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    for name, value in medians.items():
        print(f"{name:>20}: {value:6.1f} img/s  x{value / medians['current']:.2f}")
    record = dict(date=datetime.now().isoformat(timespec="seconds"), arch=args.arch, weights=args.weights,
                  size=args.size, cores=cores,
                  load_average=os.getloadavg(), variants=chosen, rates=rates, medians=medians)
    out = HERE / "results" / f"extract-speed-{datetime.now():%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
