"""int8 features: would the frozen body quantized to int8 give the head features as good as float32's?

    python bench/int8_features.py                  # the pets sample and elpv
    python bench/int8_features.py --data pets

For each data set (the pets sample split as ``--label-re '^(.+)_\\d+\\.jpg$' --valid-pct 0.5 --stratify
--seed 42``; elpv with seed 42): the frozen ImageNet EfficientNet-Lite0 body (images -> pooled features,
the graph :mod:`imgtune.train.extract` exports) in float32 and quantized with
:func:`imgtune.deploy.quantize.quantize_graph` (calibrated on ``--calibration`` training pictures),
the features of every picture from both, and the same linear head trained on each (softmax regression,
full batch, AdamW, fixed steps, same seed); then the head's validation accuracy on float32 vs int8
features, and the body's images/s in float32 vs int8 on one batch, side by side. The rule: int8
features are adopted only within 0.3 points of float32 on both data sets.

A benchmark, not a test: it prints a table and writes bench/results/int8-features-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from torch import nn

from imgtune import create_model, load_data
from imgtune.deploy.export import module_to_onnx
from imgtune.deploy.onnx_session import open_session
from imgtune.deploy.quantize import preprocessed_batches, quantize_graph
from imgtune.models import get_backbone
from speed import ARCH, PETS_SAMPLE, compare

HERE = Path(__file__).resolve().parent
DATA = {
    "pets": dict(source=str(PETS_SAMPLE), label_re=r"^(.+)_\d+\.jpg$", valid_pct=0.5, stratify=True, seed=42),
    "elpv": dict(source=None, seed=42),
}
#: Adopt int8 features only when the head loses at most this many accuracy points on every data set.
RULE_POINTS = 0.3


class Body(nn.Module):
    """The network without its classifier: images to pooled features (as imgtune.train.extract)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images):
        return self.model.forward_head(self.model.forward_features(images), pre_logits=True)


def features(session, batches) -> np.ndarray:
    return np.concatenate([session.run(None, {"images": batch})[0] for batch in batches])


def head_accuracy(train_x, train_y, valid_x, valid_y, classes: int, *, steps: int = 300, seed: int = 0) -> float:
    """Validation accuracy of a softmax regression fitted on standardised features (full batch)."""
    torch.manual_seed(seed)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    x, v = (torch.from_numpy((a - mean) / std).float() for a in (train_x, valid_x))
    y = torch.from_numpy(train_y)
    head = nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(head(x), y).backward()
        optimizer.step()
    with torch.no_grad():
        return float((head(v).argmax(1).numpy() == valid_y).mean())


def measure(name: str, args) -> dict:
    spec = dict(DATA[name])
    data = load_data(spec.pop("source"), **spec)
    backbone = get_backbone(ARCH)
    meta = dict(size=backbone.size, resize="crop", mean=list(backbone.mean), std=list(backbone.std))
    index = {c: i for i, c in enumerate(data.classes)}
    train_paths, valid_paths = [i.path for i in data.train], [i.path for i in data.valid]
    train_y = np.array([index[i.label] for i in data.train])
    valid_y = np.array([index[i.label] for i in data.valid])
    body = Body(create_model(ARCH, len(data.classes), weights="imagenet").eval())
    fp32_graph = module_to_onnx(body, torch.zeros(2, 3, backbone.size, backbone.size), input_name="images",
                                output_name="features")
    calibration = random.Random(0).sample(train_paths, min(args.calibration, len(train_paths)))
    started = time.perf_counter()
    int8_graph = quantize_graph(fp32_graph, preprocessed_batches(calibration, meta))
    quantize_seconds = time.perf_counter() - started
    fp32, int8 = open_session(fp32_graph), open_session(int8_graph)
    arrays = {split: list(preprocessed_batches(paths, meta, bs=32)) for split, paths in
              (("train", train_paths), ("valid", valid_paths))}
    feats = {kind: {split: features(session, batches) for split, batches in arrays.items()}
             for kind, session in (("fp32", fp32), ("int8", int8))}
    accuracy = {kind: head_accuracy(f["train"], train_y, f["valid"], valid_y, len(data.classes))
                for kind, f in feats.items()}
    batch = arrays["valid"][0]
    rates = compare({"fp32": lambda: fp32.run(None, {"images": batch}),
                     "int8": lambda: int8.run(None, {"images": batch})}, len(batch), rounds=args.rounds)
    cosine = np.sum(feats["fp32"]["valid"] * feats["int8"]["valid"], 1) / (
        np.linalg.norm(feats["fp32"]["valid"], axis=1) * np.linalg.norm(feats["int8"]["valid"], axis=1) + 1e-12)
    return dict(train=len(train_paths), valid=len(valid_paths), calibration=len(calibration),
                quantize_seconds=quantize_seconds, fp32_accuracy=accuracy["fp32"], int8_accuracy=accuracy["int8"],
                accuracy_drop_points=100 * (accuracy["fp32"] - accuracy["int8"]),
                features_cosine_mean=float(cosine.mean()), features_cosine_min=float(cosine.min()),
                fp32_images_per_s=rates["fp32"], int8_images_per_s=rates["int8"],
                int8_speedup=rates["int8"] / rates["fp32"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="*", choices=sorted(DATA), default=sorted(DATA))
    parser.add_argument("--calibration", type=int, default=128, help="Training pictures to calibrate int8 on.")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    record = dict(date=datetime.now().isoformat(timespec="seconds"), arch=ARCH, rule_points=RULE_POINTS, data={})
    for name in args.data:
        r = record["data"][name] = measure(name, args)
        print(f"{name}: head accuracy int8 {100 * r['int8_accuracy']:.2f}% vs fp32 {100 * r['fp32_accuracy']:.2f}% "
              f"({-r['accuracy_drop_points']:+.2f} points); features {r['int8_images_per_s']:.0f} vs "
              f"{r['fp32_images_per_s']:.0f} images/s ({r['int8_speedup']:.2f}x); cosine mean "
              f"{r['features_cosine_mean']:.4f}", flush=True)
    drops = [r["accuracy_drop_points"] for r in record["data"].values()]
    record["adopt_int8_features"] = bool(drops) and max(drops) <= RULE_POINTS and set(args.data) == set(DATA)
    print(f"int8 features {'meet' if record['adopt_int8_features'] else 'do not meet'} the rule "
          f"(within {RULE_POINTS} points of float32 on {' and '.join(sorted(DATA))})")
    out = HERE / "results" / f"int8-features-{datetime.now():%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
