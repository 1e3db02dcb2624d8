"""The web demo: good images are classified, every bad input gets a 4xx with a reason, never a 5xx; the page
escapes every name, fetches nothing from outside and comes from the package's templates."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from conftest import (COLOURS, TINY, chromium_or_skip, launch_chromium, make_class_folders, noisy_image, serve_in_thread,
                      train_colour_run, watch_page)

pytest.importorskip("fastapi")
pytest.importorskip("multipart")
from fastapi.testclient import TestClient  # noqa: E402

from imgtune.serve.app import create_app

CLASSES = sorted(COLOURS)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return train_colour_run(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def client(run_dir):
    # Room for test_concurrent_requests_agree's 8 clients: the default cap is twice the cores (often 4).
    with TestClient(create_app(run_dir, backend="torch", max_concurrent=16), raise_server_exceptions=False) as client:
        yield client


def encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def post(client, data: bytes, name: str = "image.png", field: str = "file", **params):
    return client.post("/api/predict", params=params, files={field: (name, data, "application/octet-stream")})


def test_a_good_png_is_classified_with_its_grad_cam(client):
    response = post(client, encoded(noisy_image(COLOURS["red"], 48, seed=7)), top_k=len(CLASSES))
    assert response.status_code == 200, response.text
    answer = response.json()
    assert sorted(item["label"] for item in answer["labels"]) == CLASSES
    assert sum(item["probability"] for item in answer["labels"]) == pytest.approx(1.0, abs=1e-5)
    assert answer["top"] == answer["labels"][0]["label"]
    assert answer["seconds"] >= 0
    assert answer["cam"].startswith("data:image/png;base64,")
    overlay = Image.open(io.BytesIO(base64.b64decode(answer["cam"].split(",", 1)[1])))
    assert overlay.format == "PNG" and overlay.size == (32, 32)


def test_top_k_and_cam_options(client):
    answer = post(client, encoded(noisy_image(COLOURS["blue"], 40)), top_k=1, cam="false").json()
    assert len(answer["labels"]) == 1 and answer["cam"] is None
    for bad in (0, len(CLASSES) + 1, "many"):
        response = post(client, encoded(noisy_image(COLOURS["blue"], 40)), top_k=bad)
        assert response.status_code == 422 and "top_k" in response.json()["detail"]


def test_other_formats_and_modes_are_decoded(client):
    grey = noisy_image(COLOURS["green"], 40).convert("L")
    for data in (encoded(grey, "JPEG"), encoded(grey.convert("P"), "GIF"), encoded(grey, "WEBP"),
                 encoded(grey, "BMP"), encoded(grey, "TIFF"), encoded(grey.convert("RGBA"), "PNG")):
        assert post(client, data).status_code == 200


def truncated_jpeg() -> bytes:
    data = encoded(noisy_image(COLOURS["red"], 64), "JPEG")
    return data[: len(data) // 2]


def bomb_png() -> bytes:
    """A 10000 x 10000 one-bit PNG: 100 megapixels in a few kilobytes."""
    return encoded(Image.new("1", (10_000, 10_000)), "PNG", optimize=True)


@pytest.mark.parametrize("data, status, words", [
    (b"", 400, "empty"),
    (b"just some text, not an image\n" * 10, 415, "allowed format"),
    (truncated_jpeg(), 400, "cannot decode"),
    (encoded(noisy_image(COLOURS["red"], 40), "ICO"), 415, "allowed format"),
    (bomb_png(), 413, "pixels"),
])
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's, at open; the app refuses it
def test_bad_files_get_a_4xx_that_says_why(client, data, status, words):
    response = post(client, data)
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]


def test_limits_set_in_create_app(run_dir):
    image = encoded(noisy_image(COLOURS["red"], 48))
    with TestClient(create_app(run_dir, max_bytes=500, max_pixels=48 * 47, backend="torch")) as client:
        too_big = post(client, image)
        assert too_big.status_code == 413 and "larger than the limit of 500 bytes" in too_big.json()["detail"]
        chunked = client.post("/api/predict", content=iter([b"x" * 300] * 3),
                              headers={"content-type": "multipart/form-data; boundary=b"})
        assert chunked.status_code == 413
    with TestClient(create_app(run_dir, max_pixels=48 * 47, backend="torch")) as client:
        too_many = post(client, image)
        assert too_many.status_code == 413 and "48x48 pixels" in too_many.json()["detail"]
    with TestClient(create_app(run_dir, timeout=1e-9, backend="torch")) as client:
        slow = post(client, image)
        assert slow.status_code == 504 and "longer than the limit" in slow.json()["detail"]


def test_a_missing_field_is_a_422_with_a_message(client):
    for response in (post(client, encoded(noisy_image(COLOURS["red"], 40)), field="image"),
                     client.post("/api/predict"), client.post("/api/predict", data={"file": "text"})):
        assert response.status_code == 422
        assert "file" in response.json()["detail"]


def test_health_model_and_openapi(client, run_dir):
    assert client.get("/api/health").json() == {"status": "ok"}
    model = client.get("/api/model").json()
    assert model["classes"] == CLASSES and model["size"] == 32 and model["metrics"]["valid_accuracy"] == 0.75
    assert model["name"] == run_dir.name and model["arch"] == "test_efficientnet"
    schema = client.get("/openapi.json").json()
    assert {"/api/predict", "/api/health", "/api/model"} <= set(schema["paths"])
    page = client.get("/").text
    assert 'type="file"' in page and 'accept="image/*"' in page and 'capture="environment"' in page
    for needle in ("http://", "https://", "<link", "@import", "url(", " src=\"", " href=\""):
        assert needle not in page, needle


def test_onnx_backend_still_gives_grad_cam(run_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    from imgtune.deploy.export import export_onnx

    bundle = shutil.copytree(run_dir, tmp_path / "run")
    export_onnx(bundle)
    with TestClient(create_app(bundle)) as client:
        assert client.get("/api/model").json()["backend"] == "onnx"
        answer = post(client, encoded(noisy_image(COLOURS["green"], 40))).json()
        assert answer["cam"].startswith("data:image/png;base64,")


def test_concurrent_requests_agree(client):
    image = encoded(noisy_image(COLOURS["green"], 48, seed=3))
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: post(client, image, top_k=len(CLASSES)), range(16)))
    assert all(r.status_code == 200 for r in responses)
    answers = [(r.json()["labels"], r.json()["cam"]) for r in responses]
    assert all(answer == answers[0] for answer in answers)


# --- work off the event loop, under the timeout, with a cap on how much at once --------------------

def fake_answer() -> dict:
    return {"labels": [{"label": CLASSES[0], "probability": 1.0}], "top": CLASSES[0], "seconds": 0.0, "cam": None}


def test_a_full_server_answers_503_with_retry_after_at_once(run_dir, monkeypatch):
    """Two slots held by slow predictions: a third upload is refused at once (no queue), health still
    answers, and the slots come back when the work ends."""
    import threading
    import time

    from imgtune.serve.app import Demo

    entered, release = threading.Semaphore(0), threading.Event()

    def slow_predict(self, image, *, top_k, cam):
        entered.release()
        release.wait(20)
        return fake_answer()

    image = encoded(noisy_image(COLOURS["red"], 40))
    with TestClient(create_app(run_dir, backend="torch", max_concurrent=2)) as client, ThreadPoolExecutor(2) as pool:
        monkeypatch.setattr(Demo, "predict", slow_predict)
        held = [pool.submit(post, client, image) for _ in range(2)]
        try:
            assert entered.acquire(timeout=20) and entered.acquire(timeout=20), "the two uploads never ran"
            started = time.monotonic()
            busy = post(client, image)
            waited = time.monotonic() - started
            health = client.get("/api/health")
        finally:
            release.set()
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert "busy" in busy.json()["detail"]
        assert waited < 10, "the third upload waited for a slot instead of being refused"  # held ones wait 20 s
        assert health.status_code == 200
        assert [f.result(timeout=30).status_code for f in held] == [200, 200]
        assert post(client, image).status_code == 200  # both slots given back


def test_decoding_runs_in_a_worker_under_the_timeout(run_dir, monkeypatch):
    """A decode slower than the timeout: 504 at the timeout, /api/health answers while it runs, and the
    abandoned decode keeps its slot (503) until it really ends."""
    import threading
    import time

    import imgtune.serve.app as app_module

    decoding, finish, finished = threading.Event(), threading.Event(), threading.Event()
    real_decode = app_module.decode_upload

    def slow_decode(data, **options):
        decoding.set()
        finish.wait(5)
        finished.set()
        return real_decode(data, **options)

    image = encoded(noisy_image(COLOURS["red"], 40))
    with TestClient(create_app(run_dir, backend="torch", timeout=0.5, max_concurrent=1)) as client, \
            ThreadPoolExecutor(1) as pool:
        monkeypatch.setattr(app_module, "decode_upload", slow_decode)
        slow = pool.submit(post, client, image)
        try:
            assert decoding.wait(20), "the upload was never decoded"
            health = client.get("/api/health")
            answered_during_decode = not finished.is_set()
            timed_out = slow.result(timeout=4)  # well before the decode's 5 s
            still_busy = post(client, image) if not finished.is_set() else None
        finally:
            finish.set()
        assert health.status_code == 200 and answered_during_decode, "health waited for the decode"
        assert timed_out.status_code == 504 and "longer than the limit of 0.5 s" in timed_out.json()["detail"]
        assert still_busy is not None and still_busy.status_code == 503
        assert finished.wait(10)
        monkeypatch.setattr(app_module, "decode_upload", real_decode)
        for _ in range(200):  # the slot is given back when the abandoned work (decode, then predict) ends
            response = post(client, image)
            if response.status_code != 503:
                break
            time.sleep(0.05)
        assert response.status_code == 200


# --- the Host check on loopback (DNS rebinding) ---------------------------------------------------

@pytest.mark.parametrize("bound", ["127.0.0.1", "localhost", "::1"])
def test_on_loopback_a_request_for_another_host_name_is_refused(run_dir, bound):
    image = encoded(noisy_image(COLOURS["red"], 40))
    with TestClient(create_app(run_dir, backend="torch", host=bound), base_url="http://127.0.0.1:8000") as client:
        for good in ("127.0.0.1:8000", "localhost:8000", "LocalHost:8000", "[::1]:8000", "127.1.2.3:8000"):
            assert client.get("/api/model", headers={"host": good}).status_code == 200, good
        for forged in ("evil.example:8000", "evil.example", "127.0.0.1:8001", "127.0.0.1", "localhost.evil.example:8000",
                       "127.0.0.1.nip.io:8000", "[::2]:8000", ""):
            for response in (client.get("/api/model", headers={"host": forged}), client.get("/", headers={"host": forged}),
                             client.post("/api/predict", headers={"host": forged},
                                         files={"file": ("a.png", image, "image/png")})):
                assert response.status_code == 421, (forged, response.status_code)
                assert "loopback" in response.json()["detail"]
        assert post(client, image).status_code == 200  # the default Host, 127.0.0.1:8000


@pytest.mark.parametrize("bound", [None, "0.0.0.0", "::", "192.0.2.7"])
def test_bound_to_all_or_a_real_address_any_host_name_is_answered(run_dir, bound):
    with TestClient(create_app(run_dir, backend="torch", host=bound), base_url="http://127.0.0.1:8000") as client:
        for name in ("evil.example:8000", "photos.example.org", "127.0.0.1:8000"):
            assert client.get("/api/model", headers={"host": name}).status_code == 200, name


def test_the_host_check_in_uvicorn_uses_the_port_it_listens_on(run_dir):
    import httpx

    for url in serve_in_thread(create_app(run_dir, backend="torch", host="127.0.0.1")):
        port = url.rstrip("/").rsplit(":", 1)[1]
        with httpx.Client(base_url=url, timeout=20) as http:
            assert http.get("api/health").status_code == 200
            assert http.get("api/health", headers={"host": f"localhost:{port}"}).status_code == 200
            assert http.get("api/health", headers={"host": f"rebound.example:{port}"}).status_code == 421
            assert http.get("api/health", headers={"host": "127.0.0.1:1"}).status_code == 421


def test_the_serve_command_checks_the_host_and_caps_concurrency(run_dir, monkeypatch):
    import uvicorn
    from click.testing import CliRunner

    from imgtune.cli import cli

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: served.update(app=app, **options))
    result = CliRunner().invoke(cli, ["serve", str(run_dir), "--port", "8123", "--max-concurrent", "3",
                                       "--backend", "torch"])
    assert result.exit_code == 0, result.output
    assert served["host"] == "127.0.0.1" and served["port"] == 8123
    with TestClient(served["app"], base_url="http://127.0.0.1:8123") as client:
        assert client.get("/api/health").status_code == 200
        assert client.get("/api/health", headers={"host": "rebound.example:8123"}).status_code == 421
        schema = client.get("/openapi.json").json()
        assert {"421", "503"} <= set(schema["paths"]["/api/predict"]["post"]["responses"])


def test_fuzzing_the_api_finds_no_server_error(run_dir):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(run_dir, backend="torch"))
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case):
                response = case.call()
                assert response.status_code < 500, (case.method, case.path, response.status_code, response.text)

            try:
                check()
            except Unsatisfiable:
                assert mode == GenerationMode.NEGATIVE  # an operation without inputs has no invalid request


def test_corrupted_images_never_give_a_server_error(client):
    """Real files of each allowed format with random bytes overwritten or cut off: answered, or refused with a 4xx."""
    pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, settings, strategies as st

    picture = noisy_image(COLOURS["red"], 40)
    files = [encoded(picture, fmt) for fmt in ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")]

    @settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(index=st.sampled_from(range(len(files))), cut=st.floats(0.05, 1.0),
           edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=8))
    def check(index, cut, edits):
        data = bytearray(files[index][: max(1, int(len(files[index]) * cut))])
        for where, value in edits:
            data[int(where * len(data))] = value
        response = post(client, bytes(data), cam="true")
        assert response.status_code in (200, 400, 413, 415), response.text
        assert response.status_code == 200 or response.json()["detail"]

    check()


@pytest.fixture
def server(run_dir):
    """The app served by uvicorn on a free loopback port, in a background thread."""
    yield from serve_in_thread(create_app(run_dir, backend="torch"))


def test_the_page_in_a_real_browser(server, tmp_path):
    executable = chromium_or_skip("uvicorn")
    from playwright.sync_api import sync_playwright

    artifacts = Path(os.environ.get("IMGTUNE_ARTIFACTS", tmp_path / "artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    picture = tmp_path / "red.png"
    noisy_image(COLOURS["red"], 64, seed=11).save(picture)
    errors, requests = [], []
    with sync_playwright() as p:
        browser = launch_chromium(p, executable)
        try:
            page = browser.new_page(viewport={"width": 390, "height": 844})
            watch_page(page, errors, requests)
            page.goto(server)
            about = page.locator("#about").inner_text()
            page.set_input_files("#file", str(picture))
            page.wait_for_selector("#labels .row.top .label", timeout=20_000)
            page.wait_for_function("() => document.getElementById('cam').naturalWidth > 0", timeout=20_000)
            top = page.locator("#labels .row.top .label").inner_text()
            rows = page.locator("#labels .row").count()
            overflow = page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
            page.screenshot(path=str(artifacts / "serve-page.png"), full_page=True)
        finally:
            browser.close()
    assert errors == []
    assert top in CLASSES and rows == len(CLASSES)
    assert "validation accuracy 75.0%" in about and "red" in about
    assert overflow <= 1, "the page scrolls sideways on a phone"
    assert all(url.startswith((server, "data:", "blob:")) for url in requests)
    assert (artifacts / "serve-page.png").stat().st_size > 0


# --- the page: hostile class names, no outside request, templates from the package -----------------

HOSTILE = {"<b>": COLOURS["red"], "a&b": COLOURS["green"], "<script>x'y\"": COLOURS["blue"]}  # no / in a folder name


def model_json(page: str) -> str:
    """The text of the page's ``<script id="model">`` element."""
    opening = '<script id="model" type="application/json">'
    start = page.index(opening) + len(opening)
    return page[start:page.index("</script>", start)]


