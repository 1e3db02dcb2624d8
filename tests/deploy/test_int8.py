"""int8 export (static QDQ quantization) of a bundle: agreement with float32, the accuracy guard, the
metadata it stores, the int8 predictor, and what the recipe leaves in float32 (the "same" padding's shape
arithmetic always, the nodes ``keep_float`` names)."""

from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, make_class_folders
from PIL import Image

from imgtune import ImgtuneError, Learner, load_data
from imgtune.deploy.bundle import read_meta
from imgtune.deploy.export import export_onnx
from imgtune.deploy.predict import OnnxPredictor, load_predictor
from imgtune.deploy.quantize import RECIPE, Recipe, float_nodes, quantize_graph, shape_arithmetic, write_int8_onnx
from imgtune.train.run import write_split

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxruntime.quantization")

#: The share of images on which the int8 graph must pick float32's class (tiny model, 48 images).
AGREEMENT = 0.9


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder: a tiny model whose head was fitted on 3 colour classes x 16 images, with its split.csv."""
    root = tmp_path_factory.mktemp("int8")
    data = load_data(make_class_folders(root / "colours", n=16), valid_pct=0.5, stratify=True, seed=0)
    learner = Learner.from_data(data, **TINY)
    learner.fit_one_cycle(4, 1e-1)
    assert learner.history[-1]["accuracy"] == 1.0
    learner.save(root / "run")
    write_split(data, root / "run" / "split.csv")
    return root / "run", data


def test_int8_agrees_with_float32_and_stores_its_figures(run, tmp_path):
    run_dir, data = run
    path, figures = write_int8_onnx(run_dir, path=tmp_path / "model.int8.onnx")
    assert figures["images"] == len(data.valid)
    assert figures["agreement"] >= AGREEMENT and figures["accuracy_drop"] <= 1.0
    props = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    assert float(props["int8_agreement"]) == pytest.approx(figures["agreement"], abs=1e-6)
    assert float(props["int8_accuracy_drop"]) == pytest.approx(figures["accuracy_drop"], abs=1e-4)
    assert props["int8_calibration_images"] == str(len(data.train))  # fewer than the default sample
    assert props["classes"] == '["blue", "green", "red"]' and props["quantization"] == RECIPE.describe()
    graph_ops = {node.op_type for node in __import__("onnx").load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= graph_ops
    # On files: the int8 predictor picks float32's labels on (almost) every image.
    export_onnx(run_dir, path=tmp_path / "fp32.onnx")
    paths = [item.path for item in data.train + data.valid]
    meta = read_meta(run_dir)
    fp32 = OnnxPredictor(ort.InferenceSession(str(tmp_path / "fp32.onnx"), providers=["CPUExecutionProvider"]), meta)
    int8 = OnnxPredictor(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), meta)
    agree = np.mean(np.array(fp32.predict(paths).labels) == np.array(int8.predict(paths).labels))
    assert agree >= AGREEMENT


def producers(graph) -> dict:
    """Tensor name -> the op type of the node that writes it."""
    return {output: node.op_type for node in graph.graph.node for output in node.output}


def test_same_padding_arithmetic_stays_float(tmp_path):
    """The TF-ported EfficientNets compute their "same" pads from the input's shape in float32: quantized,
    224 rounds to 223.9 and a pad of 1 to 0 or 2. The int8 graph computes them from no DequantizeLinear."""
    import onnx
    import torch
    from timm.layers import Conv2dSame

    from imgtune.deploy.export import module_to_onnx

    model = torch.nn.Sequential(Conv2dSame(3, 4, 3, stride=2), torch.nn.ReLU6(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    graph = module_to_onnx(model, torch.zeros(2, 3, 17, 17), input_name="images", output_name="logits")
    names = set(shape_arithmetic(onnx.load_from_string(graph)))
    assert {"Shape", "Ceil", "Sub"} <= {n.op_type for n in onnx.load_from_string(graph).graph.node if n.name in names}
    rng = np.random.default_rng(0)
    int8 = onnx.load_from_string(quantize_graph(graph, [rng.normal(size=(4, 3, 17, 17)).astype(np.float32)] * 2))
    written = producers(int8)
    dequantized = {node.output[0]: written.get(node.input[0]) for node in int8.graph.node
                   if node.op_type == "DequantizeLinear"}
    arithmetic = [node for node in int8.graph.node if node.name in names]
    assert {"Shape", "Ceil", "Sub"} <= {node.op_type for node in arithmetic}  # some were folded away
    # Shape may read the quantized picture (its shape is exact), and a Clip the 0 it shares with ReLU6
    # (exact in uint8); no size computed on the way is quantized.
    assert not [name for node in arithmetic if node.op_type != "Shape" for name in node.input
                if dequantized.get(name) == "QuantizeLinear"]
    pad = next(node for node in int8.graph.node if node.op_type == "Pad")
    assert written[pad.input[0]] == "DequantizeLinear" and written[pad.input[1]] != "DequantizeLinear"
    assert written[next(n for n in int8.graph.node if n.op_type == "Conv").input[1]] == "DequantizeLinear"


def test_keep_float_leaves_those_nodes_in_float32(run):
    import onnx

    from imgtune.deploy.bundle import load_model
    from imgtune.deploy.export import bundle_graph
    from imgtune.deploy.quantize import preprocessed_batches

    run_dir, data = run
    meta = read_meta(run_dir)
    graph = bundle_graph(run_dir, meta, load_model(run_dir, meta)).SerializeToString()
    recipe = Recipe(keep_float=("stem", "classifier"))
    int8 = onnx.load_from_string(quantize_graph(graph, preprocessed_batches([i.path for i in data.train], meta),
                                                recipe=recipe))
    written, weights = producers(int8), {init.name for init in int8.graph.initializer}
    stem, *_, last = [node for node in int8.graph.node if node.op_type == "Conv"]
    gemm = next(node for node in int8.graph.node if node.op_type in ("Gemm", "MatMul"))
    assert {stem.name, gemm.name} == set(float_nodes(int8, recipe.keep_float))
    # Kept in float32: float weights (their inputs may come dequantized); the other convolutions read int8 weights.
    assert stem.input[1] in weights and gemm.input[1] in weights
    assert written[last.input[1]] == "DequantizeLinear"
    assert "float32: stem, classifier" in recipe.describe()
    with pytest.raises(ImgtuneError, match="unknown keep_float conv; choose among add, classifier"):
        float_nodes(int8, ("conv",))


def test_a_broken_calibration_is_refused_and_nothing_written(run):
    run_dir, _ = run
    blank = [Image.new("RGB", (32, 32)) for _ in range(8)]
    with pytest.raises(ImgtuneError, match=r"points below float32.*nothing written"):
        write_int8_onnx(run_dir, calibration=blank, max_drop=1.0)
    assert not (run_dir / "model.int8.onnx").exists()
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".model.int8")]


def test_predict_int8_needs_the_export_and_then_loads_it(run, tmp_path):
    run_dir, data = run
    with pytest.raises(ImgtuneError, match=r"no model\.int8\.onnx; write it with `imgtune export .* --int8`"):
        load_predictor(run_dir, int8=True)
    with pytest.raises(ImgtuneError, match="int8 runs on ONNX Runtime"):
        load_predictor(run_dir, int8=True, backend="torch")
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("model.json", "model.safetensors", "split.csv"):
        (copy / name).write_bytes((run_dir / name).read_bytes())
    write_int8_onnx(copy)
    predictor = load_predictor(copy, int8=True)
    assert isinstance(predictor, OnnxPredictor)
    assert predictor.predict([item.path for item in data.valid]).probs.shape == (len(data.valid), 3)
    with pytest.raises(ImgtuneError, match="file exists"):
        write_int8_onnx(copy)


def test_a_run_without_split_csv_is_refused(tiny_learner, tmp_path):
    tiny_learner.save(tmp_path / "bundle")
    with pytest.raises(ImgtuneError, match="no split.csv"):
        write_int8_onnx(tmp_path / "bundle")
    assert not (tmp_path / "bundle" / "model.int8.onnx").exists()


@pytest.mark.slow
def test_real_efficientnet_lite0_int8_agrees_on_real_photos(tmp_path):
    """ImageNet Lite0 with a head fitted on 12 pets photos of 3 breeds: int8 picks float32's class on
    the 12 held-out photos but at most one."""
    from imgtune.data.sources import PETS_LABEL_RE

    pets = Path(__file__).resolve().parents[3] / "shared" / "data" / "oxford-pets-sample"
    if not pets.is_dir():
        pytest.skip(f"{pets}: the pets sample is not here")
    folder = tmp_path / "pets"
    folder.mkdir()
    for breed in ("Abyssinian", "beagle", "pug"):
        for photo in sorted(pets.glob(f"{breed}_*.jpg"))[:8]:
            (folder / photo.name).symlink_to(photo)
    data = load_data(folder, label_re=PETS_LABEL_RE, valid_pct=0.5, stratify=True, seed=0)
    learner = Learner.from_data(data, "efficientnet_lite0", bs=6, num_workers=0, progress=False, device="cpu")
    learner.fit_one_cycle(2, 1e-2)
    learner.save(tmp_path / "run")
    write_split(data, tmp_path / "run" / "split.csv")
    _, figures = write_int8_onnx(tmp_path / "run", max_drop=100.0)
    print(f"lite0 int8 on {figures['images']} photos: agreement {figures['agreement']:.3f}")
    assert figures["images"] == 12 and figures["agreement"] >= 11 / 12
