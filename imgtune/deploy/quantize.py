"""int8 export: a bundle's ONNX graph quantized statically, checked against float32 before it is written.

EfficientNet-Lite was made for int8 (ReLU6, no squeeze-excitation), so its weights and activations fit
8 bits well. ONNX Runtime's static quantization puts QuantizeLinear/DequantizeLinear pairs (QDQ) around
each convolution, one scale per output channel for the weights, and one range per activation measured
on calibration pictures: a sample of the run's own training images, preprocessed as the predictor does.
The result is checked on the run's validation images against the float32 graph (top-1 agreement and
the accuracy of each), and written only when it loses at most ``max_drop`` accuracy points; the
figures are stored in the file's metadata.

The recipe (:data:`RECIPE`) is the one ``bench/int8_recipes.py`` found best on the pets sample (185
validation images) and elpv (525); accuracy points lost against float32, 128 calibration pictures:

- the "same" padding's shape arithmetic stays in float32 (:func:`shape_arithmetic`). Quantized with the
  activations, it padded by the wrong amounts: most of what int8 lost (MinMax ranges: pets 2.16 -> 0.54,
  elpv 2.67 -> 1.90; top-1 agreement on pets 95.7% -> 98.4%), and why no other choice helped before;
- activation ranges that keep the central 99.999 % of the calibration values instead of their min and
  max: pets 0.00, elpv 0.95. Against MinMax's 0.54 and 1.90 (everything else equal), these did not
  bring elpv under a point: entropy ranges (0.54, 1.90), 256 pictures (0.54, 1.90), symmetric
  activations (0.00, 2.10; slower than float32), the classifier (0.00, 2.29) or the residual sums
  (0.54, 1.90) kept in float32; the stem in float32 did (0.00, 0.95) with a lower agreement on elpv
  (91.4% against 92.8%) and a float32 convolution at full resolution;
- 7-bit int8 weights (see :attr:`Recipe.reduce_range`; 8-bit lost 4.86 points on pets instead of 2.16,
  measured before the padding fix). uint8 weights in 8 bits lost less (pets 0.00, elpv 0.38) but ran at
  a quarter of float32's speed: ONNX Runtime has no fast uint8 x uint8 kernels here.
"""

from __future__ import annotations

import random
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from imgtune.data.images import load_image, to_rgb
from imgtune.data.transforms import valid_transform
from imgtune.deploy.bundle import INT8_ONNX_FILE, load_model, read_meta
from imgtune.deploy.export import bundle_graph, bundle_props, import_onnx
from imgtune.deploy.onnx_session import open_session
from imgtune.errors import ImgtuneError
from imgtune.files import atomic_write

#: Accuracy points the int8 graph may lose against float32 on the validation images (else it is not written).
MAX_DROP = 1.0

#: Training images whose activations set the int8 ranges, and pictures per calibration batch.
CALIBRATION_IMAGES, CALIBRATION_BATCH = 128, 16

SPLIT_FILE = "split.csv"


@dataclass(frozen=True)
class Recipe:
    """How a float32 graph becomes int8: the choices ``bench/int8_recipes.py`` measures one against another.

    Every field maps to an option of ONNX Runtime's ``quantize_static`` (QDQ format, per-channel weights).
    """

    #: How each activation's range is set from the calibration pictures: ``minmax`` (the min and max
    #: seen), ``percentile`` (the central ``percentile`` % of the values) or ``entropy`` (the range whose
    #: 8-bit histogram stays closest to the float one).
    calibration: str = "percentile"
    #: The share of values a ``percentile`` range keeps, in percent.
    percentile: float = 99.999
    #: ``int8`` weights (ONNX Runtime's uint8 x int8 kernels) or ``uint8`` (uint8 x uint8).
    weights: str = "int8"
    #: Weights in 7 bits instead of 8. Without AVX-512 VNNI, ONNX Runtime's uint8 x int8 kernels add pairs
    #: of products in 16 bits, which 8-bit weights can overflow (see the module's docstring).
    reduce_range: bool = True
    #: Activation ranges made symmetric around 0 (else each gets its own zero point).
    activation_symmetric: bool = False
    #: Nodes left in float32: any of ``stem`` (the first convolution), ``head`` (the last one),
    #: ``pool`` (global average pooling), ``classifier`` (Gemm/MatMul) and ``add`` (the residual sums).
    keep_float: tuple[str, ...] = ()
    #: Calibrate on each picture and its mirror image.
    mirrors: bool = False

    def describe(self) -> str:
        """The recipe in words, as stored in the int8 file's ``quantization`` metadata."""
        ranges = {"minmax": "MinMax", "entropy": "entropy",
                  "percentile": f"{self.percentile:g} percentile"}[self.calibration]
        bits = "7-bit" if self.reduce_range else "8-bit"
        text = (f"int8 static QDQ, per-channel {bits} {self.weights} weights, uint8 "
                f"{'symmetric ' if self.activation_symmetric else ''}activations, {ranges} ranges"
                f"{' (pictures and mirrors)' if self.mirrors else ''}")
        return text + (f"; float32: {', '.join(self.keep_float)}" if self.keep_float else "")


