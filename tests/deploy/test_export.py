"""The model bundle (safetensors + JSON) and the Predictor."""

import json
import struct

import numpy as np
import pytest
import torch
from conftest import TINY
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from imgtune import ImgtuneError, Learner, Prediction, Predictor
from imgtune.deploy.bundle import save_bundle


@pytest.fixture
def trained(tiny_data):
    """A tiny learner after a short unfrozen fit that moved its weights and BatchNorm statistics."""
    learner = Learner.from_data(tiny_data, **TINY, bn_stats="train")
    learner.unfreeze()
    learner.fit_one_cycle(1, 1e-2)
    return learner


@pytest.fixture
def bundle(trained, tmp_path):
    trained.save(tmp_path / "run")
    return tmp_path / "run"


def valid_paths(learner):
    return [item.path for item in learner.valid_dl.dataset.items]


def test_a_loaded_bundle_gives_the_learners_logits(trained, bundle):
    running_var = trained.model.bn1.running_var
    assert not torch.equal(running_var, torch.ones_like(running_var)), "the statistics should have moved"
    predictor = Predictor.load(bundle)
    xb, _ = next(iter(trained.valid_dl))
    trained.model.eval()
    with torch.no_grad():
        expected = trained.model(xb.to(memory_format=torch.channels_last))
        got = predictor.model(xb.to(memory_format=torch.channels_last))
    assert torch.allclose(got, expected, atol=1e-5)
    assert not predictor.model.training


def test_a_loaded_bundle_preprocesses_files_as_the_learner_validates_them(trained, bundle):
    probs, _, _ = trained.get_preds()
    prediction = Predictor.load(bundle).predict(valid_paths(trained))
    assert prediction.probs.shape == tuple(probs.shape)
    np.testing.assert_allclose(prediction.probs, probs.numpy(), atol=1e-5)


def test_model_json_describes_the_model(trained, bundle):
    meta = json.loads((bundle / "model.json").read_text())
    assert meta["arch"] == "test_efficientnet"
    assert meta["timm_name"] == "test_efficientnet"
    assert meta["classes"] == trained.classes == ["blue", "green", "red"]
    assert meta["num_classes"] == 3
    assert meta["size"] == 32
    assert meta["resize"] == "crop"
    assert meta["mean"] == pytest.approx(list(trained.config["mean"]))
    assert meta["std"] == pytest.approx(list(trained.config["std"]))
    assert {"imgtune", "torch", "torchvision", "timm", "python"} <= set(meta["versions"])
    assert meta["versions"]["torch"] == torch.__version__
    assert meta["training"]["seed"] == trained.config["seed"]


def test_save_bundle_records_metrics(trained, tmp_path):
    metrics = trained.validate()
    run = save_bundle(tmp_path / "nested" / "run", model=trained.model, classes=trained.classes,
                      config=dict(trained.config), metrics=metrics)
    assert run == tmp_path / "nested" / "run"
    assert json.loads((run / "model.json").read_text())["metrics"] == pytest.approx(metrics)


def test_the_weights_are_plain_safetensors(trained, bundle):
    assert sorted(p.name for p in bundle.iterdir()) == ["model.json", "model.safetensors"]
    raw = (bundle / "model.safetensors").read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    json.loads(raw[8 : 8 + header_len])  # a JSON header, not a pickle
    state = load_file(str(bundle / "model.safetensors"))
    expected = trained.model.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    with safe_open(str(bundle / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}


# --- Prediction -----------------------------------------------------------------------------------


def test_prediction_top_k_is_ordered_most_likely_first():
    prediction = Prediction(["a", "b", "c"], np.array([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]], dtype=np.float32))
    assert prediction.labels == ["b", "a"]
    top = prediction.top_k(2)
    assert [[c for c, _ in row] for row in top] == [["b", "c"], ["a", "c"]]
    assert top[0][0][1] == pytest.approx(0.5)
    assert all(isinstance(p, float) for row in top for _, p in row)
    assert len(prediction.top_k(10)[0]) == 3


def test_predictor_columns_follow_the_classes(trained, tmp_path):
    # A head that ignores the image and prefers classes[1], then classes[2], then classes[0].
    head = trained.model.get_classifier()
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, 2.0, 1.0]))
    trained.save(tmp_path / "run")

    prediction = Predictor.load(tmp_path / "run").predict(valid_paths(trained)[:2])
    classes = trained.classes
    assert prediction.classes == classes
    expected = torch.tensor([0.0, 2.0, 1.0]).softmax(0).numpy()
    np.testing.assert_allclose(prediction.probs, np.stack([expected, expected]), atol=1e-6)
    np.testing.assert_allclose(prediction.probs.sum(1), 1.0, atol=1e-6)
    assert prediction.labels == [classes[1], classes[1]]
    assert [c for c, _ in prediction.top_k(3)[0]] == [classes[1], classes[2], classes[0]]