def test_the_page_escapes_hostile_names_and_fetches_nothing():
    from imgtune.serve.app import render_page

    info = dict(name="run<1>", arch="a&b", classes=[*HOSTILE, "</script><i>"], size=32, metrics={"valid_accuracy": 0.5})
    page = render_page(info)
    embedded = model_json(page)
    assert json.loads(embedded) == info  # the keys in the order given, too
    assert list(json.loads(embedded)) == list(info)
    for raw in ("<", ">", "&", "'"):
        assert raw not in embedded, raw  # written as \u003c ...: nothing can close the script element
    assert page.count("</script>") == 2 and "<b>" not in page and "<i>" not in page
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page)
    for needle in ("http://", "https://", "<link", "@import", "url("):
        assert needle not in page, needle


def test_the_page_templates_ship_with_the_package():
    from importlib.resources import files

    import jinja2

    from imgtune.serve.app import environment

    folder = files("imgtune.serve") / "templates"
    assert all((folder / name).is_file() for name in ("index.html", "demo.css", "demo.js"))
    env = environment()
    assert isinstance(env.loader, jinja2.PackageLoader)
    assert set(env.list_templates()) <= {entry.name for entry in folder.iterdir()}
    assert env.from_string("{{ name }}").render(name="<b>&") == "&lt;b&gt;&amp;"  # autoescape on


