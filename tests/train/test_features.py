"""Cached frozen-backbone features: the same numbers as the network, computed once, the head trained on them."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY

from imgtune import Learner
from imgtune.data.presize import ImageView
from imgtune.models import create_model
from imgtune.train.extract import (
    FEATURE_TOLERANCE,
    FEATURE_VIEWS,
    FeatureExtractor,
    compute_features,
)
from imgtune.train.features import (
    HeadOnFeatures,
    body_fingerprint,
    head_on_features,
    imagenet_features,
)

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return create_model("test_efficientnet", 3, weights="none").eval()


def test_the_head_on_pooled_features_is_the_model(tiny_model):
    images = torch.randn(4, 3, 32, 32)
    features = tiny_model.forward_head(tiny_model.forward_features(images), pre_logits=True)
    head = HeadOnFeatures(tiny_model).eval()
    assert torch.allclose(head(features), tiny_model(images), atol=1e-6)
    assert head.classifier is tiny_model.get_classifier()  # shared: training it trains the model's head


def test_the_fingerprint_follows_the_body_not_the_head(tiny_model):
    before = body_fingerprint(tiny_model, MEAN)
    with torch.no_grad():
        tiny_model.get_classifier().weight.add_(1.0)
    assert body_fingerprint(tiny_model, MEAN) == before
    assert body_fingerprint(tiny_model, STD) != before  # another input normalisation
    with torch.no_grad():
        tiny_model.conv_stem.weight.add_(1e-3)
    assert body_fingerprint(tiny_model, MEAN) != before


def test_onnx_runtime_features_match_pytorch(tiny_model, tmp_path):
    pytest.importorskip("onnxruntime")
    images = torch.randn(5, 3, 32, 32)
    fingerprint = body_fingerprint(tiny_model)
    kw = dict(size=32, device=torch.device("cpu"), fingerprint=fingerprint, cache_dir=tmp_path)
    onnx = FeatureExtractor(tiny_model, backend="onnx", **kw)
    torch_ = FeatureExtractor(tiny_model, backend="torch", **kw)
    got, expected = onnx(images), torch_(images)
    assert onnx.backend == "onnx" and onnx.difference is not None and onnx.difference <= FEATURE_TOLERANCE
    assert got.shape == expected.shape == (5, tiny_model.num_features)
    assert (got - expected).abs().max() <= FEATURE_TOLERANCE
    assert len(list((tmp_path / "onnx").glob(f"{fingerprint}-32.onnx"))) == 1


def test_features_are_computed_once_for_the_picture_and_its_mirror(image_folder, tiny_model, tmp_path):
    from imgtune.data.cache import ArrayStore
    from imgtune.data.transforms import tensor_transform

    paths = sorted(image_folder.rglob("*.png"))[:7]
    view = ImageView(32, cache_dir=tmp_path)
    extractor = FeatureExtractor(tiny_model, size=32, device=torch.device("cpu"), fingerprint="f", backend="torch")
    store = ArrayStore(tmp_path / "features")
    calls = []
    features, stats = compute_features(paths, extractor, view, mean=MEAN, std=STD, store=store, batch_size=3,
                                       progress=lambda done, total: calls.append((done, total)))
    assert features.shape == (7, FEATURE_VIEWS, tiny_model.num_features)
    assert stats["computed"] == 7 and stats["cached"] == 0 and calls == [(0, 7), (3, 7), (6, 7), (7, 7)]
    image = tensor_transform(MEAN, STD)(view(paths[2]))[None]
    assert torch.allclose(features[2, 0], extractor(image)[0], atol=1e-5)
    assert torch.allclose(features[2, 1], extractor(image.flip(-1))[0], atol=1e-5)
    again, stats = compute_features(paths, extractor, view, mean=MEAN, std=STD, store=store)
    assert stats == dict(stats, computed=0, cached=7) and torch.equal(again, features)


def test_validation_on_cached_features_gives_the_network_s_predictions(tiny_learner):
    from_features = tiny_learner.get_preds()
    from_images = tiny_learner.get_preds(tiny_learner.valid_dl)
    for a, b in zip(from_features, from_images):
        assert torch.allclose(a, b, atol=1e-5)
    assert tiny_learner.features.stats["computed"] == len(tiny_learner.train_dl.dataset) + len(from_images[1])


def test_the_frozen_phase_on_features_trains_the_head_and_leaves_the_body(tiny_learner):
    body = {k: v.clone() for k, v in tiny_learner.model.state_dict().items() if not k.startswith("classifier")}
    head = tiny_learner.model.get_classifier().weight.clone()
    tiny_learner.fit_one_cycle(6, 5e-2, phase="frozen")
    losses = [h["train_loss"] for h in tiny_learner.history]
    assert losses[-1] < losses[0]
    assert not torch.equal(tiny_learner.model.get_classifier().weight, head)
    after = tiny_learner.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in body.items())
    assert tiny_learner.timings["frozen"] < 5  # no pass of the body per step (a generous bound)
    # The full model (images in, logits out) agrees with what training measured on features.
    final = tiny_learner.history[-1]["accuracy"]
    probs, targets, _ = tiny_learner.get_preds(tiny_learner.valid_dl)
    assert (probs.argmax(1) == targets).float().mean().item() == pytest.approx(final)


def test_a_changed_body_gets_new_features(tiny_learner):
    tiny_learner.get_preds()
    computed = tiny_learner.features.stats["computed"]
    tiny_learner.unfreeze()
    tiny_learner.fit_one_cycle(1, 1e-2, phase="unfrozen")
    tiny_learner.freeze()
    tiny_learner.get_preds()
    assert tiny_learner.features.stats["computed"] == computed  # all new: the old ones are for another body
    assert tiny_learner.features.stats["cached"] == 0


def test_without_the_feature_cache_the_body_runs_every_step(tiny_data, tmp_path):
    learner = Learner.from_data(tiny_data, **TINY, feature_cache=False, cache_dir=tmp_path)
    learner.fit_one_cycle(1, 1e-2, phase="frozen")
    assert learner.features is None and "features" not in learner.timings
    assert not (tmp_path / "features").exists() and (tmp_path / "presized").is_dir()


def test_nothing_is_written_without_the_cache(tiny_data, tmp_path):
    learner = Learner.from_data(tiny_data, **TINY, cache=False, cache_dir=tmp_path)
    learner.fit_one_cycle(1, 1e-2, phase="frozen")
    assert learner.features.stats["computed"] > 0 and not tmp_path.joinpath("features").exists()
    assert not tmp_path.joinpath("presized").exists() and not tmp_path.joinpath("onnx").exists()


def test_imagenet_features_of_files(image_folder, tmp_path):
    paths = sorted(image_folder.rglob("*.png"))[:4]

    def features():
        torch.manual_seed(0)  # the same random weights each time, so the same fingerprint
        return imagenet_features(paths, arch="test_efficientnet", weights="none", size=32, cache_dir=tmp_path)

    first = features()
    assert first.shape[0] == 4 and first.dim() == 2
    assert torch.equal(features(), first)
    assert len(list((tmp_path / "features").rglob("*.npy"))) == 4  # computed once


def test_under_torch_distributed_the_body_runs_every_step(tiny_learner, tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert tiny_learner.auto_unfrozen_epochs() >= 2  # as on a GPU: the cached head is for one process
        tiny_learner.get_preds()
        assert tiny_learner.features.stats == {}  # nothing was computed: the images went through the body
    finally:
        dist.destroy_process_group()


def test_without_augmentation_the_head_never_sees_a_mirror_image(tiny_data):
    learner = Learner.from_data(tiny_data, **TINY, augment=False)
    with head_on_features(learner):
        dataset = learner.train_dl.dataset
        assert not dataset.random_view
        assert all(torch.equal(dataset[i][0], dataset.features[i, 0]) for i in range(len(dataset)))
    augmented = Learner.from_data(tiny_data, **TINY)
    with head_on_features(augmented):
        dataset = augmented.train_dl.dataset
        seen = {int(torch.equal(dataset[0][0], dataset.features[0, 1])) for _ in range(40)}
        assert seen == {0, 1}  # both views turn up


def test_the_swap_to_features_happens_once_and_is_undone(tiny_learner):
    model, loaders = tiny_learner.model, (tiny_learner.train_dl, tiny_learner.valid_dl)
    with head_on_features(tiny_learner):
        head = tiny_learner.model
        assert isinstance(head, HeadOnFeatures) and tiny_learner.memory_format == torch.contiguous_format
        with head_on_features(tiny_learner):  # nested, as validate() inside a fit: nothing more changes
            assert tiny_learner.model is head
        assert tiny_learner.model is head
    assert tiny_learner.model is model and (tiny_learner.train_dl, tiny_learner.valid_dl) == loaders
    assert tiny_learner.memory_format == torch.channels_last
    tiny_learner.unfreeze()
    with head_on_features(tiny_learner):  # the body trains: the images go through it
        assert tiny_learner.model is model


def test_the_swap_is_undone_when_the_block_raises(tiny_learner):
    model = tiny_learner.model
    with pytest.raises(KeyError), head_on_features(tiny_learner):
        raise KeyError("boom")
    assert tiny_learner.model is model


# --- features on a GPU: their precision and their cache folder ---------------------------------------


def test_the_feature_cache_folder_follows_the_precision_and_keeps_its_fp32_name():
    from imgtune.train.features import feature_store_name

    fp32 = feature_store_name("abc123", "valid-224-crop", "fp32")
    assert fp32 == "abc123-valid-224-crop"  # the name caches written before had: they stay valid
    names = {fp32, feature_store_name("abc123", "valid-224-crop", "bf16"),
             feature_store_name("abc123", "valid-224-crop", "fp16")}
    assert len(names) == 3


def test_a_cpu_learner_caches_its_features_where_it_always_did(tiny_data, tmp_path):
    learner = Learner.from_data(tiny_data, **TINY, cache_dir=tmp_path)
    learner.get_preds()
    fingerprint = body_fingerprint(learner.model, learner.features.mean, learner.features.std, 32)
    assert [p.name for p in (tmp_path / "features").iterdir()] == [f"{fingerprint}-valid-32-crop"]


def test_an_extractor_s_precision_is_its_device_s(tiny_model):
    kw = dict(size=32, fingerprint="f")
    assert FeatureExtractor(tiny_model, device=torch.device("cpu"), **kw).precision == "fp32"
    cuda = FeatureExtractor(tiny_model, device=torch.device("cuda"), precision="bf16", **kw)
    assert (cuda.precision, cuda.backend) == ("bf16", "torch")  # no CUDA needed to say so


def test_the_gpu_s_streamed_features_are_the_cpu_path_s(image_folder, tiny_model, tmp_path):
    """The GPU path (loader processes, uint8 chunks normalised and mirrored on the device, lagged
    read-back) run on the CPU: the same features as the threaded CPU path."""
    from imgtune.train.extract import _streamed_features, _threaded_features

    paths = sorted(image_folder.rglob("*.png"))[:7]
    view = ImageView(32, cache_dir=tmp_path)
    extractor = FeatureExtractor(tiny_model, size=32, device=torch.device("cpu"), fingerprint="f", backend="torch")
    chunks = [[0, 1, 2], [3, 4, 5], [6]]
    threaded = list(_threaded_features(paths, chunks, extractor, view, mean=MEAN, std=STD))
    for workers in (0, 2):
        streamed = list(_streamed_features(paths, chunks, extractor, view, mean=MEAN, std=STD, workers=workers))
        assert [chunk for chunk, _ in streamed] == chunks
        for (_, a), (_, b) in zip(streamed, threaded):
            assert a.shape == b.shape == (len(a), FEATURE_VIEWS, tiny_model.num_features)
            assert torch.allclose(torch.from_numpy(a), torch.from_numpy(b), atol=1e-6)


def test_imagenet_features_run_where_they_are_asked_to(image_folder, tmp_path, monkeypatch):
    paths = sorted(image_folder.rglob("*.png"))[:2]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    torch.manual_seed(0)
    default = imagenet_features(paths, arch="test_efficientnet", weights="none", size=32, cache=False)
    torch.manual_seed(0)
    on_cpu = imagenet_features(paths, arch="test_efficientnet", weights="none", size=32, cache=False, device="cpu")
    assert torch.equal(default, on_cpu)
