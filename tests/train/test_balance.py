"""--balance: the loss weights (full, mild by default, none), on pictures and on cached features; balance and tta
recorded in the run folder."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import COLOURS, TINY, make_class_folders
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from imgtune import ImgtuneError, Learner
from imgtune.train.balance import MILD, balance_power, class_weights, dataset_targets, loss_function
from imgtune.train.features import head_on_features
from imgtune.train.run import train

#: Images per class (2 of each validate).
IMBALANCED = {"red": 8, "green": 5, "blue": 3}


def test_the_weights_are_inverse_frequencies_whose_mean_over_the_items_is_one():
    targets = [0] * 6 + [1] * 2 + [2]  # N = 9, K = 3 classes: w_c = 9 / (3 n_c)
    weights = class_weights(targets, 3)
    assert weights.tolist() == pytest.approx([0.5, 1.5, 3.0])
    assert weights[torch.tensor(targets)].mean().item() == pytest.approx(1.0)
    # A class without training images gets 0, and the others share the mean of 1 (K = 2).
    assert class_weights([0, 0, 2], 3).tolist() == pytest.approx([0.75, 0.0, 1.5])
    assert class_weights([1, 0, 1, 0], 2).tolist() == pytest.approx([1.0, 1.0])  # balanced data: plain loss


def test_a_power_below_one_flattens_the_weights_and_keeps_their_mean_at_one():
    targets = [0] * 6 + [1] * 2 + [2]
    mild = class_weights(targets, 3, 0.25)
    full = torch.tensor([0.5, 1.5, 3.0])
    assert (mild / mild[0]).tolist() == pytest.approx((full / full[0]).pow(0.25).tolist())
    assert mild[torch.tensor(targets)].mean().item() == pytest.approx(1.0)
    assert mild[0] < 1 < mild[1] < mild[2] < 3.0 / 2  # the order of the full weights, much closer together
    assert class_weights(targets, 3, 0.0).tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert class_weights([0, 0, 2], 3, 0.5)[1] == 0  # still nothing for a class without training images


def test_balance_names_and_powers():
    assert [balance_power(v) for v in (True, False, None, "full", "mild", "none", 0.5, 1)] == \
        [1.0, 0.0, 0.0, 1.0, MILD, 0.0, 0.5, 1.0]
    for bad in (1.5, -0.1, "half"):
        with pytest.raises(ImgtuneError, match="balance must be true, false, a power from 0 to 1"):
            balance_power(bad)
    balanced = TensorDataset(torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]))
    assert loss_function(balanced, 2, balance="mild").weight is None  # balanced classes: plain cross-entropy
    assert loss_function(balanced, 2, balance=True).weight is None
    assert loss_function(TensorDataset(torch.zeros(3, 2), torch.tensor([0, 0, 1])), 2, balance="mild").weight is not None


def test_weights_refuse_no_targets_and_targets_outside_the_classes():
    with pytest.raises(ImgtuneError, match="empty"):
        class_weights([], 3)
    with pytest.raises(ImgtuneError, match="outside 0..1"):
        class_weights([0, 2], 2)
    with pytest.raises(ImgtuneError, match="cannot read the class of each training item from a list"):
        dataset_targets([1, 2])


@pytest.fixture
def imbalanced(tmp_path):
    """Colour folders of 8 red, 5 green and 3 blue images: 2 of each validate, 6, 3 and 1 train."""
    from imgtune.data.loaders import ImageData
    from imgtune.data.sources import Item

    for name, n in IMBALANCED.items():
        make_class_folders(tmp_path / "colours", n=n, colours={name: COLOURS[name]})
    items = [Item(path, path.parent.name) for path in sorted((tmp_path / "colours").rglob("*.png"))]
    valid = [item for name in IMBALANCED for item in [i for i in items if i.label == name][:2]]
    return ImageData(classes=sorted(IMBALANCED), train=[item for item in items if item not in valid], valid=valid,
                     description="imbalanced colours")


def test_balance_weighs_the_loss_by_the_training_split_alone(imbalanced):
    learner = Learner.from_data(imbalanced, **TINY, balance=True)
    counts = {c: sum(item.label == c for item in imbalanced.train) for c in learner.classes}
    n, k = sum(counts.values()), len(counts)
    assert learner.loss_func.weight.tolist() == pytest.approx([n / (k * counts[c]) for c in learner.classes])
    assert learner.config.balance == 1.0 and dict(learner.config)["balance"] == 1.0
    plain = Learner.from_data(imbalanced, **TINY, balance=False)
    assert plain.loss_func.weight is None and "balance" not in dict(plain.config)
    mild = Learner.from_data(imbalanced, **TINY)  # the default
    assert mild.loss_func.weight.tolist() == pytest.approx(class_weights([learner.classes.index(item.label)
                                                                          for item in imbalanced.train], 3, MILD).tolist())
    assert dict(mild.config)["balance"] == MILD


def test_the_head_on_cached_features_trains_with_the_weighted_loss(imbalanced):
    learner = Learner.from_data(imbalanced, **TINY, balance=True)
    with head_on_features(learner):
        xb, yb = next(iter(learner.train_dl))
        assert xb.dim() == 2  # features, not pictures
        learner.train_mode()
        torch.manual_seed(0)
        with torch.no_grad():
            logits = learner.model(xb)
        torch.manual_seed(0)  # the same dropout for the step
        (loss, _), = learner.train_step([(xb, yb)], 1, [0.0] * len(learner.groups))
    weighted = nn.functional.cross_entropy(logits, yb, weight=learner.loss_func.weight)
    assert loss == pytest.approx(weighted.item(), rel=1e-5)
    assert loss != pytest.approx(nn.functional.cross_entropy(logits, yb).item(), rel=1e-3)


def test_a_learner_built_by_hand_reads_the_targets_of_a_tensor_dataset():
    model = nn.Linear(4, 2)
    dl = DataLoader(TensorDataset(torch.randn(4, 4), torch.tensor([0, 0, 0, 1])), batch_size=2)
    learner = Learner(model, dl, dl, classes="ab", device="cpu", balance=True)
    assert learner.loss_func.weight.tolist() == pytest.approx([4 / 6, 2.0])


def test_balance_and_tta_are_recorded_in_model_json_metrics_and_summary(imbalanced, tmp_path):
    result = train(imbalanced, **dict(TINY, epochs=0, freeze_epochs=1, lr=1e-2), balance=True, tta=True,
                   out=tmp_path / "run", report=False)
    meta = json.loads((result.run_dir / "model.json").read_text())
    assert meta["tta"] == "flip" and meta["training"]["balance"] == 1.0 and meta["training"]["tta"] == "flip"
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics["balance"] == 1.0 and metrics["tta"] == "flip"
    rows = {row["class"]: row for row in metrics["per_class"]}
    assert set(rows) == set(IMBALANCED) and all(row["support"] == 2 for row in rows.values())
    assert metrics["balanced_accuracy"] == pytest.approx(sum(r["recall"] for r in rows.values()) / 3)
    assert metrics["macro_f1"] == pytest.approx(sum(r["f1"] for r in rows.values()) / 3)
    assert metrics["history"][-1]["balanced_accuracy"] == pytest.approx(metrics["balanced_accuracy"])
    assert meta["metrics"]["balanced_accuracy"] == metrics["balanced_accuracy"]
    summary = (result.run_dir / "summary.txt").read_text()
    assert "loss: cross-entropy weighted by inverse class frequency (balance)" in summary
    assert "validation with test-time augmentation: flip" in summary
    assert f"balanced accuracy {100 * metrics['balanced_accuracy']:.2f}%" in summary
    assert f"macro F1 {metrics['macro_f1']:.3f}" in summary
    for name, row in rows.items():
        assert f"{name:<5}  {row['precision']:>9.3f}  {row['recall']:>6.3f}" in summary


def test_a_default_run_weighs_mildly_and_records_no_tta(imbalanced, tmp_path):
    result = train(imbalanced, **dict(TINY, epochs=0, freeze_epochs=1, lr=1e-2), out=tmp_path / "run", report=False)
    meta = json.loads((result.run_dir / "model.json").read_text())
    assert meta["tta"] == "none" and meta["training"]["balance"] == MILD and "tta" not in meta["training"]
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics["balance"] == MILD and metrics["tta"] == "none" and "balanced_accuracy" in metrics
    summary = (result.run_dir / "summary.txt").read_text()
    assert "loss: cross-entropy weighted by inverse class frequency to the power 0.25" in summary
    assert "test-time augmentation" not in summary
    assert f"balanced accuracy {100 * metrics['balanced_accuracy']:.2f}%" in summary


def test_the_command_line_passes_balance_and_tta(imbalanced, tmp_path):
    from imgtune.cli import cli
    from imgtune.train.run import split_csv

    (tmp_path / "split.csv").write_text(split_csv(imbalanced))
    out = tmp_path / "run"
    args = ["train", "--csv", str(tmp_path / "split.csv"), "--arch", "test_efficientnet", "--weights", "none",
            "--size", "32", "--bs", "6", "--num-workers", "0", "--device", "cpu", "--epochs", "0",
            "--freeze-epochs", "1", "--lr", "1e-2", "--no-report", "--balance", "--tta", "--out", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "model.json").read_text())
    assert meta["tta"] == "flip" and meta["training"]["balance"] == 1.0
    assert "balanced accuracy" in result.stdout
    args = [arg for arg in args if arg not in ("--balance", "--tta")] + ["--no-balance", "--overwrite"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "balance" not in json.loads((out / "model.json").read_text())["training"]
