"""The speed measurements on one GPU, within 5 minutes: ResNet34, ResNet50 and EfficientNet-Lite0.

    python bench/gpu.py                      # CUDA (or MPS); synthetic data, ImageNet weights if cached
    python bench/gpu.py --device cpu --quick # a smoke run anywhere (tiny batches, a few steps)

Per network (224 px, random inputs): training steps/s in fp32 NCHW eager vs imgtune's GPU path
(bf16 autocast, or fp16 with a GradScaler where the GPU has no bf16, + channels_last), inference
images/s the same two ways, and feature extraction for the frozen phase. Then imgtune's loader from
the presize cache with pinned memory (can the CPU feed the GPU?), and one end-to-end ``imgtune.train``
(head on cached features, then the whole network fine-tuned) on the pets sample when it is beside the
project, else on a synthetic two-class folder. Weights: ImageNet when available offline (the Lite0
package; ResNets from the local Hugging Face cache), else random, which times the same.

Prints a table and writes bench/results/gpu-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from imgtune import create_model
from imgtune.errors import ImgtuneError
from imgtune.models import get_backbone

HERE = Path(__file__).resolve().parent
PETS_SAMPLE = HERE.parent.parent / "shared" / "data" / "oxford-pets-sample"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_rate(function, images: int, device: torch.device, *, steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        function()
    sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        function()
    sync(device)
    return steps * images / (time.perf_counter() - started)


def network(arch: str, device: torch.device, fast: bool):
    try:
        model = create_model(arch, 37, weights="imagenet")
        weights = "imagenet"
    except ImgtuneError:  # offline without the hub weights: random weights time the same
        model, weights = create_model(arch, 37, weights="none"), "random"
    fmt = torch.channels_last if fast else torch.contiguous_format
    return model.to(device, memory_format=fmt), weights


def measure_network(arch: str, device: torch.device, bs: int, steps: int) -> dict:
    size = get_backbone(arch).size
    amp = None
    if device.type == "cuda":
        amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    out: dict = {}
    for fast in (False, True):
        model, weights = network(arch, device, fast)
        fmt = torch.channels_last if fast else torch.contiguous_format
        x = torch.randn(bs, 3, size, size, device=device).contiguous(memory_format=fmt)
        y = torch.randint(37, (bs,), device=device)
        use_amp = fast and amp is not None
        scaler = torch.amp.GradScaler("cuda") if use_amp and amp == torch.float16 else None
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def autocast():
            return torch.autocast(device.type, dtype=amp) if use_amp else torch.autocast(device.type, enabled=False)

        def train_step():
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()

        def infer():
            with torch.inference_mode(), autocast():
                model(x)

        def features():
            with torch.inference_mode(), autocast():
                model.forward_head(model.forward_features(x), pre_logits=True)

        label = "fast" if fast else "fp32_nchw"
        model.train()
        out[f"train_{label}"] = timed_rate(train_step, bs, device, steps=steps)
        model.eval()
        out[f"inference_{label}"] = timed_rate(infer, bs, device, steps=steps)
        out[f"features_{label}"] = timed_rate(features, bs, device, steps=steps)
        out["weights"] = weights
    out["precision"] = str(amp).replace("torch.", "") if amp is not None else "fp32"
    return out


def synthetic_folder(root: Path, n: int, size: int = 320) -> Path:
    from PIL import Image

    for label, colour in (("red", (200, 40, 40)), ("blue", (40, 40, 200))):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            rng = np.random.default_rng(i + (0 if label == "red" else 10_000))
            pixels = np.clip(np.array(colour) + rng.normal(0, 60, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / label / f"{label}_{i}.jpg", quality=90)
    return root


def measure_loader(device: torch.device, quick: bool, tmp: Path) -> dict:
    from imgtune import load_data
    from imgtune.data.presize import ImageView

    folder = synthetic_folder(tmp / "loader", 32 if quick else 256)
    view = ImageView(224, cache_dir=tmp / "cache")
    data = load_data(folder, view=view)
    out = {}
    for cached in (False, True):
        train_dl, _ = data.loaders(size=224, bs=64, num_workers=2 if quick else 8, pin_memory=device.type == "cuda",
                                   cache=cached, cache_dir=tmp / "cache")
        started, count = time.perf_counter(), 0
        for xb, _ in train_dl:
            xb = xb.to(device, non_blocking=True)
            count += len(xb)
        sync(device)
        out[f"loader_{'presize_cache' if cached else 'files'}"] = count / (time.perf_counter() - started)
    return out


def end_to_end(device: torch.device, quick: bool, tmp: Path) -> dict:
    from imgtune.data.sources import PETS_LABEL_RE
    from imgtune.train.run import train

    if PETS_SAMPLE.is_dir() and not quick:
        source, options, name = str(PETS_SAMPLE), dict(label_re=PETS_LABEL_RE, valid_pct=0.5, stratify=True), "pets"
    else:
        source, options, name = str(synthetic_folder(tmp / "e2e", 8 if quick else 64)), {}, "synthetic"
    if quick:  # a tiny random network: the smoke run checks the path, not the speed
        options.update(arch="test_efficientnet", weights="none", size=64, bs=8)
    started = time.perf_counter()
    result = train(source, out=tmp / "run", device=str(device), progress=False, report=False, cache_dir=tmp / "cache",
                   epochs=1 if quick else None, **options)
    m = result.metrics
    return dict(data=name, accuracy=m["valid_accuracy"], seconds=m["seconds"], wall=time.perf_counter() - started,
                history=[(h["phase"], h["accuracy"]) for h in m["history"]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda (default when present), mps or cpu")
    parser.add_argument("--quick", action="store_true", help="A smoke run: tiny batches and step counts.")
    parser.add_argument("--archs", nargs="*", default=["resnet34", "resnet50", "efficientnet_lite0"])
    parser.add_argument("--results", type=Path, default=HERE / "results", help="Folder of the JSON record.")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    bs, steps = (4, 2) if args.quick else (128, 30)
    record: dict = dict(date=datetime.now().isoformat(timespec="seconds"), device=str(device),
                        name=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__,
                        batch=bs, networks={})
    started = time.perf_counter()
    for arch in args.archs:
        r = record["networks"][arch] = measure_network(arch, device, bs, steps)
        print(f"{arch:<20} ({r['weights']} weights, {r['precision']}): train {r['train_fp32_nchw']:8.1f} ->"
              f" {r['train_fast']:8.1f} img/s; inference {r['inference_fp32_nchw']:8.1f} -> {r['inference_fast']:8.1f};"
              f" features {r['features_fast']:8.1f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        record["loader"] = measure_loader(device, args.quick, Path(tmp))
        print("loader images/s: " + ", ".join(f"{k} {v:.0f}" for k, v in record["loader"].items()), flush=True)
        record["train"] = end_to_end(device, args.quick, Path(tmp))
    t = record["train"]
    print(f"imgtune train on {t['data']}: accuracy {100 * t['accuracy']:.2f}% in {t['wall']:.1f}s ("
          + ", ".join(f"{k} {v:.1f}s" for k, v in t["seconds"].items()) + ")")
    record["seconds"] = time.perf_counter() - started
    out = args.results / f"gpu-{datetime.now():%Y%m%d-%H%M%S}{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(record, indent=2, default=float) + "\n")
    print(f"{record['seconds']:.0f}s in all; written to {out}")


if __name__ == "__main__":
    main()
