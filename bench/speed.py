"""Speed: throughput of each path, and time to accuracy against a plain PyTorch loop, side by side.

    python bench/speed.py                       # both parts, elpv and the pets sample
    python bench/speed.py throughput            # forward / training / inference / loading images/s
    python bench/speed.py tta --data pets       # time to accuracy on the pets sample only
    python bench/speed.py deploy --runs runs/pets runs/elpv   # predictors: eager, ONNX fp32, int8

``throughput`` (EfficientNet-Lite0, 224 px, batch 32, random weights and inputs unless stated):
backbone features with PyTorch eager (NCHW), channels_last and ONNX Runtime, with their largest difference
from eager; training steps of the whole network and of
the head on cached features; bundle inference with PyTorch vs ONNX Runtime, from tensors (loading
excluded) and from image files (loading included); loading images from files vs the presize cache;
one frozen-phase epoch with cached features vs the body recomputed.

``compile``: torch.compile (inductor) against eager, forward only.

``deploy``: the predictors side by side on one batch of 32 pets pictures: PyTorch eager, ONNX Runtime
float32 and int8 (``imgtune.deploy.quantize``), ONNX Runtime's session options (imgtune's against its
defaults, spinning threads or not, outputs bound to pre-allocated buffers), ``predict_files`` on a folder
(every core decoding and running whole batches on a one-thread session) against its earlier form (one
thread decoding the next batch beside the model's threads) and ``predict`` (decoding, then the model), images/s of the
float32 and int8 models at batch sizes 1, 4, 8 and 32 (the most micro-batching can gain), each
preprocessing step (decoding, resizing, the normalised tensor from torchvision's chain against imgtune's
fused one), and, for each run
folder of ``--runs`` (trained with ``imgtune train``), int8's accuracy against float32 on the run's
validation images (``write_int8_onnx``). Targets: int8 >= 6x eager, within 1 point of float32, >= 100
images/s from files.

``tta`` (time to accuracy): imgtune's defaults (``imgtune.train``, a cold cache, then the same run
again with the cache warm) and the reference loop of ``bench/reference.py`` on the same backbone,
weights, images and split. The target is the reference's best validation accuracy; imgtune's time to
it counts everything from the start (data checking, features, lr finder, epochs up to the first at or
above the target). Also a DAWNBench-style line per run: time to accuracy and its cost at
``--price-per-hour`` (default: 0.10 USD, about a 2-vCPU cloud machine on demand).

A benchmark, not a test: it prints a table and writes bench/results/speed-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from imgtune import create_model, load_data
from imgtune.models import get_backbone
from imgtune.data.sources import PETS_LABEL_RE
from imgtune.data.presize import ImageView
from imgtune.data.transforms import tensor_transform
from imgtune.train.features import FeatureExtractor, body_fingerprint
from imgtune.train.run import train

HERE = Path(__file__).resolve().parent
PETS_SAMPLE = HERE.parent.parent / "shared" / "data" / "oxford-pets-sample"
ARCH = "efficientnet_lite0"

#: The data of the time-to-accuracy runs, and the reference's epochs on each.
TTA = {
    "elpv": dict(source=None, options={}, reference_epochs=3),
    "pets": dict(source=str(PETS_SAMPLE), options=dict(label_re=PETS_LABEL_RE, valid_pct=0.5, stratify=True),
                 reference_epochs=10),
}


def rate(function, images: int, *, seconds: float = 6.0, warmup: int = 1) -> float:
    """Images per second of ``function`` (which handles ``images`` images per call)."""
    for _ in range(warmup):
        function()
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        function()
        calls += 1
    return calls * images / (time.perf_counter() - started)


def compare(functions: dict, images: int, *, rounds: int = 3, seconds: float = 3.0) -> dict:
    """Images per second of each function, measured in turns (A, B, C, A, B, C, ...) and the median
    of the rounds kept, so that a change in the machine's load hits all of them alike."""
    rates: dict = {name: [] for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            rates[name].append(rate(function, images, seconds=seconds))
    return {name: float(np.median(values)) for name, values in rates.items()}


def throughput(args) -> dict:
    torch.manual_seed(0)
    backbone = get_backbone(ARCH)
    size, bs = backbone.size, 32
    model = create_model(ARCH, 37, weights="imagenet").eval()
    x = torch.randn(bs, 3, size, size)
    out: dict = {}
    def features(m, batch):
        with torch.inference_mode():
            return m.forward_head(m.forward_features(batch), pre_logits=True)

    expected = features(model, x)
    cl_model = create_model(ARCH, 37, weights="imagenet").eval().to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with tempfile.TemporaryDirectory() as tmp:
        extractor = FeatureExtractor(model, size=size, device=torch.device("cpu"), fingerprint=body_fingerprint(model),
                                     backend="onnx", cache_dir=tmp)
        extractor(x[:4])  # exports, checks against PyTorch
        out.update({f"features_{k}": v for k, v in compare(
            {"eager_nchw": lambda: features(model, x), "channels_last": lambda: features(cl_model, x_cl),
             "onnxruntime": lambda: extractor(x)}, bs).items()})
        out["features_channels_last_difference"] = float((features(cl_model, x_cl) - expected).abs().max())
        out["features_onnxruntime_difference"] = float((extractor(x) - expected).abs().max())
    # Training steps: the whole network (eager NCHW vs channels_last) and a head on cached features.
    def train_step(fmt):
        net = create_model(ARCH, 37, weights="imagenet").train().to(memory_format=fmt)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        batch, target = x.contiguous(memory_format=fmt), torch.randint(37, (bs,))

        def step():
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(batch), target).backward()
            opt.step()

        return step

    out.update({f"train_step_{k}": v for k, v in compare(
        {"eager_nchw": train_step(torch.contiguous_format), "channels_last": train_step(torch.channels_last)},
        bs, rounds=3, seconds=5.0).items()})
    head = torch.nn.Linear(model.num_features, 37)
    head_opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    feats, target = torch.randn(bs, model.num_features), torch.randint(37, (bs,))

    def head_step():
        head_opt.zero_grad()
        torch.nn.functional.cross_entropy(head(feats), target).backward()
        head_opt.step()

    out["train_step_head_on_features"] = rate(head_step, bs, seconds=3.0)
    out.update(loading_and_inference(args, model, backbone))
    out.update(frozen_epoch())
    return out


