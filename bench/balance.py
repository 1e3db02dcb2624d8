"""Class balance and test-time augmentation, measured side by side on the default head-only path.

    IMGTUNE_CACHE=/tmp/me/cache python bench/balance.py elpv elpv-binary pets

For each dataset one Learner per way of balancing (``none``: ``balance=False``; ``mild``: the default, the
class-weighted loss to the power 0.25; ``loss``: ``balance=True``, the full class-weighted loss; ``sampler``: a ``WeightedRandomSampler`` drawing every class equally often, the
alternative it was measured against, built here only) trains the head on cached features with
``fine_tune()``'s defaults (lr finder, automatic epochs; head only: ``tune_stages=0``), seed 42, and is evaluated on
the validation split as it is and with test-time augmentation (the mean probabilities of picture and
mirror: the head is the same, only the evaluation differs). Prints one line per (dataset, balance, tta)
with accuracy, balanced accuracy (macro recall), macro F1 and each class's recall, and writes them as
JSON to bench/results/balance-<date>.json. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime
from pathlib import Path

import torch
from torch.utils.data import DataLoader, WeightedRandomSampler

from imgtune import load_data
from imgtune.train import evaluate
from imgtune.train.balance import dataset_targets
from imgtune.train.features import FeatureSource
from imgtune.train.learner import Learner

HERE = Path(__file__).resolve().parent
PETS = HERE.parent.parent / "shared" / "data" / "oxford-pets-sample"
DATASETS = {
    "elpv": dict(source="elpv"),
    "elpv-binary": dict(source="elpv-binary"),
    "pets": dict(source=str(PETS), label_re=r"^(.+)_\d+\.jpg$", valid_pct=0.5, stratify=True),
}


class SampledFeatures(FeatureSource):
    """Cached features whose training loader draws each class equally often (with replacement)."""

    def loaders(self, model, device, progress=None, precision="auto", tta=False):
        train_dl, valid_dl = super().loaders(model, device, progress, precision, tta=tta)
        targets = torch.as_tensor(dataset_targets(train_dl.dataset))
        weights = (1.0 / torch.bincount(targets).double())[targets]
        sampler = WeightedRandomSampler(weights, len(targets), replacement=True,
                                        generator=torch.Generator().manual_seed(self.seed))
        return DataLoader(train_dl.dataset, batch_size=train_dl.batch_size, sampler=sampler,
                          drop_last=train_dl.drop_last), valid_dl


def measure(name: str, balance: str, seed: int) -> list[dict]:
    """Train one head and evaluate it without and with TTA."""
    options = dict(DATASETS[name])
    data = load_data(options.pop("source"), seed=seed, **options)
    weights = {"loss": True, "mild": "mild"}.get(balance, False)
    learner = Learner.from_data(data, seed=seed, progress=False, balance=weights, tune_stages=0)
    if balance == "sampler":
        source = learner.features
        learner.features = SampledFeatures(source.train_ds, source.valid_ds, batch_size=source.batch_size,
                                           drop_last=source.drop_last, seed=seed, mean=source.mean, std=source.std,
                                           size=source.size, cache_dir=source.cache_dir, augment=source.augment)
    started = time.perf_counter()
    learner.fine_tune()
    seconds = time.perf_counter() - started
    rows = []
    for tta in (False, True):
        learner.tta = tta
        probs, targets, losses = learner.get_preds()
        report = evaluate.class_report(probs, targets, learner.classes)
        scores = evaluate.metrics(probs, targets, losses)
        rows.append(dict(dataset=name, balance=balance, tta=tta, seed=seed, seconds=seconds,
                         lr=learner.config.lr["frozen"], epochs=learner.plan["freeze_epochs"],
                         accuracy=scores["accuracy"], balanced_accuracy=scores["balanced_accuracy"],
                         macro_f1=scores["macro_f1"], valid_loss=scores["valid_loss"],
                         recall={row["class"]: row["recall"] for row in report[:-1]}))
        print(line(rows[-1]), flush=True)
    return rows


def line(row: dict) -> str:
    recalls = " ".join(f"{c} {r:.3f}" for c, r in row["recall"].items()) if len(row["recall"]) <= 6 else ""
    return (f"{row['dataset']:<11} balance={row['balance']:<7} tta={'flip' if row['tta'] else 'none':<4} "
            f"accuracy {100 * row['accuracy']:.2f}%  balanced {100 * row['balanced_accuracy']:.2f}%  "
            f"macro F1 {row['macro_f1']:.3f}  loss {row['valid_loss']:.4f}  lr {row['lr']:.3g}  {recalls}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("datasets", nargs="*", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--balance", nargs="*", default=["none", "mild", "loss", "sampler"])
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    out = HERE / "results" / f"balance-{datetime.now():%Y%m%d-%H%M%S}.json"
    results = []
    for name in args.datasets:
        for balance in args.balance:
            results += measure(name, balance, args.seed)
            out.parent.mkdir(exist_ok=True)
            out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
