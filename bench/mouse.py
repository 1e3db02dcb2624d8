"""The Balabit Mouse Dynamics Challenge with imgtune: mouse sessions drawn as pictures, classified
by an ImageNet-pretrained network, against hand-made movement features and a logistic regression.

    python bench/mouse.py              # the whole protocol (about 15-25 min on 2 CPU cores)
    python bench/mouse.py --subset 2   # 2 training sessions per user, ~120 test sessions: a quick check
    python bench/mouse.py --figure docs/mouse-window.png   # the README's example picture

Protocol (../shared/data/mouse-dynamics, see its README):
1. `training_files/userN/*` are drawn as windows (imgtune.sequences.render; 256 events, half overlapping) and
   labelled with the user. One whole session of each user is held out (imgtune's group split).
2. imgtune trains EfficientNet-Lite0 (offline ImageNet weights) on the rest through
   `imgtune.train.run.train`: 20 epochs of the head on cached features of the frozen body, then 2 epochs
   of the whole network, at 128 px (the ImageNet size of 224 px costs 3.5x the time on a CPU).
3. Identification: window-level and session-level (mean log-probability of a session's windows)
   accuracy among the 10 users on the held-out sessions.
4. The challenge: every test session in `public_labels.csv` (816) is scored 1 - p(account owner),
   p from the session's windows as in 3; the ROC AUC against `is_illegal` over all of them.
5. Baseline, same windows and split: 40 movement features per window (speed, acceleration,
   curvature, direction, pauses, clicks) and a multinomial logistic regression; scored the same way.

Prints a table and writes bench/results/mouse-<date>.json. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "mouse-dynamics"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--subset", type=int, default=None,
                        help="Only this many training sessions per user, and 3x as many legal and illegal test "
                        "sessions per user (a quick check).")
    parser.add_argument("--size", type=int, default=128, help="Image side in pixels (rendered and trained).")
    parser.add_argument("--window", type=int, default=256, help="Events per window.")
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--freeze-epochs", type=int, default=20, help="Epochs training the head (body frozen).")
    parser.add_argument("--epochs", type=int, default=2, help="Epochs with the whole network unfrozen after that.")
    parser.add_argument("--lr", type=float, default=3e-3,
                        help="Learning rate of the head (the body's: lr/200..lr/2); 0: the lr finder's.")
    parser.add_argument("--augment", action="store_true", help="Augment training windows (off: flips change meaning).")
    parser.add_argument("--arch", default="efficientnet_lite0")
    parser.add_argument("--workers", type=int, default=None, help="Rendering processes.")
    parser.add_argument("--figure", type=Path, default=None,
                        help="Only draw the example picture (two windows of two users) to this PNG and stop.")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="Keep the windows and the run here (a new or empty folder) instead of a temporary one.")
    args = parser.parse_args()
    if not (args.data / "public_labels.csv").is_file():
        raise SystemExit(f"{args.data}: the Balabit data (training_files/, test_files/, public_labels.csv)"
                         " is not there")
    if args.figure:
        return example_figure(args.data / "training_files", args.figure, size=160)

    with tempfile.TemporaryDirectory(prefix="imgtune-mouse-") as tmp:
        work = args.workdir or Path(tmp)
        os.environ["IMGTUNE_CACHE"] = str(work / "cache")  # this run's caches go with its windows
        record = run(args, work)
    print_table(record)
    out = HERE / "results" / f"mouse-{'subset-' if args.subset else ''}{datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"results written to {out}")


def run(args, tmp: Path) -> dict:
    from imgtune.train.run import train

    windows = render_windows(args.data, tmp, subset=args.subset, size=args.size, window=args.window,
                             overlap=args.overlap, workers=args.workers)
    seconds = {"render": windows.seconds}
    started = time.perf_counter()
    result = train(str(tmp / "train"), csv_path=windows.rendered["train"].manifest, arch=args.arch, size=args.size,
                   epochs=args.epochs, freeze_epochs=args.freeze_epochs, lr=args.lr or None, augment=args.augment,
                   valid_pct=0.2, out=tmp / "run", report=False, progress=False)
    seconds["train"] = time.perf_counter() - started
    phases = ", ".join(f"{k} {v:.0f}s" for k, v in result.metrics["seconds"].items())
    print(f"trained in {seconds['train']:.0f}s ({phases}), held-out window accuracy "
          f"{100 * result.metrics['valid_accuracy']:.1f}%")
    started = time.perf_counter()
    scored = score_run(tmp / "run", windows)
    seconds["predict"] = time.perf_counter() - started
    manifest, train_files, valid_files, test_files = (scored.pop(k) for k in ("manifest", "train_files",
                                                                              "valid_files", "test_files"))
    illegal, classes = windows.illegal, result.learner.classes

    started = time.perf_counter()
    features = window_features_of(train_files + valid_files + test_files, manifest, args.data)
    model = LogisticRegression().fit(features[: len(train_files)], [manifest[f]["label"] for f in train_files], classes)
    baseline_probs = model.predict_proba(features[len(train_files):])
    seconds["baseline"] = time.perf_counter() - started
    baseline_scores = evaluate(baseline_probs[: len(valid_files)], baseline_probs[len(valid_files):], valid_files,
                               test_files, manifest, classes, illegal)

    m = result.metrics
    return dict(
        protocol="Balabit Mouse Dynamics Challenge: identification on held-out training sessions, "
                 "ROC AUC of 1 - p(account owner) over the public_labels test sessions",
        subset=args.subset,
        windows=dict(size=args.size, events=args.window, overlap=args.overlap, train=len(train_files),
                     valid=len(valid_files), test=len(test_files)),
        sessions=session_counts(manifest, train_files, valid_files, test_files, illegal),
        imgtune=dict(scored, arch=args.arch, freeze_epochs=args.freeze_epochs, epochs=args.epochs,
                     augment=args.augment, lr=m["lr"]["frozen"], run_valid_accuracy=m["valid_accuracy"],
                     history=m["history"], train_seconds=m["seconds"]),
        baseline=dict(baseline_scores, model="40 movement features per window, multinomial logistic regression"),
        seconds=dict(seconds, total=sum(seconds.values())),
        machine=dict(cpus=os.cpu_count(), torch_threads=torch.get_num_threads(), processor=platform.processor()),
        date=datetime.now().isoformat(timespec="seconds"), versions=m["versions"],
    )


@dataclass
class Windows:
    """The rendered windows of the protocol's step 1: ``rendered["train"|"test"]`` (each with its
    ``manifest`` CSV), the public labels (session file name -> is_illegal) and the seconds it took."""

    rendered: dict
    illegal: dict[str, int]
    seconds: float


def render_windows(data: Path, work: Path, *, subset: int | None = None, size: int = 128, window: int = 256,
                   overlap: float = 0.5, workers: int | None = None) -> Windows:
    """Draw the training sessions and the labelled test sessions as windows into ``work/train`` and
    ``work/test`` (step 1 of the protocol).

    Args:
        data: the Balabit folder (training_files/, test_files/, public_labels.csv).
        work: a new or empty folder.
        subset: only this many training sessions per user, and 3x as many legal and illegal test sessions.
        size, window, overlap, workers: see :func:`imgtune.sequences.render.render_sessions`.

    Returns:
        A :class:`Windows`.
    """
    from imgtune.sequences.render import find_sessions, render_sessions

    started = time.perf_counter()
    train_sessions = find_sessions(data / "training_files")
    if subset:
        train_sessions = _per_label(train_sessions, subset)
    illegal = _public_labels(data / "public_labels.csv")
    test_sessions = [s for s in find_sessions(data / "test_files") if s.path.name in illegal]
    if subset:
        test_sessions = _per_label(test_sessions, 3 * subset, key=lambda s: illegal[s.path.name])
    options = dict(size=size, window=window, overlap=overlap, workers=workers)
    rendered = {name: render_sessions(sessions, work / name, **options)
                for name, sessions in (("train", train_sessions), ("test", test_sessions))}
    seconds = time.perf_counter() - started
    print(f"rendered {rendered['train'].images} training windows ({len(train_sessions)} sessions), "
          f"{rendered['test'].images} test windows ({len(test_sessions)} sessions) in {seconds:.0f}s")
    return Windows(rendered, illegal, seconds)


def score_run(run_dir: Path, windows: Windows) -> dict:
    """Steps 3 and 4 for a run trained on ``windows``: the run's bundle predicts its held-out windows
    and the test windows.

    Args:
        run_dir: a finished run folder (bundle and split.csv) trained on ``windows.rendered["train"]``.
        windows: what :func:`render_windows` drew.

    Returns:
        :func:`evaluate`'s scores, plus ``manifest`` (window file -> its manifest row) and the window
        files of each side: ``train_files``, ``valid_files``, ``test_files``.
    """
    from imgtune.deploy.predict import load_predictor

    manifest = {**_manifest_rows(windows.rendered["train"].manifest),
                **_manifest_rows(windows.rendered["test"].manifest)}
    split = _read_split(run_dir / "split.csv")
    valid_files = [f for f, side in split.items() if side == "valid"]
    train_files = [f for f, side in split.items() if side == "train"]
    test_files = list(_manifest_rows(windows.rendered["test"].manifest))
    predictor = load_predictor(run_dir, backend="torch")
    probs = _predict(predictor, valid_files + test_files)
    scores = evaluate(probs[: len(valid_files)], probs[len(valid_files):], valid_files, test_files, manifest,
                      predictor.classes, windows.illegal)
    return dict(scores, manifest=manifest, train_files=train_files, valid_files=valid_files, test_files=test_files)


def session_counts(manifest, train_files, valid_files, test_files, illegal) -> dict:
    """Sessions on each side, and the illegal ones among the test sessions."""
    test_groups = {manifest[f]["group"] for f in test_files}
    return dict(train=len({manifest[f]["group"] for f in train_files}),
                valid=len({manifest[f]["group"] for f in valid_files}), test=len(test_groups),
                test_illegal=int(sum(illegal[Path(g).name] for g in test_groups)))


def _per_label(sessions, n: int, key=lambda s: s.label):
    kept, seen = [], {}
    for s in sessions:
        k = (s.label, key(s))
        if seen.get(k, 0) < n:
            kept.append(s)
            seen[k] = seen.get(k, 0) + 1
    return kept


def _public_labels(path: Path) -> dict[str, int]:
    with open(path, newline="") as handle:
        return {row["filename"]: int(row["is_illegal"]) for row in csv.DictReader(handle)}


def _manifest_rows(path: Path) -> dict[str, dict]:
    with open(path, newline="") as handle:
        return {str((path.parent / row["file"]).resolve()): row for row in csv.DictReader(handle)}


def _read_split(path: Path) -> dict[str, str]:
    with open(path, newline="") as handle:
        return {row["file"]: row["split"] for row in csv.DictReader(handle)}


def _predict(predictor, files: list[str]) -> np.ndarray:
    probs = []
    for path, prediction, error in predictor.predict_files(files, bs=64):
        if error is not None:
            raise SystemExit(f"{path}: {error}")
        probs.append(prediction.probs[0])
    return np.stack(probs)


# --- metrics ----------------------------------------------------------------------------------


def evaluate(valid_probs, test_probs, valid_files, test_files, manifest, classes, illegal) -> dict:
    """Window and session accuracy on the held-out sessions; the challenge's AUC on the test sessions."""
    from imgtune.sequences.groups import aggregate_windows

    index = {c: i for i, c in enumerate(classes)}
    valid_labels = np.array([index[manifest[f]["label"]] for f in valid_files])
    sessions = aggregate_windows(valid_probs, [manifest[f]["group"] for f in valid_files], classes)
    label_of = {manifest[f]["group"]: manifest[f]["label"] for f in valid_files}
    session_labels = np.array([index[label_of[g]] for g in sessions.groups])
    test = aggregate_windows(test_probs, [manifest[f]["group"] for f in test_files], classes)
    owner = {manifest[f]["group"]: manifest[f]["label"] for f in test_files}
    score = 1 - test.prob_of([owner[g] for g in test.groups])
    truth = np.array([illegal[Path(g).name] for g in test.groups])
    per_user = []  # users with both legal and illegal test sessions
    for user in classes:
        mask = np.array([owner[g] == user for g in test.groups])
        if 0 < truth[mask].sum() < mask.sum():
            per_user.append(roc_auc(score[mask], truth[mask]))
    return dict(
        window_accuracy=float((valid_probs.argmax(1) == valid_labels).mean()),
        session_accuracy=float((sessions.probs.argmax(1) == session_labels).mean()),
        auc=roc_auc(score, truth),
        auc_mean_per_user=float(np.mean(per_user)) if per_user else None,
    )


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """The area under the ROC curve: the chance that a random positive outscores a random negative
    (ties count half), from the ranks (Mann-Whitney U)."""
    scores, positive = np.asarray(scores, float), np.asarray(positive).astype(bool)
    values, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2  # 1-based, ties share their mean rank
    ranks = average_rank[inverse]
    n_pos, n_neg = positive.sum(), (~positive).sum()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# --- the baseline -----------------------------------------------------------------------------