def frozen_epoch() -> dict:
    """Seconds of one frozen-phase epoch (training + validation) on the pets sample, or on the first
    160 elpv images where it is absent: the head on cached features vs the body run every step."""
    from imgtune.train.learner import Learner

    if PETS_SAMPLE.is_dir():
        data = load_data(str(PETS_SAMPLE), label_re=PETS_LABEL_RE, valid_pct=0.5, stratify=True)
    else:
        data = load_data(None)
        data.train, data.valid = data.train[:128], data.valid[:32]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for cached in (True, False):
            learner = Learner.from_data(data, progress=False, feature_cache=cached, cache_dir=tmp)
            learner.fit_one_cycle(1, 1e-3, phase="frozen")  # computes the features (or warms the presize cache)
            learner.fit_one_cycle(1, 1e-3, phase="frozen")
            out[f"frozen_epoch_seconds_{'features' if cached else 'recomputed'}"] = learner.history[-1]["seconds"]
    out["frozen_epoch_speedup"] = out["frozen_epoch_seconds_recomputed"] / out["frozen_epoch_seconds_features"]
    return out


def compiled(args) -> dict:
    """torch.compile (inductor) of the channels_last network, forward only, against eager channels_last."""
    backbone = get_backbone(ARCH)
    model = create_model(ARCH, 37, weights="imagenet").eval().to(memory_format=torch.channels_last)
    x = torch.randn(32, 3, backbone.size, backbone.size).contiguous(memory_format=torch.channels_last)
    out: dict = {}
    with torch.inference_mode():
        expected = model(x)
        out["eager_channels_last"] = rate(lambda: model(x), 32)
        started = time.perf_counter()
        fast = torch.compile(model)
        got = fast(x)
        out["compile_seconds"] = time.perf_counter() - started
        out["compiled_channels_last"] = rate(lambda: fast(x), 32)
        out["compiled_difference"] = float((got - expected).abs().max())
    return out