#: The recipe ``imgtune export --int8`` uses (the defaults: see the module's docstring for why).
RECIPE = Recipe()

#: The ``keep_float`` names, and what they keep in float32.
FLOAT_PARTS = ("add", "classifier", "head", "pool", "stem")


def float_nodes(graph, parts: Sequence[str]) -> list[str]:
    """Names of the nodes of ``graph`` (an ``onnx.ModelProto``) that ``parts`` (see :attr:`Recipe.keep_float`)
    leave in float32.

    Raises:
        ImgtuneError: an unknown part.
    """
    unknown = sorted(set(parts) - set(FLOAT_PARTS))
    if unknown:
        raise ImgtuneError(f"unknown keep_float {', '.join(unknown)}; choose among {', '.join(FLOAT_PARTS)}")
    nodes = list(graph.graph.node)
    convs = [node for node in nodes if node.op_type == "Conv"]
    weights = {init.name for init in graph.graph.initializer}
    chosen = {"stem": convs[:1], "head": convs[-1:],
              "pool": [node for node in nodes if node.op_type in ("GlobalAveragePool", "ReduceMean")],
              "classifier": [node for node in nodes if node.op_type in ("Gemm", "MatMul")],
              # Adds of two activations (the residual sums), not of a constant (shape arithmetic, biases).
              "add": [node for node in nodes if node.op_type == "Add" and not set(node.input) & weights]}
    return [node.name for part in parts for node in chosen[part]]


def shape_arithmetic(graph) -> list[str]:
    """Names of the nodes of ``graph`` (an ``onnx.ModelProto``) that compute sizes from a tensor's shape.

    The TF-ported EfficientNets pad "same" from the input's size (Shape, Gather, Cast, Div, Ceil, Sub, Max,
    ... down to each stride-2 Pad's pads). Those are exact integers held in float32: quantized to 8 bits
    like activations, they are rounded to a step of their range (sizes up to 224: about 1), and the pads
    can come out wrong, shifting the maps of every later layer; kept in float32 they cost nothing (a few
    scalars). Measured in ``bench/int8_recipes.py``: see the module's docstring.
    """
    constants = {init.name for init in graph.graph.initializer}
    derived: set[str] = set()
    names = []
    for node in graph.graph.node:  # ONNX keeps nodes in topological order
        inputs = [name for name in node.input if name]
        if node.op_type == "Constant":
            constants.update(node.output)
        elif node.op_type == "Shape" or (any(name in derived for name in inputs)
                                         and all(name in derived or name in constants for name in inputs)):
            derived.update(node.output)
            names.append(node.name)
    return names


