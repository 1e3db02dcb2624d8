"""ONNX export of a bundle and the ONNX Runtime predictor: same logits as PyTorch, dynamic batch."""

import numpy as np
import pytest
import torch

from imgtune import ImgtuneError, Learner, Predictor
from imgtune.deploy.predict import OnnxPredictor, load_predictor
from imgtune.deploy.export import export_onnx, onnx_max_difference

ort = pytest.importorskip("onnxruntime")


@pytest.fixture
def bundle(tiny_learner, tmp_path):
    tiny_learner.save(tmp_path / "run")
    return tmp_path / "run"


@pytest.fixture
def exported(bundle):
    export_onnx(bundle)
    return bundle


def valid_paths(learner):
    return [item.path for item in learner.valid_dl.dataset.items]


def test_export_writes_model_onnx_with_named_dynamic_axes(bundle):
    path = export_onnx(bundle)
    assert path == bundle / "model.onnx" and path.is_file()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (images,), (logits,) = session.get_inputs(), session.get_outputs()
    assert images.name == "images" and logits.name == "logits"
    assert isinstance(images.shape[0], str) and images.shape[1:] == [3, 32, 32]
    assert session.get_modelmeta().custom_metadata_map["classes"] == '["blue", "green", "red"]'


@pytest.mark.parametrize("n", [1, 5])
def test_onnx_runtime_logits_equal_pytorch(exported, n):
    model = Predictor.load(exported).model.to(memory_format=torch.contiguous_format)
    session = ort.InferenceSession(str(exported / "model.onnx"), providers=["CPUExecutionProvider"])
    batch = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        expected = model(batch).numpy()
    (got,) = session.run(["logits"], {"images": batch.numpy()})
    assert got.shape == (n, 3)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert onnx_max_difference(exported, batch_sizes=(1, 5)) <= 1e-4


def test_export_refuses_to_overwrite(exported):
    before = (exported / "model.onnx").read_bytes()
    with pytest.raises(ImgtuneError, match="overwrite"):
        export_onnx(exported)
    assert (exported / "model.onnx").read_bytes() == before
    assert export_onnx(exported, overwrite=True).is_file()


def test_export_to_another_path(bundle, tmp_path):
    path = export_onnx(bundle, path=tmp_path / "elsewhere.onnx", opset=18)
    assert path.is_file() and not (bundle / "model.onnx").exists()


def test_onnx_predictor_gives_the_torch_probabilities_on_files(tiny_learner, exported):
    paths = valid_paths(tiny_learner)
    onnx_prediction = OnnxPredictor.load(exported).predict(paths, bs=4)
    torch_prediction = Predictor.load(exported).predict(paths, bs=4)
    assert onnx_prediction.classes == torch_prediction.classes
    np.testing.assert_allclose(onnx_prediction.probs, torch_prediction.probs, atol=1e-4, rtol=0)
    assert onnx_prediction.labels == torch_prediction.labels


def test_the_predictor_s_threads_do_not_spin_while_decoding_shares_the_cores(exported):
    """Predictors share the cores with decoding, so their session is opened without spinning threads;
    the feature extractor's sessions keep the default (spinning)."""
    from imgtune.deploy.onnx_session import open_session

    options = OnnxPredictor.load(exported).session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    default = open_session(exported / "model.onnx").get_session_options()
    assert default.get_session_config_entry("session.intra_op.allow_spinning") == "1"


def test_auto_backend_picks_onnx_when_model_onnx_exists(bundle):
    assert isinstance(load_predictor(bundle), Predictor)
    export_onnx(bundle)
    assert isinstance(load_predictor(bundle), OnnxPredictor)
    assert isinstance(load_predictor(bundle, backend="torch"), Predictor)
    assert isinstance(Predictor.load(bundle), Predictor)


def test_a_stale_model_onnx_is_refused_and_auto_falls_back(tiny_learner, exported):
    with torch.no_grad():
        tiny_learner.model.get_classifier().bias.add_(1.0)
    tiny_learner.save(exported)
    with pytest.raises(ImgtuneError, match="--overwrite"):
        OnnxPredictor.load(exported)
    assert isinstance(load_predictor(exported), Predictor)