def loading_and_inference(args, model, backbone) -> dict:
    """Bundle inference (torch vs ONNX Runtime) with and without image loading; loading with and
    without the presize cache; on the pets sample's real JPEGs when present."""
    from imgtune.deploy.predict import OnnxPredictor, Predictor
    from imgtune.deploy.export import write_onnx
    from imgtune.train.learner import Learner

    out: dict = {}
    files = sorted(PETS_SAMPLE.glob("*.jpg"))[:64] if PETS_SAMPLE.is_dir() else []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not files:  # synthetic JPEGs of a typical photo size
            for i in range(64):
                rng = np.random.default_rng(i)
                path = tmp / f"img{i}.jpg"
                from PIL import Image

                Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(path, quality=90)
                files.append(path)
        view = ImageView(backbone.size, cache_dir=False)
        cached = ImageView(backbone.size, cache_dir=tmp / "cache")
        for path in files:
            cached.ensure(path)
        to_tensor = tensor_transform(backbone.mean, backbone.std)
        out.update({f"load_from_{k}": v for k, v in compare(
            {"files": lambda: [to_tensor(view(p)) for p in files],
             "presize_cache": lambda: [to_tensor(cached(p)) for p in files]}, len(files)).items()})
        # A bundle to predict with: the ImageNet body and a random 37-class head.
        learner = Learner(model, None, None, classes=[f"c{i}" for i in range(37)], device="cpu", channels_last=False,
                          config=dict(arch=ARCH, timm_name=backbone.timm_name, weights="imagenet", size=backbone.size,
                                      resize="crop", mean=list(backbone.mean), std=list(backbone.std)))
        learner.save(tmp / "run")
        _, difference = write_onnx(tmp / "run")
        torch_predictor, onnx_predictor = Predictor.load(tmp / "run"), OnnxPredictor.load(tmp / "run")
        batch = torch.randn(32, 3, backbone.size, backbone.size)
        plain = create_model(ARCH, 37, weights="imagenet").eval()

        def eager():
            with torch.inference_mode():
                plain(batch)

        out.update({f"inference_{k}": v for k, v in compare(
            {"eager_nchw": eager, "torch_predictor": lambda: torch_predictor._logits_of(batch),
             "onnxruntime": lambda: onnx_predictor._logits_of(batch)}, 32).items()})
        out["inference_onnx_difference"] = difference
        out.update({f"predict_files_{k}": v for k, v in compare(
            {"torch": lambda: torch_predictor.predict(files[:32]),
             "onnxruntime": lambda: onnx_predictor.predict(files[:32])}, 32).items()})
    return out