def window_features_of(files, manifest, data: Path) -> np.ndarray:
    """Movement features of each window file's events (sessions read once each)."""
    from imgtune.sequences.mouse import read_mouse_session

    sessions, rows = {}, []
    for f in files:
        row = manifest[f]
        split = "training_files" if (data / "training_files" / row["group"]).is_file() else "test_files"
        if row["group"] not in sessions:
            sessions[row["group"]] = read_mouse_session(data / split / row["group"])
        rows.append(window_features(sessions[row["group"]].slice(int(row["start"]), int(row["end"]))))
    return np.stack(rows)


def window_features(events) -> np.ndarray:
    """40 numbers: speed (5), acceleration (3), curvature and straightness (5), extent (3), direction
    histogram (8), pauses and timing (6), clicks, drags and scrolls (5), duration and rate (2), 3 spare
    shape moments."""
    from imgtune.sequences.mouse import BUTTONS, STATES, speed_acceleration

    t, xy = events.t, events.xy.astype(float)
    speed, accel = speed_acceleration(t, xy)
    log_speed, log_accel = np.log1p(speed), np.log1p(accel)
    step = np.diff(xy, axis=0)
    length = np.hypot(*step.T)
    moving = length > 0
    angle = np.arctan2(step[moving, 1], step[moving, 0])
    turn = np.angle(np.exp(1j * np.diff(angle))) if len(angle) > 1 else np.zeros(1)
    curvature = np.abs(turn) / np.maximum(length[moving][1:], 1.0) if len(angle) > 1 else np.zeros(1)
    path = length.sum()
    directions = np.histogram(angle, bins=8, range=(-np.pi, np.pi), weights=length[moving])[0] / max(path, 1e-9)
    dt = np.diff(t)
    pauses = dt > 0.5
    duration = max(float(t[-1] - t[0]), 1e-3)
    extent = xy.max(axis=0) - xy.min(axis=0)
    pressed = events.state == STATES["Pressed"]
    centred = (xy - xy.mean(axis=0)) / max(float(extent.max()), 1.0)
    n = len(t)
    return np.array([
        log_speed.mean(), log_speed.std(), np.median(log_speed), np.percentile(log_speed, 90), log_speed.max(),
        log_accel.mean(), log_accel.std(), np.percentile(log_accel, 90),
        np.abs(turn).mean(), turn.std(), (np.abs(turn) > np.pi / 2).mean(), np.log1p(np.median(curvature)),
        np.hypot(*(xy[-1] - xy[0])) / max(path, 1e-9),
        np.log1p(path), np.log1p(extent[0]), np.log1p(extent[1]),
        *directions,
        pauses.mean(), np.log1p(dt[pauses]).sum() / duration, np.log1p(1000 * dt).mean(),
        np.log1p(1000 * np.percentile(dt, 90)), np.log1p(1000 * np.median(dt)), dt[pauses].sum() / duration,
        (pressed & (events.button == BUTTONS["Left"])).sum() / n,
        (pressed & (events.button == BUTTONS["Right"])).sum() / n,
        (events.state == STATES["Drag"]).mean(), (events.button == BUTTONS["Scroll"]).mean(),
        (events.state == STATES["Up"]).sum() / max((events.button == BUTTONS["Scroll"]).sum(), 1),
        np.log1p(duration), np.log1p(n / duration),
        (centred[:, 0] ** 2).mean(), (centred[:, 1] ** 2).mean(), (centred[:, 0] * centred[:, 1]).mean(),
    ])