def quantize_graph(graph: bytes, batches: Iterable[np.ndarray], *, input_name: str = "images",
                   recipe: Recipe = RECIPE, ranges_cache: str | Path | None = None) -> bytes:
    """``graph`` (float32 ONNX) quantized to int8 as ``recipe`` says, activation ranges measured on ``batches``.

    Args:
        graph: the serialised float32 graph.
        batches: calibration inputs (float32 arrays as the graph takes them).
        input_name: the graph's input.
        recipe: the quantization choices.  [default: :data:`RECIPE`]
        ranges_cache: a file that keeps the measured activation ranges, and gives them back on a later call
            (then ``batches`` is not read): only for the same graph, pictures, ``calibration`` and
            ``percentile``.

    Returns:
        The serialised int8 graph (its metadata are not kept: the caller sets them).
    """
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if recipe.calibration not in methods or recipe.weights not in ("int8", "uint8"):
        raise ImgtuneError(f"int8 recipe: calibration {recipe.calibration!r}, weights {recipe.weights!r}; "
                           f"choose calibration among {', '.join(methods)} and weights int8 or uint8")

    def pictures() -> Iterator[np.ndarray]:
        # One picture per run: the percentile and entropy calibrators stack every run's outputs into one
        # array, and fail on a last batch smaller than the others.
        for batch in batches:
            for picture in batch:
                yield picture[None]
                if recipe.mirrors:
                    yield picture[None, ..., ::-1]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = pictures()

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {input_name: np.ascontiguousarray(batch, dtype=np.float32)}

    with tempfile.TemporaryDirectory(prefix="imgtune-int8-") as tmp:
        source, prepared, target = (Path(tmp) / name for name in ("fp32.onnx", "prepared.onnx", "int8.onnx"))
        source.write_bytes(graph)
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        model = onnx.load(str(prepared))
        # Percentile ranges are symmetric around 0 unless told otherwise, which would waste half of uint8 on
        # the ReLU6 outputs (never below 0).
        extra = {"ActivationSymmetric": recipe.activation_symmetric, "CalibTensorRangeSymmetric": False}
        if recipe.calibration == "percentile":
            extra["CalibPercentile"] = recipe.percentile
        quantize_static(str(prepared), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=recipe.reduce_range, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8 if recipe.weights == "int8" else QuantType.QUInt8,
                        nodes_to_exclude=shape_arithmetic(model) + float_nodes(model, recipe.keep_float),
                        calibrate_method=methods[recipe.calibration], extra_options=extra,
                        calibration_cache_path=None if ranges_cache is None else str(ranges_cache))
        return target.read_bytes()


def preprocessed_batches(images: Sequence, meta: dict, *, bs: int = CALIBRATION_BATCH) -> Iterator[np.ndarray]:
    """``images`` (paths or PIL images) preprocessed as the bundle's predictor does, ``bs`` at a time.

    Raises:
        ImgtuneError: an image cannot be read (naming it).
    """
    transform = valid_transform(meta["size"], meta.get("resize", "crop"), meta["mean"], meta["std"])
    for start in range(0, len(images), bs):
        pictures = [to_rgb(image) if not isinstance(image, (str, Path)) else load_image(image, min_size=meta["size"])
                    for image in images[start:start + bs]]
        yield torch.stack([transform(picture) for picture in pictures]).numpy()


def compare_int8(fp32, int8, batches: Iterable[np.ndarray], targets: np.ndarray) -> dict:
    """Top-1 agreement of two sessions (``images`` -> ``logits``) and the accuracy of each on ``targets``.

    Returns:
        ``{"images", "agreement", "fp32_accuracy", "int8_accuracy", "accuracy_drop"}``; the agreement and
        accuracies are fractions, ``accuracy_drop`` is in points (float32's accuracy minus int8's, x 100).
    """
    fp32_labels, int8_labels = [], []
    for batch in batches:
        fp32_labels.append(fp32.run(["logits"], {"images": batch})[0].argmax(1))
        int8_labels.append(int8.run(["logits"], {"images": batch})[0].argmax(1))
    a, b = (np.concatenate(labels) if labels else np.zeros(0, np.int64) for labels in (fp32_labels, int8_labels))
    if len(a) != len(targets):
        raise ImgtuneError(f"{len(a)} validation predictions for {len(targets)} targets")
    count = max(1, len(a))
    fp32_accuracy, int8_accuracy = float((a == targets).sum() / count), float((b == targets).sum() / count)
    return dict(images=int(len(a)), agreement=float((a == b).sum() / count), fp32_accuracy=fp32_accuracy,
                int8_accuracy=int8_accuracy, accuracy_drop=100 * (fp32_accuracy - int8_accuracy))


def run_split(run_dir: Path, classes: Sequence[str]) -> tuple[list[str], list[str], np.ndarray]:
    """The run's training files, validation files and validation targets (indices into ``classes``),
    from its ``split.csv``.

    Raises:
        ImgtuneError: no ``split.csv``, no validation images, or labels the model does not know.
    """
    from imgtune.data.loaders import load_data

    split = run_dir / SPLIT_FILE
    if not split.is_file():
        raise ImgtuneError(f"{run_dir}: no {SPLIT_FILE} to calibrate int8 on; export a run folder that "
                           "`imgtune train` wrote, or give the calibration images")
    data = load_data(csv_path=split, check=False)
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({item.label for item in data.valid if item.label not in index})
    if unknown or not data.valid:
        problem = f"labels the model lacks ({', '.join(unknown[:5])})" if unknown else "no validation images"
        raise ImgtuneError(f"{split}: {problem}; int8 is checked against float32 on the run's validation images")
    return ([str(item.path) for item in data.train], [str(item.path) for item in data.valid],
            np.array([index[item.label] for item in data.valid], dtype=np.int64))


