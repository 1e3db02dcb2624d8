"""Partial fine-tuning: the frozen stages' maps cached exactly, the upper stages trained on them, the bundle whole."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY, Crash, CrashAfter

from imgtune import Learner
from imgtune.data.cache import ArrayStore, file_key
from imgtune.data.presize import ImageView
from imgtune.deploy.bundle import load_model, read_meta
from imgtune.errors import ImgtuneError
from imgtune.models import create_model, stage_layout
from imgtune.train import partial
from imgtune.train.activations import (
    LowerBody,
    MapsRunner,
    UpperStages,
    compute_maps,
    lower_fingerprint,
)
from imgtune.train.checkpoint import CHECKPOINT_FILE, ResumeCheckpoint, load_checkpoint
from imgtune.train.defaults import PARTIAL

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return create_model("test_efficientnet", 3, weights="none").eval()


def learner_for(data, tmp_path, **options):
    return Learner.from_data(data, **{**TINY, "cache_dir": tmp_path / "cache", **options})


def body_params(model, names):
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.split(".")[0] in names
            or ".".join(n.split(".")[:2]) in names}


@pytest.mark.parametrize("arch", ["test_efficientnet", "resnet10t"])
def test_the_lower_and_upper_parts_are_the_model(arch):
    torch.manual_seed(0)
    model = create_model(arch, 3, weights="none").eval()
    images = torch.randn(2, 3, 32, 32)
    layout = stage_layout(model)
    for stages in range(1, len(layout.stages) + 1):
        upper = UpperStages(model, stages)
        assert torch.allclose(upper(LowerBody(model, stages)(images)), model(images), atol=1e-6)
        assert upper.classifier is model.get_classifier()  # shared modules: training it trains the model


def test_a_model_without_stages_or_too_many_stages_is_refused(tiny_model):
    vit = create_model("test_vit", 3, weights="none")
    with pytest.raises(ImgtuneError, match="tune_stages=0"):
        LowerBody(vit, 1)
    with pytest.raises(ImgtuneError, match="must be 0 .* to 5, not 6"):
        UpperStages(tiny_model, 6)


def test_cached_maps_are_the_frozen_stages_output(tiny_model, tiny_data, tmp_path):
    paths = [item.path for item in tiny_data.train[:5]]
    view = ImageView(32, "crop", cache_dir=False)
    lower, upper = LowerBody(tiny_model, 2), UpperStages(tiny_model, 2)
    runner = MapsRunner(lower, upper, size=32, fingerprint="f", cache_dir=False, backend="torch")
    store, features_store = ArrayStore(tmp_path / "maps"), ArrayStore(tmp_path / "features")
    calls = []
    features, stats = compute_maps(paths, runner, view, mean=MEAN, std=STD, maps_store=store,
                                   feature_store=features_store, progress=lambda *call: calls.append(call))
    assert stats["computed"] == 5 and calls[0] == (0, 5) and calls[-1] == (5, 5)  # progress bars start at 0
    from imgtune.data.transforms import tensor_transform

    # as the runner and the learner feed them (channels_last: its convolutions round differently)
    images = torch.stack([tensor_transform(MEAN, STD)(view(p)) for p in paths]).to(memory_format=torch.channels_last)
    with torch.no_grad():  # one batch of the pictures and their mirrors, as the runner makes it
        both = lower(torch.cat([images, images.flip(-1)]))
        expected_features = upper.pooled(both)
    for i, path in enumerate(paths):
        cached = store.get(file_key(path))
        assert cached.dtype == np.float16 and cached.shape == (2, *both.shape[1:])
        assert np.array_equal(cached[0], both[i].half().numpy())  # bit for bit, in float16
        assert np.array_equal(cached[1], both[len(paths) + i].half().numpy())
    assert torch.equal(features[:, 0], expected_features[:len(paths)])
    assert np.array_equal(features_store.get(file_key(paths[0])), features[0].numpy())
    again, stats = compute_maps(paths, runner, view, mean=MEAN, std=STD, maps_store=store, feature_store=features_store)
    assert stats["computed"] == 0 and torch.equal(again, features)


def test_onnx_runtime_maps_match_pytorch(tiny_model):
    pytest.importorskip("onnxruntime")
    lower, upper = LowerBody(tiny_model, 2), UpperStages(tiny_model, 2)
    onnx = MapsRunner(lower, upper, size=32, fingerprint="f", cache_dir=False, backend="onnx")
    onnx.session = onnx._session()
    images = torch.randn(4, 3, 32, 32)
    (maps, features), (expected, expected_features) = onnx._onnx(images), onnx._torch(images)
    assert np.abs(maps - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max())
    assert np.abs(features - expected_features).max() <= 1e-5


def test_other_weights_or_size_give_other_maps(tiny_model):
    lower = LowerBody(tiny_model, 2)
    before = lower_fingerprint(lower, MEAN, STD, 32)
    assert lower_fingerprint(lower, MEAN, STD, 64) != before
    with torch.no_grad():
        tiny_model.get_classifier().weight.add_(1.0)
        tiny_model.blocks[4][0].conv_pw.weight.add_(1.0)  # a trained stage: not what the maps depend on
    assert lower_fingerprint(lower, MEAN, STD, 32) == before
    with torch.no_grad():
        tiny_model.conv_stem.weight.add_(1e-3)
    assert lower_fingerprint(LowerBody(tiny_model, 2), MEAN, STD, 32) != before


def test_partial_fine_tuning_trains_the_upper_stages_only(tiny_data, tmp_path):
    learner = learner_for(tiny_data, tmp_path, tune_stages=2)
    layout = stage_layout(learner.model)
    frozen_names = set(layout.stem + layout.stages[:-2])
    trained_names = set(layout.stages[-2:] + layout.tail) | {"classifier"}
    frozen, trained = body_params(learner.model, frozen_names), body_params(learner.model, trained_names)
    buffers = {n: b.clone() for n, b in learner.model.named_buffers()}
    learner.fine_tune(2, 1e-2, freeze_epochs=1)
    assert [h["phase"] for h in learner.history] == ["frozen", "partial", "partial"]
    params = dict(learner.model.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in frozen.items())
    assert all(not torch.equal(params[n], p) for n, p in trained.items() if n.endswith("weight"))
    stats = learner.features.activations.stats
    assert stats["split"] == layout.stages[-3] and stats["tune_stages"] == 2
    assert learner.config.tune_stages == 2 and learner.plan["tune_stages"] == 2
    # weights="none": bn_stats="train", so only the trained stages' statistics may move
    moved = {n.rsplit(".", 2)[0] for n, b in learner.model.named_buffers() if not torch.equal(b, buffers[n])}
    assert not any(name.startswith(tuple(frozen_names)) for name in moved)


def test_the_saved_bundle_gives_the_training_models_logits(tiny_data, tmp_path):
    learner = learner_for(tiny_data, tmp_path, tune_stages=1)
    learner.fine_tune(1, 1e-2, freeze_epochs=1)
    learner.save(tmp_path / "run")
    meta = read_meta(tmp_path / "run")
    assert meta["training"]["tune_stages"] == 1
    model = load_model(tmp_path / "run", meta)
    learner.model.eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = UpperStages(learner.model, 1)(LowerBody(learner.model, 1)(images))
        assert torch.equal(learner.model(images), expected)
        # the same weights; the training model's channels_last layout rounds in the last digits only
        assert torch.allclose(model(images), expected, atol=1e-6)
    saved = model.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in learner.model.state_dict().items())
    # and the validation metrics on cached maps are those of the whole model on the pictures
    on_maps = learner.validate()
    learner.unfreeze()  # the activation path no longer applies: the whole network runs on the images
    assert learner.validate()["accuracy"] == pytest.approx(on_maps["accuracy"])


def test_tune_stages_0_and_auto_on_a_small_dataset_train_the_head_only(tiny_data, tmp_path):
    histories = []
    for tune_stages in (0, "auto"):
        learner = learner_for(tiny_data, tmp_path, tune_stages=tune_stages)
        learner.fine_tune(None, 1e-2, freeze_epochs=2)
        assert learner.body_frozen() and learner.features.activations is None
        assert "tune_stages" not in dict(learner.config)
        histories.append([(h["phase"], h["train_loss"], h["accuracy"]) for h in learner.history])
    assert histories[0] == histories[1] and {phase for phase, *_ in histories[0]} == {"frozen"}


def test_auto_picks_stages_and_epochs_within_the_budget(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setitem(PARTIAL, "min_images_per_class", 1)
    learner = learner_for(tiny_data, tmp_path, tune_stages="auto")
    plan = learner.features.partial_plan(learner.model, learner.device)
    assert 1 <= plan.tune_stages <= PARTIAL["max_stages"]
    assert PARTIAL["min_epochs"] <= plan.epochs <= PARTIAL["max_epochs"] and plan.epoch_seconds > 0
    assert learner.auto_unfrozen_epochs() == plan.epochs
    monkeypatch.setitem(PARTIAL, "budget_seconds", 0.0)  # nothing fits: the head only
    assert learner_for(tiny_data, tmp_path).features.partial_plan(learner.model, learner.device) is None
    monkeypatch.setitem(PARTIAL, "min_images_per_class", 10**6)
    plan, why = partial.choose(learner.model, learner.features, torch.device("cpu"), "auto")
    assert plan is None and "training images per class" in why
    assert partial.choose(learner.model, learner.features, torch.device("cuda"), 2)[0] is None  # GPU: usual path


def test_a_partial_run_resumed_after_any_epoch_ends_with_the_same_weights(tiny_data, tmp_path):
    plan = dict(epochs=2, base_lr=1e-2, freeze_epochs=2)

    def run(folder, *extra):
        learner = learner_for(tiny_data, tmp_path, tune_stages=2)
        learner.callbacks += [ResumeCheckpoint(folder / CHECKPOINT_FILE, learner.model), *extra]
        return learner

    whole = run(tmp_path / "whole")
    whole.fine_tune(**plan)
    for phase, epoch in (("frozen", 2), ("partial", 1)):
        folder = tmp_path / f"{phase}{epoch}"
        with pytest.raises(Crash):
            run(folder, CrashAfter(phase, epoch)).fine_tune(**plan)
        torch.manual_seed(1234), random.seed(5), np.random.seed(6)
        resumed = run(folder)
        resumed.fine_tune(**plan, resume=load_checkpoint(folder))
        for key, value in whole.model.state_dict().items():
            assert torch.equal(resumed.model.state_dict()[key], value), (phase, key)
        assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in whole.history]


def test_the_cli_parses_tune_stages():
    from imgtune.cli import cli
    from imgtune.cli.options import parse_tune_stages

    assert parse_tune_stages("auto") == "auto" and parse_tune_stages("3") == 3 and parse_tune_stages("0") == 0
    result = CliRunner().invoke(cli, ["train", "--tune-stages", "two"])
    assert result.exit_code == 2 and "--tune-stages" in result.output and "'two'" in result.output
    assert "--tune-stages" in CliRunner().invoke(cli, ["train", "--help"]).output
    with pytest.raises(ImgtuneError, match="tune_stages"):
        partial.parse_tune_stages(-1)


@pytest.mark.slow
def test_lite0_splits_at_its_stages_with_imagenet_weights():
    model = create_model("efficientnet_lite0", 4).eval()
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        maps = LowerBody(model, 2)(images)
        assert maps.shape[1:] == (112, 14, 14)
        assert torch.allclose(UpperStages(model, 2)(maps), model(images), atol=1e-5)