def test_predict_files_reports_unreadable_files_and_keeps_order(tiny_learner, exported, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_text("not an image")
    good = valid_paths(tiny_learner)[:3]
    results = list(OnnxPredictor.load(exported).predict_files([good[0], bad, *good[1:]], bs=2))
    assert [r[0] for r in results] == [good[0], bad, *good[1:]]
    assert results[1][1] is None and "broken.png" in results[1][2]
    expected = Predictor.load(exported).predict(good).probs
    got = np.concatenate([r[1].probs for r in results if r[1] is not None])
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("tta", ["none", "flip"])
def test_predict_files_on_every_core_gives_the_one_decoder_answers_in_order(tiny_learner, exported, tmp_path,
                                                                         monkeypatch, tta):
    """With two cores each takes whole batches on a one-thread session: the same rows, errors and order
    as one decoding thread beside the model, whatever finishes first."""
    import imgtune.deploy.predict as predict

    monkeypatch.setattr(predict, "usable_cores", lambda: 2)
    bad = tmp_path / "broken.png"
    bad.write_text("not an image")
    good = valid_paths(tiny_learner)
    paths = [good[0], bad, *good[1:]] * 3
    parallel = OnnxPredictor.load(exported, tta=tta)
    one_decoder = OnnxPredictor(parallel.session, parallel.meta, tta)  # no model: one decoding thread
    got, expected = list(parallel.predict_files(paths, bs=2)), list(one_decoder.predict_files(paths, bs=2))
    assert parallel._one_thread is not None and one_decoder._one_thread is None
    assert [(p, e) for p, _, e in got] == [(p, e) for p, _, e in expected] and len(got) == len(paths)
    assert sum(e is not None for _, _, e in got) == 3
    for (_, mine, _), (_, theirs, _) in zip(got, expected):
        assert (mine is None) == (theirs is None)
        if mine is not None:
            np.testing.assert_allclose(mine.probs, theirs.probs, atol=1e-5, rtol=0)


def test_predict_files_abandoned_early_decodes_only_the_batches_in_flight(tiny_learner, exported, monkeypatch):
    """At most two batches per core are in flight: a caller that stops after the first answer does not
    wait for the whole folder to be decoded and classified."""
    import imgtune.deploy.predict as predict

    monkeypatch.setattr(predict, "usable_cores", lambda: 2)
    predictor = OnnxPredictor.load(exported)
    decoded = []
    decode = predictor._decode
    monkeypatch.setattr(predictor, "_decode", lambda chunk: decoded.append(len(chunk)) or decode(chunk))
    answers = predictor.predict_files(valid_paths(tiny_learner)[:1] * 40, bs=1)
    next(answers)
    answers.close()
    assert len(decoded) == 5  # 2 x 2 batches submitted first, one more after the first answer, of 40


def test_missing_bundle_or_onnx_file_is_an_error(tmp_path, bundle):
    with pytest.raises(ImgtuneError, match="not a model bundle"):
        export_onnx(tmp_path / "nothing")
    with pytest.raises(ImgtuneError, match="imgtune export"):
        OnnxPredictor.load(bundle)
    with pytest.raises(ImgtuneError, match="unknown backend"):
        load_predictor(bundle, backend="tensorrt")


def test_missing_onnx_names_the_package_to_install(bundle, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_onnx(name, *args, **kwargs):
        if name in ("onnx", "onnxruntime"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    with pytest.raises(ImgtuneError, match=r"ONNX needs the onnx package .*: pip install onnx$"):
        export_onnx(bundle)


@pytest.mark.slow
def test_real_efficientnet_lite0_exports_within_1e_4(tiny_data, tmp_path):
    learner = Learner.from_data(tiny_data, "efficientnet_lite0", size=224, bs=6, num_workers=0, progress=False,
                                device="cpu")
    learner.save(tmp_path / "lite0")
    export_onnx(tmp_path / "lite0")
    difference = onnx_max_difference(tmp_path / "lite0", batch_sizes=(1, 5))
    print(f"efficientnet_lite0 max logit difference: {difference:.3g}")
    assert difference <= 1e-4
    paths = valid_paths(learner)
    np.testing.assert_allclose(OnnxPredictor.load(tmp_path / "lite0").predict(paths).probs,
                               Predictor.load(tmp_path / "lite0").predict(paths).probs, atol=1e-4, rtol=0)