@pytest.fixture(scope="module")
def hostile_run_dir(tmp_path_factory):
    from imgtune import Learner, load_data

    root = tmp_path_factory.mktemp("hostile")
    data = load_data(make_class_folders(root / "colours", colours=HOSTILE), valid_pct=0.25, stratify=True, seed=0)
    learner = Learner.from_data(data, **TINY)
    learner.fit_one_cycle(1, 1e-2)
    learner.save(root / "run<&>", metrics={"valid_accuracy": 0.5})
    return root / "run<&>"


@pytest.fixture
def hostile_server(hostile_run_dir):
    yield from serve_in_thread(create_app(hostile_run_dir, backend="torch"))


def test_hostile_class_names_in_a_real_browser(hostile_server, tmp_path):
    executable = chromium_or_skip("uvicorn")
    from playwright.sync_api import sync_playwright

    picture = tmp_path / "red.png"
    noisy_image(COLOURS["red"], 64, seed=11).save(picture)
    errors, requests = [], []
    with sync_playwright() as p:
        browser = launch_chromium(p, executable)
        try:
            page = browser.new_page(viewport={"width": 390, "height": 844})
            watch_page(page, errors, requests)
            page.goto(hostile_server)
            name, about = page.locator("#name").inner_text(), page.locator("#about").inner_text()
            page.set_input_files("#file", str(picture))
            page.wait_for_selector("#labels .row.top .label", timeout=20_000)
            labels = page.locator("#labels .row .label").all_inner_texts()
            injected = page.locator("b, i").count()
            scripts = page.locator("script").count()
        finally:
            browser.close()
    assert errors == [] and injected == 0 and scripts == 2
    assert name == "run<&>" and "classes: " + ", ".join(sorted(HOSTILE)) in about
    assert sorted(labels) == sorted(HOSTILE)
    assert all(url.startswith((hostile_server, "data:", "blob:")) for url in requests)