def deploy(args) -> dict:
    """The predictors side by side (see the module's docstring)."""
    from imgtune.deploy.export import write_onnx
    from imgtune.deploy.onnx_session import open_session
    from imgtune.deploy.predict import OnnxPredictor, Predictor
    from imgtune.deploy.quantize import preprocessed_batches, quantize_graph, write_int8_onnx
    from imgtune.train.learner import Learner

    import onnxruntime as ort

    backbone = get_backbone(ARCH)
    files = sorted(PETS_SAMPLE.glob("*.jpg"))
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = create_model(ARCH, 37, weights="imagenet").eval()
        learner = Learner(model, None, None, classes=[f"c{i}" for i in range(37)], device="cpu", channels_last=False,
                          config=dict(arch=ARCH, timm_name=backbone.timm_name, weights="imagenet", size=backbone.size,
                                      resize="crop", mean=list(backbone.mean), std=list(backbone.std)))
        learner.save(tmp / "run")
        write_onnx(tmp / "run")
        meta = json.loads((tmp / "run" / "model.json").read_text())
        started = time.perf_counter()
        int8_graph = quantize_graph((tmp / "run" / "model.onnx").read_bytes(),
                                    preprocessed_batches(files[-64:], meta))
        out["int8_quantize_seconds"] = time.perf_counter() - started
        (tmp / "run" / "model.int8.onnx").write_bytes(int8_graph)
        batch = torch.from_numpy(next(preprocessed_batches(files[:32], meta, bs=32)))
        fp32 = OnnxPredictor.load(tmp / "run")  # as every predictor: no spinning threads
        int8 = OnnxPredictor(open_session(int8_graph, spinning=False), meta, model=int8_graph)
        # predict_files as before 2026-12-01 evening: one thread decodes the next batch beside the model's threads
        fp32_one_decoder, int8_one_decoder = OnnxPredictor(fp32.session, meta), OnnxPredictor(int8.session, meta)
        ort_default = ort.InferenceSession(str(tmp / "run" / "model.onnx"), providers=["CPUExecutionProvider"])
        spinning = open_session(tmp / "run" / "model.onnx", spinning=True)
        bound = _bound_run(open_session(tmp / "run" / "model.onnx"), batch.numpy())
        plain = create_model(ARCH, 37, weights="imagenet").eval()

        def eager():
            with torch.inference_mode():
                plain(batch)

        out.update({f"batch_{k}": v for k, v in compare(
            {"eager_nchw": eager, "onnx_fp32": lambda: fp32._logits_of(batch), "onnx_int8": lambda: int8._logits_of(batch),
             "onnx_fp32_ort_defaults": lambda: ort_default.run(["logits"], {"images": batch.numpy()}),
             "onnx_fp32_spinning": lambda: spinning.run(["logits"], {"images": batch.numpy()}),
             "onnx_fp32_io_binding": bound}, 32, rounds=args.rounds).items()})
        out["int8_over_eager"] = out["batch_onnx_int8"] / out["batch_eager_nchw"]
        out["fp32_over_eager"] = out["batch_onnx_fp32"] / out["batch_eager_nchw"]
        out["int8_over_fp32"] = out["batch_onnx_int8"] / out["batch_onnx_fp32"]
        logits = fp32._logits_of(batch), int8._logits_of(batch)
        out["batch_int8_top1_agreement"] = float((logits[0].argmax(1) == logits[1].argmax(1)).float().mean())
        out.update({f"batch_size_{k}": v for k, v in compare(
            {f"{name}_{n}": (lambda p=p, n=n: p._logits_of(batch[:n])) for name, p in (("fp32", fp32), ("int8", int8))
             for n in (1, 4, 8, 32)}, 1, rounds=args.rounds, seconds=1.0).items()})
        for name in ("fp32", "int8"):  # images/s at each batch size: compare() counted calls
            for n in (4, 8, 32):
                out[f"batch_size_{name}_{n}"] *= n
            out[f"batch_size_{name}_8_over_1"] = out[f"batch_size_{name}_8"] / out[f"batch_size_{name}_1"]
        out.update(preprocessing(files[:64], meta, args.rounds))
        folder = files[:192]  # six batches of 32: three per core
        out.update({f"files_{k}": v for k, v in compare(
            {"fp32_predict_files": lambda: list(fp32.predict_files(folder)),
             "fp32_predict_no_overlap": lambda: fp32.predict(folder),
             "fp32_predict_files_one_decoder": lambda: list(fp32_one_decoder.predict_files(folder)),
             "int8_predict_files": lambda: list(int8.predict_files(folder)),
             "int8_predict_files_one_decoder": lambda: list(int8_one_decoder.predict_files(folder)),
             "int8_predict_no_overlap": lambda: int8.predict(folder),
             "torch_predict_files": lambda: list(Predictor.load(tmp / "run").predict_files(folder[:32]))},
            len(folder), rounds=args.rounds, seconds=1.0).items()})
        out["files_torch_predict_files"] *= 32 / len(folder)  # it ran on 32 files
    for run in args.runs:
        with tempfile.TemporaryDirectory() as tmp:
            _, figures = write_int8_onnx(run, path=Path(tmp) / "model.int8.onnx", max_drop=100.0)
        out[f"accuracy_{Path(run).name}"] = figures
    return out


