"""Which offline backbone: EfficientNet-Lite0, 1 or 2 alone, their pooled features concatenated, or one
chosen by cross-validation on the training split, each with the same linear head, side by side.

    python bench/backbones.py                         # pets sample (3 split seeds), elpv, elpv-binary
    python bench/backbones.py --datasets pets --seeds 42

Protocol (issue 13.4), for each dataset and split seed:
1. The split is the one ``imgtune train`` makes with the same options (``imgtune.load_data``): the pets
   sample 50/50 stratified per seed, elpv and elpv-binary imgtune's default 80/20 with seed 42.
2. Pooled ImageNet features of every image for each backbone (``imgtune.imagenet_features``, the
   picture's own view at the backbone's size, cached).
3. One head for every feature set: a linear classifier on standardised features, fitted in closed form
   (ridge regression onto the one-hot labels, solved through the eigenvectors of the training rows' Gram
   matrix, so every L2 weight costs one decomposition), its L2 weight chosen by k-fold
   cross-validation on the training split. (A logistic regression fitted by L-BFGS, bench/mouse.py's,
   needs about 100 fits per split: hours on this shared 2-core machine.)
4. ``auto``: the backbone (and L2 weight) with the best cross-validated accuracy on the training split,
   the choice an ``--arch auto`` would make inside a run; ``concat``: the three backbones' features side
   by side into one head. The validation split is only ever used to score.

Reports validation accuracy and macro recall (the mean of the per-class recalls) per feature set, and
for the pets sample the mean and range over the seeds. Prints a Markdown table and writes
bench/results/backbones-<date>.json. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import datetime
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PETS = HERE.parent.parent / "shared" / "data" / "oxford-pets-sample"
ARCHS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
#: L2 weights tried, as multiples of the mean squared norm of a standardised training row (= the feature count).
L2_GRID = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)

#: Dataset name -> load_data keyword arguments (without the seed), as ``imgtune train`` is given them.
DATASETS = {
    "pets": dict(source=str(PETS), label_re=r"^(.+)_\d+\.jpg$", valid_pct=0.5, stratify=True),
    "elpv": dict(source=None),
    "elpv-binary": dict(source="elpv-binary"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44], help="Split seeds of the pets sample.")
    parser.add_argument("--elpv-seed", type=int, default=42, help="Split seed of elpv and elpv-binary.")
    parser.add_argument("--archs", nargs="+", default=list(ARCHS))
    parser.add_argument("--folds", type=int, default=5, help="Cross-validation folds on the training split.")
    parser.add_argument("--cache-dir", type=Path, default=None, help="Feature cache (default: $IMGTUNE_CACHE).")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args()
    import torch

    started = time.perf_counter()
    record = dict(protocol=__doc__.split("\n\n")[2].strip(), archs=args.archs, folds=args.folds, l2_grid=L2_GRID,
                  runs=[], machine=dict(cpus=os.cpu_count(), torch_threads=torch.get_num_threads(),
                                        processor=platform.processor()),
                  date=datetime.now().isoformat(timespec="seconds"))
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"backbones-{datetime.now():%Y%m%d-%H%M%S}.json"
    for name in args.datasets:
        for seed in args.seeds if name == "pets" else [args.elpv_seed]:
            record["runs"].append(compare(name, seed, archs=args.archs, folds=args.folds, cache_dir=args.cache_dir))
            print_run(record["runs"][-1])
            record.update(summary=summarise(record["runs"]), seconds=time.perf_counter() - started)
            out.write_text(json.dumps(record, indent=2) + "\n")  # after every run: a stopped bench keeps them
    print()
    print(markdown_table(record["summary"], args.archs))
    print(f"results written to {out}")


def compare(name: str, seed: int, *, archs, folds: int, cache_dir=None) -> dict:
    """Every feature set's validation scores on one dataset and split.

    Args:
        name: a key of :data:`DATASETS`.
        seed: the split seed.
        archs: backbone names of imgtune's registry.
        folds: cross-validation folds on the training split.
        cache_dir: the feature cache (default: imgtune's).

    Returns:
        A dict: dataset, seed, sizes, per feature set its validation accuracy, macro recall, the chosen L2
        and cross-validated accuracy, and ``auto``'s choice.
    """
    import imgtune

    options = dict(DATASETS[name])
    data = imgtune.load_data(options.pop("source"), seed=seed, check=False, **options)
    paths = [str(item.path) for item in data.train + data.valid]
    labels = np.array([data.classes.index(item.label) for item in data.train + data.valid])
    n_train = len(data.train)
    features, seconds = {}, {}
    for arch in archs:
        began = time.perf_counter()
        features[arch] = imgtune.imagenet_features(paths, arch=arch, cache_dir=cache_dir, progress=True).numpy()
        seconds[arch] = time.perf_counter() - began
    if len(archs) > 1:
        features["concat"] = np.concatenate([features[a] for a in archs], axis=1)
    fold_of = stratified_folds(labels[:n_train], folds, seed)
    scores = {}
    for key, x in features.items():
        l2, cv = choose_l2(x[:n_train], labels[:n_train], fold_of, len(data.classes))
        predicted = fit_predict(x[:n_train], labels[:n_train], x[n_train:], len(data.classes), l2)
        scores[key] = dict(l2=l2, cv_accuracy=cv, **score(predicted, labels[n_train:], len(data.classes)),
                           features=int(x.shape[1]))
    chosen = max(archs, key=lambda a: scores[a]["cv_accuracy"])
    scores["auto"] = dict(scores[chosen], chosen=chosen)
    return dict(dataset=name, seed=seed, classes=len(data.classes), train=n_train, valid=len(data.valid),
                scores=scores, feature_seconds=seconds)


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """The fold (0..folds-1) of each item: each class's items shuffled and dealt round-robin."""
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(labels), dtype=int)
    offset = 0
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        fold_of[members] = (offset + np.arange(len(members))) % folds
        offset += len(members)  # the next class starts where this one stopped: folds stay even in size
    return fold_of


