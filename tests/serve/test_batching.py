"""Micro-batching in the web demo: concurrent requests share model calls yet each gets its own answer
(its image, its top_k), a bad upload fails only itself, a timed-out request leaves the queue, Grad-CAM
requests and ``--no-batching`` classify alone, and the serve command passes its options on."""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import COLOURS, noisy_image, train_colour_run
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("multipart")
from fastapi.testclient import TestClient  # noqa: E402

from imgtune.serve.app import create_app  # noqa: E402

CLASSES = sorted(COLOURS)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return train_colour_run(tmp_path_factory.mktemp("batching"))


def png(colour: str, seed: int, size: int = 40) -> bytes:
    buffer = io.BytesIO()
    noisy_image(COLOURS[colour], size, seed=seed).save(buffer, format="PNG")
    return buffer.getvalue()


def post(client, data: bytes, **params):
    return client.post("/api/predict", params={"cam": "false", **params},
                       files={"file": ("image.png", data, "application/octet-stream")})


def expected_answer(run_dir, data: bytes, top_k: int) -> list[tuple[str, float]]:
    """The top classes of one image classified alone by the bundle's PyTorch predictor."""
    from imgtune.deploy.predict import Predictor
    from imgtune.serve.uploads import decode_upload

    return Predictor.load(run_dir).predict([decode_upload(data)]).top_k(top_k)[0]


def assert_same_answer(answer: dict, expected: list[tuple[str, float]]) -> None:
    assert [item["label"] for item in answer["labels"]] == [label for label, _ in expected]
    assert [item["probability"] for item in answer["labels"]] == pytest.approx([p for _, p in expected], abs=1e-5)
    assert answer["top"] == expected[0][0]


def concurrently(client, uploads: list[tuple[bytes, dict]]) -> list:
    """POST every upload at once, each from its own thread."""
    with ThreadPoolExecutor(len(uploads)) as pool:
        return list(pool.map(lambda upload: post(client, upload[0], **upload[1]), uploads))


def behind_a_held_batch(app, client, uploads: list[tuple[bytes, dict]], *, queued: int) -> list:
    """POST every upload at once while the model's first call (a request sent before them) is held,
    until ``queued`` of them wait in the batcher's queue: those leave in as few batches as
    ``max_batch`` allows, however the machine schedules the threads."""
    batcher, entered, release = app.state.demo.batcher, threading.Event(), threading.Event()
    real = batcher.predict_batch

    def held(pictures):
        if not entered.is_set():
            entered.set()
            assert release.wait(30)
        return real(pictures)

    batcher.predict_batch = held
    with ThreadPoolExecutor(len(uploads) + 1) as pool:
        first = pool.submit(post, client, png("red", 1000))
        try:
            assert entered.wait(30), "the first request never reached the model"
            futures = [pool.submit(post, client, data, **params) for data, params in uploads]
            deadline = time.monotonic() + 30
            while batcher.queued < queued and time.monotonic() < deadline:
                time.sleep(0.01)
            assert batcher.queued == queued
        finally:
            release.set()
        assert first.result(30).json()["batch"] == 1
        return [future.result(30) for future in futures]


def test_concurrent_requests_share_batches_and_each_gets_its_own_answer(run_dir):
    uploads = [(png(colour, seed), {"top_k": 1 + seed % len(CLASSES)})
               for seed, colour in enumerate(CLASSES * 3)]
    app = create_app(run_dir, backend="torch", max_concurrent=16, max_batch=16, batch_wait=0.01)
    with TestClient(app) as client:
        responses = behind_a_held_batch(app, client, uploads, queued=len(uploads))
    assert [r.status_code for r in responses] == [200] * len(uploads), [r.text for r in responses]
    for (data, params), response in zip(uploads, responses):
        assert len(response.json()["labels"]) == params["top_k"]
        assert_same_answer(response.json(), expected_answer(run_dir, data, params["top_k"]))
    assert [r.json()["batch"] for r in responses] == [len(uploads)] * len(uploads)  # one model call for all nine
    assert app.state.demo.batcher.batch_sizes == {1: 1, len(uploads): 1}