def preprocessing(files: list[Path], meta: dict, rounds: int) -> dict:
    """Images/s of each step that turns a file into the model's input: decoding (with the JPEG
    decoder's reduced-size draft), resizing and cropping, and the normalised tensor from torchvision's
    three transforms against imgtune's :class:`ToNormalizedTensor`; their largest difference."""
    from torchvision.transforms import v2

    from imgtune.data.images import load_image
    from imgtune.data.transforms import ToNormalizedTensor, resize_steps

    size, mean, std = meta["size"], meta["mean"], meta["std"]
    resize = v2.Compose(resize_steps(size, meta.get("resize", "crop")))
    chain = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    fused = ToNormalizedTensor(mean, std)
    decoded = [load_image(path, min_size=size) for path in files]
    pictures = [resize(image) for image in decoded]
    rates = compare({"decode": lambda: [load_image(path, min_size=size) for path in files],
                     "resize_crop": lambda: [resize(image) for image in decoded],
                     "to_tensor_torchvision": lambda: [chain(picture) for picture in pictures],
                     "to_tensor_fused": lambda: [fused(picture) for picture in pictures]},
                    len(files), rounds=rounds, seconds=1.0)
    out = {f"preprocess_{k}": v for k, v in rates.items()}
    out["preprocess_fused_over_torchvision"] = rates["to_tensor_fused"] / rates["to_tensor_torchvision"]
    out["preprocess_fused_difference"] = max(float((chain(p) - fused(p)).abs().max()) for p in pictures)
    return out


def _bound_run(session, images: np.ndarray):
    """A call of ``session`` on ``images`` with input and output bound to buffers allocated once."""
    images = np.ascontiguousarray(images)
    binding = session.io_binding()
    binding.bind_cpu_input("images", images)
    logits = np.empty((len(images), session.get_outputs()[0].shape[1]), dtype=np.float32)
    binding.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
    buffers = (images, logits)  # ONNX Runtime reads and writes them: they must live as long as the call

    def run():
        session.run_with_iobinding(binding)
        return buffers[1]

    return run


def time_to_accuracy(name: str, args) -> dict:
    from reference import run_reference

    spec = TTA[name]
    backbone = get_backbone(ARCH)
    record: dict = {"data": name}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        runs = {}
        for label in ("cold", "warm"):  # the same command twice: caches empty, then warm
            started = time.perf_counter()
            result = train(spec["source"], arch=ARCH, out=tmp / label, cache_dir=tmp / "cache", progress=False,
                           report=False, **spec["options"])
            runs[label] = dict(wall=time.perf_counter() - started, metrics=result.metrics)
            print(f"  imgtune {label}: accuracy {100 * result.metrics['valid_accuracy']:.2f}%"
                  f"  {runs[label]['wall']:.1f}s", flush=True)
        data = runs["cold"]["metrics"]["data"]
        images = load_data(spec["source"], **spec["options"])
        assert len(images.train) == data["train"] and len(images.valid) == data["valid"]  # the same split
        reference = run_reference(images, create_model(ARCH, len(images.classes), weights="imagenet"),
                                  size=backbone.size, mean=backbone.mean, std=backbone.std,
                                  epochs=spec["reference_epochs"], workers=args.workers)
    target = reference.best
    ref_time = next(e["seconds"] for e in reference.epochs if e["accuracy"] >= target)
    record.update(reference=dict(epochs=reference.epochs, best=target, seconds_to_best=ref_time),
                  target=target)
    for label, run in runs.items():
        metrics = run["metrics"]
        seconds = metrics["seconds"]
        elapsed = seconds.get("data", 0) + seconds.get("features", 0) + seconds.get("lr_find", 0)
        reached = None
        for epoch in metrics["history"]:
            elapsed += epoch["seconds"]
            if epoch["accuracy"] >= target:
                reached = elapsed
                break
        record[label] = dict(accuracy=metrics["valid_accuracy"], wall=run["wall"], seconds=seconds,
                             seconds_to_target=reached, epochs=len(metrics["history"]),
                             speedup=ref_time / reached if reached else None, cache=metrics.get("cache"))
    return record