def choose_l2(x, y, fold_of, n_classes: int) -> tuple[float, float]:
    """The L2 weight of :data:`L2_GRID` with the best k-fold accuracy on (x, y), and that accuracy."""
    correct = np.zeros(len(L2_GRID))
    for fold in np.unique(fold_of):
        held = fold_of == fold
        predicted = ridge_predict(x[~held], y[~held], x[held], n_classes, L2_GRID)
        correct += [(p == y[held]).sum() for p in predicted]
    best = int(np.argmax(correct))  # the first (smallest weight) on a tie
    return L2_GRID[best], float(correct[best] / len(y))


def fit_predict(x_train, y_train, x_test, n_classes: int, l2: float) -> np.ndarray:
    """Class indices predicted for ``x_test`` by the ridge classifier fitted on the training rows."""
    return ridge_predict(x_train, y_train, x_test, n_classes, (l2,))[0]


def ridge_predict(x_train, y_train, x_test, n_classes: int, l2s) -> list[np.ndarray]:
    """Ridge regression of the centred one-hot labels on the standardised features, for each L2
    weight in ``l2s`` (times the feature count), in the dual: one eigendecomposition of the training
    rows' Gram matrix serves every weight. Returns the predicted class indices of ``x_test`` per weight."""
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-6
    a, b = (x_train - mean) / std, (x_test - mean) / std
    targets = np.eye(n_classes)[y_train]
    targets -= targets.mean(axis=0)
    values, vectors = np.linalg.eigh(a @ a.T)
    projected = vectors.T @ targets
    cross = b @ a.T
    return [(cross @ (vectors @ (projected / (values + l2 * a.shape[1])[:, None]))).argmax(1) for l2 in l2s]


def score(predicted: np.ndarray, truth: np.ndarray, n_classes: int) -> dict:
    """Accuracy, macro recall (classes absent from ``truth`` left out) and the per-class recalls."""
    recalls = [float((predicted[truth == c] == c).mean()) for c in range(n_classes) if (truth == c).any()]
    return dict(accuracy=float((predicted == truth).mean()), macro_recall=float(np.mean(recalls)),
                recalls=recalls if n_classes <= 10 else None)


def summarise(runs: list[dict]) -> list[dict]:
    """Per dataset and feature set: mean, min and max over the seeds of accuracy and macro recall."""
    rows = []
    for name in dict.fromkeys(r["dataset"] for r in runs):
        mine = [r for r in runs if r["dataset"] == name]
        for key in mine[0]["scores"]:
            accuracy = [r["scores"][key]["accuracy"] for r in mine]
            recall = [r["scores"][key]["macro_recall"] for r in mine]
            rows.append(dict(dataset=name, features=key, seeds=[r["seed"] for r in mine],
                             accuracy=dict(mean=float(np.mean(accuracy)), min=min(accuracy), max=max(accuracy)),
                             macro_recall=dict(mean=float(np.mean(recall)), min=min(recall), max=max(recall)),
                             chosen=[r["scores"][key].get("chosen") for r in mine] if key == "auto" else None))
    return rows


def _cell(stats: dict, percent: bool) -> str:
    scale, unit = (100, "%") if percent else (1, "")
    fmt = ".1f" if percent else ".3f"
    text = f"{scale * stats['mean']:{fmt}}{unit}"
    if stats["max"] > stats["min"]:
        text += f" ({scale * stats['min']:{fmt}}-{scale * stats['max']:{fmt}})"
    return text


def markdown_table(summary: list[dict], archs) -> str:
    """One row per dataset, one column per feature set: accuracy (range over seeds) / macro recall."""
    keys = list(dict.fromkeys(row["features"] for row in summary))
    lines = ["| dataset | " + " | ".join(k.replace("efficientnet_", "") for k in keys) + " |",
             "|---" * (len(keys) + 1) + "|"]
    for name in dict.fromkeys(row["dataset"] for row in summary):
        rows = {row["features"]: row for row in summary if row["dataset"] == name}
        seeds = rows[keys[0]]["seeds"]
        label = f"{name} (seed{'s' if len(seeds) > 1 else ''} {','.join(map(str, seeds))})"
        cells = [f"{_cell(rows[k]['accuracy'], True)} / {_cell(rows[k]['macro_recall'], False)}" for k in keys]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    auto = [row for row in summary if row["features"] == "auto"]
    for row in auto:
        lines.append(f"\nauto chose on {row['dataset']}: "
                     + ", ".join(f"seed {s}: {c.replace('efficientnet_', '')}" for s, c in zip(row["seeds"],
                                                                                                row["chosen"])))
    return "\n".join(lines)


def print_run(run: dict) -> None:
    print(f"\n{run['dataset']} seed {run['seed']}: {run['classes']} classes, {run['train']} train, "
          f"{run['valid']} valid")
    for key, s in run["scores"].items():
        extra = f" -> {s['chosen']}" if "chosen" in s else ""
        print(f"  {key:<20} valid acc {100 * s['accuracy']:5.1f}%  macro recall {s['macro_recall']:.3f}  "
              f"cv acc {100 * s['cv_accuracy']:5.1f}%  l2 {s['l2']:g}{extra}", flush=True)


if __name__ == "__main__":
    main()