def test_concurrent_requests_agree_batched_or_not(run_dir):
    """However requests happen to be grouped, each answer is its own image's."""
    uploads = [(png(CLASSES[seed % 3], seed), {"top_k": 3}) for seed in range(8)]
    app = create_app(run_dir, backend="torch", max_concurrent=8, max_batch=8, batch_wait=0.05)
    with TestClient(app) as client:
        responses = concurrently(client, uploads)
    for (data, params), response in zip(uploads, responses):
        assert_same_answer(response.json(), expected_answer(run_dir, data, 3))


def test_batches_never_exceed_max_batch(run_dir):
    uploads = [(png(CLASSES[seed % 3], seed), {}) for seed in range(10)]
    app = create_app(run_dir, backend="torch", max_concurrent=11, max_batch=3, batch_wait=0.01)
    with TestClient(app) as client:
        responses = behind_a_held_batch(app, client, uploads, queued=10)
    assert all(r.status_code == 200 for r in responses)
    assert sorted(r.json()["batch"] for r in responses) == [1] + [3] * 9  # ten queued: 3 + 3 + 3 + 1
    assert app.state.demo.batcher.batch_sizes == {1: 2, 3: 3}


def truncated_png() -> bytes:
    data = png("red", 99, size=64)
    return data[: len(data) // 2]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_bad_upload_among_batched_ones_fails_only_itself(run_dir):
    bomb = io.BytesIO()
    Image.new("1", (3000, 3000)).save(bomb, format="PNG", optimize=True)
    good = [(png(CLASSES[seed % 3], seed), {"top_k": 2}) for seed in range(5)]
    uploads = [*good[:2], (truncated_png(), {}), *good[2:4], (bomb.getvalue(), {}), good[4]]
    app = create_app(run_dir, backend="torch", max_concurrent=16, max_pixels=1_000_000, max_batch=16, batch_wait=0.01)
    with TestClient(app) as client:
        responses = behind_a_held_batch(app, client, uploads, queued=len(good))
    statuses = [r.status_code for r in responses]
    assert statuses == [200, 200, 400, 200, 200, 413, 200], [r.text for r in responses]
    assert "cannot decode" in responses[2].json()["detail"] and "pixels" in responses[5].json()["detail"]
    for (data, params), response in zip(uploads, responses):
        if response.status_code == 200:
            assert_same_answer(response.json(), expected_answer(run_dir, data, params["top_k"]))
    assert {r.json()["batch"] for r in responses if r.status_code == 200} == {len(good)}  # they shared one call


def test_grad_cam_requests_bypass_the_batcher(run_dir):
    app = create_app(run_dir, backend="torch", max_batch=8, batch_wait=0.01)
    with TestClient(app) as client:
        with_cam = post(client, png("red", 1), cam="true")
        assert with_cam.status_code == 200 and with_cam.json()["cam"].startswith("data:image/png;base64,")
        assert with_cam.json()["batch"] == 1 and not app.state.demo.batcher.batch_sizes
        without = post(client, png("red", 1))
        assert without.status_code == 200 and without.json()["cam"] is None
        assert app.state.demo.batcher.batch_sizes == {1: 1}


def test_without_batching_each_request_is_classified_alone(run_dir):
    uploads = [(png(CLASSES[seed % 3], seed), {"top_k": 3}) for seed in range(4)]
    app = create_app(run_dir, backend="torch", max_concurrent=4, max_batch=1)
    with TestClient(app) as client:
        responses = concurrently(client, uploads)
    assert app.state.demo.batcher is None
    assert [r.json()["batch"] for r in responses] == [1] * 4
    for (data, params), response in zip(uploads, responses):
        assert_same_answer(response.json(), expected_answer(run_dir, data, 3))


def test_a_request_that_times_out_in_the_queue_leaves_it_and_the_batcher_goes_on(run_dir, monkeypatch):
    """One batch held by a slow model call: a request queued behind it gets 504 at its timeout and its
    picture never reaches the model; once the slow call ends, the next request is answered."""
    from imgtune.serve.app import Demo

    entered, release, seen = threading.Event(), threading.Event(), []
    real = Demo.batch_probabilities

    def slow_probabilities(self, pictures):
        seen.append(len(pictures))
        entered.set()
        assert release.wait(20)
        return real(self, pictures)

    monkeypatch.setattr(Demo, "batch_probabilities", slow_probabilities)
    app = create_app(run_dir, backend="torch", timeout=0.5, max_concurrent=4, max_batch=4, batch_wait=0.0)
    with TestClient(app) as client, ThreadPoolExecutor(1) as pool:
        first = pool.submit(post, client, png("red", 1))
        try:
            assert entered.wait(20), "the first request never reached the model"
            queued = post(client, png("green", 2))
        finally:
            release.set()
        assert queued.status_code == 504 and "longer than the limit of 0.5 s" in queued.json()["detail"]
        assert first.result(20).status_code == 504  # its model call outlasted the timeout too
        after = post(client, png("blue", 3))
    assert after.status_code == 200 and after.json()["batch"] == 1
    assert seen == [1, 1], "the timed-out request's picture reached the model"


def test_the_serve_command_passes_batching_int8_and_tta_on(run_dir, monkeypatch):
    import uvicorn
    from click.testing import CliRunner

    import imgtune.deploy.predict as predict_module
    from imgtune.cli import cli

    served, asked = {}, []
    real = predict_module.load_predictor

    def load_predictor(run_dir, **options):
        asked.append(options)
        return real(run_dir, backend="torch", device=options["device"])  # what was asked for is recorded

    monkeypatch.setattr(uvicorn, "run", lambda app, **options: served.update(app=app))
    monkeypatch.setattr(predict_module, "load_predictor", load_predictor)
    runner = CliRunner()
    result = runner.invoke(cli, ["serve", str(run_dir), "--backend", "torch", "--max-batch", "4",
                                 "--batch-wait-ms", "20"])
    assert result.exit_code == 0, result.output
    batcher = served["app"].state.demo.batcher
    assert (batcher.max_batch, batcher.max_wait) == (4, pytest.approx(0.02))
    assert asked[-1] == dict(backend="torch", device="cpu", int8=False, tta=None)  # tta: the bundle's own
    result = runner.invoke(cli, ["serve", str(run_dir), "--backend", "onnx", "--no-batching", "--int8", "--no-tta"])
    assert result.exit_code == 0, result.output
    assert served["app"].state.demo.batcher is None
    assert asked[-1] == dict(backend="onnx", device="cpu", int8=True, tta="none")
    result = runner.invoke(cli, ["serve", str(run_dir), "--tta"])
    assert result.exit_code == 0 and asked[-1]["tta"] == "flip"


def test_batched_answers_follow_the_predictors_test_time_augmentation(run_dir):
    """With tta="flip", a batched answer is the mean of the picture's and its mirror's, as predict gives."""
    from imgtune.deploy.predict import Predictor
    from imgtune.serve.uploads import decode_upload

    uploads = [(png(CLASSES[seed % 3], seed), {"top_k": 3}) for seed in range(4)]
    app = create_app(run_dir, backend="torch", tta="flip", max_concurrent=4, max_batch=4, batch_wait=1.0)
    with TestClient(app) as client:
        responses = concurrently(client, uploads)
    flip, plain = Predictor.load(run_dir, tta="flip"), Predictor.load(run_dir, tta="none")
    for (data, _), response in zip(uploads, responses):
        image = decode_upload(data)
        assert_same_answer(response.json(), flip.predict([image]).top_k(3)[0])
        differs = plain.predict([image]).probs[0, 0] != pytest.approx(flip.predict([image]).probs[0, 0], abs=1e-6)
        assert differs, "the mirror image gave the same probabilities: the test shows nothing"