class LogisticRegression:
    """Multinomial logistic regression on standardised features, L2-regularised, fitted by L-BFGS."""

    def __init__(self, l2: float = 1e-3, max_iter: int = 300):
        self.l2, self.max_iter = l2, max_iter

    def fit(self, x: np.ndarray, labels, classes) -> "LogisticRegression":
        self.classes = list(classes)
        self.mean, self.std = x.mean(axis=0), x.std(axis=0) + 1e-9
        inputs = torch.tensor((x - self.mean) / self.std, dtype=torch.float64)
        targets = torch.tensor([self.classes.index(label) for label in labels])
        self.linear = torch.nn.Linear(x.shape[1], len(self.classes)).double()
        optimizer = torch.optim.LBFGS(self.linear.parameters(), max_iter=self.max_iter, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(self.linear(inputs), targets)
            loss = loss + self.l2 * self.linear.weight.square().sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        return self

    @torch.no_grad()
    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        inputs = torch.tensor((x - self.mean) / self.std, dtype=torch.float64)
        return self.linear(inputs).softmax(1).numpy()


def example_figure(root: Path, path: Path, *, size: int, users=("user7", "user35"), windows=(20, 60)) -> None:
    """Two windows of each of two users side by side, as imgtune render draws them."""
    from PIL import Image

    from imgtune.sequences.mouse import draw_mouse_window, read_mouse_session
    from imgtune.sequences.render import find_sessions
    from imgtune.sequences.windows import window_bounds

    gap = 4
    figure = Image.new("RGB", (len(users) * len(windows) * (size + gap) - gap, size), (48, 48, 48))
    for u, user in enumerate(users):
        events = read_mouse_session(next(s for s in find_sessions(root) if s.label == user).path)
        bounds = window_bounds(events.t)
        for w, index in enumerate(windows):
            picture = Image.fromarray(draw_mouse_window(events.slice(*bounds[index]), size))
            figure.paste(picture, ((u * len(windows) + w) * (size + gap), 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.save(path, optimize=True)
    print(f"{path}: windows {list(windows)} of the first session of {' and '.join(users)}, {size} px")


def print_table(record: dict) -> None:
    w, s = record["windows"], record["sessions"]
    print(f"\nBalabit mouse dynamics: {s['train']} training sessions ({w['train']} windows), {s['valid']} held out"
          f" ({w['valid']} windows), {s['test']} test sessions ({s['test_illegal']} illegal, {w['test']} windows);"
          f" windows of {w['events']} events drawn at {w['size']} px")
    print(f"{'method':<44} {'window acc':>10} {'session acc':>11} {'test AUC':>9} {'AUC/user':>9}")
    for name, key in ((f"imgtune {record['imgtune']['arch']} (head only)" if not record["imgtune"]["epochs"]
                       else f"imgtune {record['imgtune']['arch']}", "imgtune"),
                      ("baseline: movement features + logistic reg.", "baseline")):
        r = record[key]
        per_user = f"{r['auc_mean_per_user']:.3f}" if r["auc_mean_per_user"] is not None else "-"
        print(f"{name:<44} {100 * r['window_accuracy']:>9.1f}% {100 * r['session_accuracy']:>10.1f}% "
              f"{r['auc']:>9.3f} {per_user:>9}")
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in record["seconds"].items()))


if __name__ == "__main__":
    main()
