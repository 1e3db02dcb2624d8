"""The training config: a commented dataclass, saved into model.json and read back checked; 0.1.0 bundles load."""

import json

import numpy as np
import pytest
from conftest import TINY
from safetensors.torch import save_file

from imgtune import ImgtuneError, Learner, Predictor
from imgtune.models import create_model
from imgtune.train.config import TrainConfig, read_training_config

#: model.json's "training" object exactly as imgtune 0.1.0 wrote it for `imgtune train` (fine_tune ran).
TRAINING_0_1_0 = {
    "arch": "test_efficientnet", "timm_name": "test_efficientnet", "weights": "none", "size": 32, "resize": "crop",
    "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "bs": 6, "augment": True, "seed": 42,
    "accumulate": 1, "world_size": 1, "sync_bn": False, "lr": {"frozen": 0.01, "unfrozen": [5e-05, 0.005]},
}


def write_0_1_0_bundle(run_dir, training=TRAINING_0_1_0):
    """A bundle as imgtune 0.1.0 wrote it: the weights and its model.json, written here by hand."""
    run_dir.mkdir(parents=True)
    model = create_model("test_efficientnet", 3, weights="none")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run_dir / "model.safetensors"),
              metadata={"format": "pt"})
    meta = {"format": 1, "arch": "test_efficientnet", "timm_name": "test_efficientnet", "num_classes": 3,
            "classes": ["blue", "green", "red"], "size": 32, "resize": "crop", "mean": TRAINING_0_1_0["mean"],
            "std": TRAINING_0_1_0["std"], "training": training, "metrics": {"valid_accuracy": 1.0},
            "versions": {"imgtune": "0.1.0", "torch": "2.5.1", "torchvision": "0.20.1", "timm": "1.0.12",
                         "python": "3.11.7"}}
    (run_dir / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    return run_dir


def test_the_config_round_trips_through_model_json(tiny_learner, tmp_path):
    tiny_learner.fine_tune(1, 1e-2, freeze_epochs=1)
    tiny_learner.save(tmp_path / "run")
    written = json.loads((tmp_path / "run" / "model.json").read_text())["training"]
    assert list(written) == ["arch", "timm_name", "weights", "size", "resize", "mean", "std", "bs", "augment",
                             "seed", "accumulate", "world_size", "sync_bn", "lr"]  # 0.1.0's keys, in its order
    assert written == dict(tiny_learner.config)
    read = read_training_config(tmp_path / "run")
    assert read == tiny_learner.config and isinstance(read, TrainConfig)
    assert (read.size, read.bs, read.seed, read.lr["frozen"]) == (32, 6, 42, 1e-2)


def test_the_config_is_a_mapping_of_the_fields_that_are_set():
    config = TrainConfig(timm_name="resnet18", size=224, mean=[0.5] * 3, std=[0.25] * 3)
    assert config["size"] == 224 and config.size == 224
    assert "lr" not in config and config.get("lr") is None and config.get("resize", "crop") == "crop"
    with pytest.raises(KeyError):
        config["arch"]
    with pytest.raises(KeyError):
        config["unknown"]
    assert dict(config) == {"timm_name": "resnet18", "size": 224, "mean": [0.5] * 3, "std": [0.25] * 3,
                            "accumulate": 1, "world_size": 1, "sync_bn": False}
    config.lr = {"frozen": 1e-3, "unfrozen": [1e-5, 1e-4]}
    assert list(config)[-1] == "lr" and len(config) == 8


def test_a_learner_built_by_hand_takes_a_dict_and_copies_a_config(tiny_learner):
    model, groups = tiny_learner.model, tiny_learner.groups
    learner = Learner(model, None, None, classes="abc", groups=groups, device="cpu", config={"size": 32})
    assert dict(learner.config) == {"size": 32, "accumulate": 1, "world_size": 1, "sync_bn": False}
    own = TrainConfig(size=32)
    Learner(model, None, None, classes="abc", groups=groups, device="cpu", config=own, accumulate=2)
    assert own.accumulate == 1  # the learner records on its own copy
    with pytest.raises(ImgtuneError, match=r"Learner\(config=...\): unknown training config field.*colour"):
        Learner(model, None, None, classes="abc", device="cpu", config={"size": 32, "colour": "red"})


def test_a_0_1_0_bundle_still_loads(tmp_path):
    run = write_0_1_0_bundle(tmp_path / "run")
    config = read_training_config(run)
    assert dict(config) == TRAINING_0_1_0
    predictor = Predictor.load(run)
    assert predictor.classes == ["blue", "green", "red"]
    assert predictor.predict([np.full((32, 32, 3), 128, dtype=np.uint8)]).probs.shape == (1, 3)


def test_an_older_bundle_without_the_parallel_fields_gets_their_defaults(tmp_path):
    older = {k: v for k, v in TRAINING_0_1_0.items() if k not in ("accumulate", "world_size", "sync_bn")}
    config = read_training_config(write_0_1_0_bundle(tmp_path / "run", older))
    assert (config.accumulate, config.world_size, config.sync_bn) == (1, 1, False)


@pytest.mark.parametrize("change, message", [
    ({"colour": "red"}, "unknown training config field.* colour"),
    ({"size": None}, "lacks size"),
    ({"timm_name": None, "mean": None}, "lacks timm_name, mean"),
    ({"size": "large"}, "field size must be a positive integer, not 'large'"),
    ({"size": True}, "field size must be a positive integer"),
    ({"mean": [0.5, 0.5]}, "field mean must be a list of 3 numbers"),
    ({"augment": "yes"}, "field augment must be true or false"),
    ({"resize": "stretch"}, "field resize must be one of crop, squish, pad"),
    ({"lr": {"frozen": 1e-3}}, "field lr must be an object"),
])
def test_a_bad_training_config_is_an_error_naming_the_file_and_field(tmp_path, change, message):
    training = {k: v for k, v in {**TRAINING_0_1_0, **change}.items() if v is not None}
    run = write_0_1_0_bundle(tmp_path / "run", training)
    with pytest.raises(ImgtuneError, match=message) as error:
        read_training_config(run)
    assert str(error.value).startswith(str(run / "model.json") + ": ")


def test_a_bundle_without_a_training_config_is_an_error(tmp_path):
    run = write_0_1_0_bundle(tmp_path / "run")
    meta = json.loads((run / "model.json").read_text())
    (run / "model.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "training"}))
    with pytest.raises(ImgtuneError, match="model.json: no training config"):
        read_training_config(run)
    (run / "model.json").write_text(json.dumps({**meta, "training": [1, 2]}))
    with pytest.raises(ImgtuneError, match="must be a JSON object, not list"):
        read_training_config(run)


def test_training_from_a_run_folder_checks_its_config(tiny_data, tmp_path):
    run = write_0_1_0_bundle(tmp_path / "run")
    learner = Learner.from_data(tiny_data, **{**TINY, "weights": str(run)})
    assert learner.config["weights"] == str(run)
    meta = json.loads((run / "model.json").read_text())
    (run / "model.json").write_text(json.dumps({**meta, "training": {**meta["training"], "bs": -3}}))
    with pytest.raises(ImgtuneError, match=r"model\.json: training config field bs must be a positive integer"):
        Learner.from_data(tiny_data, **{**TINY, "weights": str(run)})