def dawnbench_line(name: str, who: str, seconds: float | None, accuracy: float, price: float) -> str:
    if seconds is None:
        return f"{name:<5} {who:<14} did not reach the target"
    return (f"{name:<5} {who:<14} {100 * accuracy:6.2f}% in {seconds:7.1f} s  "
            f"cost ${price * seconds / 3600:.5f} at ${price:.2f}/h")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="*", choices=["throughput", "tta", "compile", "deploy"], default=["throughput", "tta"],
                        help="compile: torch.compile against eager (minutes of compiling on a small CPU)")
    parser.add_argument("--data", nargs="*", choices=sorted(TTA), default=sorted(TTA))
    parser.add_argument("--workers", type=int, default=2, help="Loader processes of the reference loop.")
    parser.add_argument("--price-per-hour", type=float, default=0.10)
    parser.add_argument("--runs", nargs="*", default=[], help="deploy: run folders to check int8's accuracy on.")
    parser.add_argument("--rounds", type=int, default=3, help="deploy: rounds of the side-by-side timings.")
    args = parser.parse_args()
    record: dict = dict(
        date=datetime.now().isoformat(timespec="seconds"),
        machine=dict(cpus=len(os.sched_getaffinity(0)), torch_threads=torch.get_num_threads(),
                     processor=platform.processor() or platform.machine(), torch=torch.__version__),
        price_per_hour=args.price_per_hour,
    )
    if "throughput" in args.parts:
        t = record["throughput"] = throughput(args)
        print("throughput (images/s, EfficientNet-Lite0 224 px, batch 32):")
        for key, value in t.items():
            print(f"  {key:<36} {value:10.4g}")
        print(f"  ONNX Runtime / eager NCHW inference: {t['inference_onnxruntime'] / t['inference_eager_nchw']:.1f}x;"
              f" features ONNX Runtime / eager: {t['features_onnxruntime'] / t['features_eager_nchw']:.1f}x")
    if "compile" in args.parts:
        c = record["compile"] = compiled(args)
        print(f"torch.compile: {c['compiled_channels_last']:.1f} img/s vs eager channels_last {c['eager_channels_last']:.1f}"
              f" (compiling took {c['compile_seconds']:.0f} s; largest logit difference {c['compiled_difference']:.2g})")
    if "deploy" in args.parts:
        d = record["deploy"] = deploy(args)
        print("deploy (images/s, EfficientNet-Lite0 224 px, batch 32 pets pictures):")
        for key, value in d.items():
            if not isinstance(value, dict):
                print(f"  {key:<36} {value:10.4g}")
        print(f"  batch 8 / batch 1 images/s: fp32 {d['batch_size_fp32_8_over_1']:.2f}x, int8 "
              f"{d['batch_size_int8_8_over_1']:.2f}x (what micro-batching can gain in the model)")
        print(f"  to tensor: imgtune's fused {d['preprocess_fused_over_torchvision']:.1f}x torchvision's chain "
              f"(largest difference {d['preprocess_fused_difference']:.1g})")
        print(f"  int8 / eager {d['int8_over_eager']:.1f}x (target 6x), fp32 / eager {d['fp32_over_eager']:.1f}x; "
              f"predict_files int8 {d['files_int8_predict_files']:.0f}/s, fp32 {d['files_fp32_predict_files']:.0f}/s "
              "(target 100/s)")
        for key, figures in d.items():
            if isinstance(figures, dict):
                print(f"  {key}: int8 {100 * figures['int8_accuracy']:.2f}% vs fp32 {100 * figures['fp32_accuracy']:.2f}%"
                      f" ({-figures['accuracy_drop']:+.2f} points, target >= -1), agreement "
                      f"{100 * figures['agreement']:.2f}% on {figures['images']} images")
    if "tta" in args.parts:
        record["time_to_accuracy"] = {}
        for name in args.data:
            print(f"time to accuracy: {name}", flush=True)
            r = record["time_to_accuracy"][name] = time_to_accuracy(name, args)
            ref = r["reference"]
            print(f"  target {100 * r['target']:.2f}% (the reference's best)")
            print("  " + dawnbench_line(name, "reference", ref["seconds_to_best"], r["target"], args.price_per_hour))
            for label in ("cold", "warm"):
                run = r[label]
                print("  " + dawnbench_line(name, f"imgtune {label}", run["seconds_to_target"], r["target"],
                                            args.price_per_hour)
                      + (f"  ({run['speedup']:.1f}x faster)" if run["speedup"] else "")
                      + f"; final {100 * run['accuracy']:.2f}%, whole run {run['wall']:.1f} s")
    out = HERE / "results" / f"speed-{datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(record, indent=2, default=float) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