def write_int8_onnx(run_dir: str | Path, *, max_drop: float = MAX_DROP, calibration: Sequence | None = None,
                    calibration_images: int = CALIBRATION_IMAGES, seed: int = 0, recipe: Recipe = RECIPE,
                    opset: int = 17,
                    path: str | Path | None = None, overwrite: bool = False,
                    progress: Callable[[str], None] | None = None) -> tuple[Path, dict]:
    """Write the bundle's model quantized to int8 (``model.int8.onnx``), checked against float32.

    The graph takes and returns what ``model.onnx`` does (see :func:`imgtune.deploy.export.write_onnx`)
    and carries the same metadata, plus ``quantization`` and the check's figures (``int8_agreement``,
    ``int8_fp32_accuracy``, ``int8_accuracy``, ``int8_accuracy_drop``, ``int8_checked_images``,
    ``int8_calibration_images``).

    Args:
        run_dir: a run folder (``model.json``, ``model.safetensors`` and ``split.csv``).
        max_drop: the most accuracy points int8 may lose against float32 on the validation images.
        calibration: images (paths or PIL images) to calibrate on.  [default: a sample of
            ``calibration_images`` of the run's training images, drawn with ``seed``]
        calibration_images: how many training images to sample.
        seed: the sample's seed.
        recipe: the quantization choices.  [default: :data:`RECIPE`]
        opset: the ONNX opset version.
        path: where to write.  [default: ``model.int8.onnx`` in ``run_dir``]
        overwrite: replace an existing file.
        progress: called with a line before each step.

    Returns:
        The path written and the check's figures (see :func:`compare_int8`).

    Raises:
        ImgtuneError: the file exists, the run has no usable ``split.csv``, or int8 loses more than
            ``max_drop`` points (then nothing is written).
    """
    onnx = import_onnx("onnx")
    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    path = Path(path) if path is not None else run_dir / INT8_ONNX_FILE
    if path.exists() and not overwrite:
        raise ImgtuneError(f"{path}: file exists; pass --overwrite (overwrite=True) to replace it")
    say = progress or (lambda line: None)
    train_files, valid_files, targets = run_split(run_dir, meta["classes"])
    if calibration is None:
        calibration = random.Random(seed).sample(train_files, min(calibration_images, len(train_files)))
    if not calibration:
        raise ImgtuneError(f"{run_dir / SPLIT_FILE}: no training images to calibrate int8 on")
    fp32 = bundle_graph(run_dir, meta, load_model(run_dir, meta), opset=opset).SerializeToString()
    say(f"calibrating int8 on {len(calibration)} images")
    int8 = onnx.load_from_string(quantize_graph(fp32, preprocessed_batches(list(calibration), meta), recipe=recipe))
    say(f"checking int8 against float32 on {len(valid_files)} validation images")
    figures = compare_int8(open_session(fp32), open_session(int8.SerializeToString()),
                           preprocessed_batches(valid_files, meta, bs=32), targets)
    if figures["accuracy_drop"] > max_drop:
        raise ImgtuneError(f"int8 accuracy {100 * figures['int8_accuracy']:.2f}% is {figures['accuracy_drop']:.2f} "
                           f"points below float32's {100 * figures['fp32_accuracy']:.2f}% on {figures['images']} "
                           f"validation images (more than {max_drop:g}); nothing written: calibrate on more "
                           "training images or keep model.onnx")
    props = bundle_props(run_dir, meta) | {
        "quantization": recipe.describe(),
        "int8_calibration_images": str(len(calibration)), "int8_checked_images": str(figures["images"]),
        "int8_agreement": f"{figures['agreement']:.6f}", "int8_fp32_accuracy": f"{figures['fp32_accuracy']:.6f}",
        "int8_accuracy": f"{figures['int8_accuracy']:.6f}", "int8_accuracy_drop": f"{figures['accuracy_drop']:.4f}"}
    onnx.helper.set_model_props(int8, props)
    atomic_write(path, int8.SerializeToString())
    return path, figures