def test_predictor_accepts_paths_pil_images_and_arrays(bundle, image_folder):
    predictor = Predictor.load(bundle)
    path = image_folder / "red" / "red_0.png"
    image = Image.open(path).convert("RGB")
    by_path, by_image, by_array = (predictor.predict([x]).probs for x in (path, image, np.asarray(image)))
    by_str = predictor.predict([str(path)]).probs
    np.testing.assert_allclose(by_image, by_path, atol=1e-6)
    np.testing.assert_allclose(by_array, by_path, atol=1e-6)
    np.testing.assert_allclose(by_str, by_path, atol=1e-6)
    grey = predictor.predict([np.full((40, 50), 128, dtype=np.uint8), image.convert("RGBA")])
    assert grey.probs.shape == (2, 3)
    with pytest.raises(TypeError):
        predictor.predict([42])


def test_predictor_batches_give_the_same_result(trained, bundle):
    predictor = Predictor.load(bundle)
    paths = valid_paths(trained)
    np.testing.assert_allclose(predictor.predict(paths, bs=4).probs, predictor.predict(paths).probs, atol=1e-6)
    assert predictor.predict([]).probs.shape == (0, 3)


# --- errors ---------------------------------------------------------------------------------------


def test_a_folder_that_is_not_a_bundle_is_an_imgtune_error(tmp_path, image_folder):
    with pytest.raises(ImgtuneError, match="not a model bundle"):
        Predictor.load(image_folder)
    with pytest.raises(ImgtuneError, match="not a model bundle"):
        Predictor.load(tmp_path / "missing")


def test_a_damaged_bundle_is_an_imgtune_error(bundle):
    meta_path = bundle / "model.json"
    meta = json.loads(meta_path.read_text())

    meta_path.write_text(json.dumps({**meta, "num_classes": 7}))
    with pytest.raises(ImgtuneError, match="cannot load the bundle"):
        Predictor.load(bundle)

    meta_path.write_text(json.dumps({**meta, "format": 99}))
    with pytest.raises(ImgtuneError, match="upgrade"):
        Predictor.load(bundle)

    meta_path.write_text("{not json")
    with pytest.raises(ImgtuneError, match="model.json"):
        Predictor.load(bundle)


def test_an_unreadable_image_is_an_imgtune_error_naming_the_file(bundle, tmp_path):
    predictor = Predictor.load(bundle)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"this is not a jpeg")
    with pytest.raises(ImgtuneError, match="broken.jpg"):
        predictor.predict([broken])
    with pytest.raises(ImgtuneError, match="missing.png"):
        predictor.predict([tmp_path / "missing.png"])


# --- weights and metadata belong together -----------------------------------------------------------


def test_model_json_records_the_sha256_of_its_weights(bundle):
    import hashlib

    meta = json.loads((bundle / "model.json").read_text())
    assert meta["weights_sha256"] == hashlib.sha256((bundle / "model.safetensors").read_bytes()).hexdigest()


def test_weights_of_another_run_beside_model_json_are_refused(bundle, tiny_data, tmp_path):
    """What a crash between the two files under --overwrite used to leave: new weights, old metadata."""
    Learner.from_data(tiny_data, **{**TINY, "seed": 7}).save(tmp_path / "other")
    (bundle / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    with pytest.raises(ImgtuneError, match="model.safetensors is not the one model.json was written for"):
        Predictor.load(bundle)


def test_a_bundle_without_the_weights_hash_still_loads(trained, bundle):
    meta_path = bundle / "model.json"
    meta = json.loads(meta_path.read_text())
    del meta["weights_sha256"]  # as imgtune 0.1.0 wrote it
    meta_path.write_text(json.dumps(meta))
    assert Predictor.load(bundle).classes == trained.classes


@pytest.mark.parametrize("name", ["hf-hub:timm/resnet18.a1_in1k", "local-dir:/tmp/model", "timm/resnet18", "..\\x"])
def test_a_timm_name_that_would_fetch_or_read_a_config_is_refused(bundle, name, monkeypatch):
    import timm

    def no_create(*args, **kwargs):
        raise AssertionError("timm was asked to build the model")

    meta_path = bundle / "model.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "timm_name": name}))
    monkeypatch.setattr(timm, "create_model", no_create)
    with pytest.raises(ImgtuneError, match="not a plain timm architecture name"):
        Predictor.load(bundle)

