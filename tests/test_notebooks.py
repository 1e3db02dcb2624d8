"""The example notebooks, executed cell by cell in a real Jupyter kernel of this Python.

On a few breeds of the pets sample (or synthetic colour classes where the sample is missing), small
pictures, one epoch, the offline EfficientNet-Lite0 weights and a private cache: every cell must run,
every figure cell must show a PNG, the accuracy cells must print a number. One executed notebook is
rendered to HTML and opened in Chromium, and its screenshot kept in ``test-artifacts/``.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import sys
import threading
from functools import partial
from pathlib import Path

import pytest

from conftest import chromium_or_skip, launch_chromium, make_class_folders

nbformat = pytest.importorskip("nbformat", reason="pip install -e '.[notebook]'")
nbclient = pytest.importorskip("nbclient", reason="pip install -e '.[notebook]'")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
PETS_SAMPLE = ROOT.parent / "shared" / "data" / "oxford-pets-sample"
ARTIFACTS = Path(os.environ.get("IMGTUNE_ARTIFACTS", ROOT / "test-artifacts"))
BREEDS = ("Abyssinian", "Bengal", "Birman")
#: The calls whose cell must show a figure.
FIGURES = ("show_batch(", ".plot()", "plot_losses(", "show_results(", "plot_confusion_matrix(", "plot_top_losses(",
           "plot_cam(")
#: Small and quick: a few breeds, small pictures, one epoch of each phase, a fixed batch.
SETTINGS = {"IMGTUNE_ARCH": "efficientnet_lite0", "IMGTUNE_SIZE": "96", "IMGTUNE_EPOCHS": "1",
            "IMGTUNE_UNFROZEN_EPOCHS": "1", "IMGTUNE_BS": "8", "OMP_NUM_THREADS": "2"}


def test_the_committed_notebooks_have_no_outputs():
    assert {p.name for p in NOTEBOOKS} >= {"lesson1.ipynb", "own_images.ipynb"}
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: strip the outputs"
        first_code = next(c for c in nb.cells if c.cell_type == "code").source
        assert "pip" in first_code and "Colab" in nb.cells[0].source, f"{path.name}: starts with the Colab cells"
        assert any('torch.cuda.is_available() else "cpu"' in c.source for c in nb.cells)


@pytest.fixture(scope="module")
def pets(tmp_path_factory) -> Path:
    """A flat folder of ``<breed>_<n>.jpg``: three breeds of the pets sample, else synthetic colours."""
    folder = tmp_path_factory.mktemp("pets")
    if PETS_SAMPLE.is_dir():
        for breed in BREEDS:
            for path in sorted(PETS_SAMPLE.glob(f"{breed}_*.jpg")):
                (folder / path.name).symlink_to(path)
    if len(list(folder.iterdir())) < 3 * len(BREEDS):
        classes = make_class_folders(tmp_path_factory.mktemp("colours"), n=10, size=64)
        for path in classes.glob("*/*.png"):
            shutil.copy(path, folder / path.name)  # red/red_0.png -> red_0.png
    return folder


@pytest.fixture(scope="module")
def kernels(tmp_path_factory) -> Path:
    """A Jupyter data folder whose ``python3`` kernel is this Python (whatever else is installed)."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "imgtune", "language": "python"}))
    return root


def execute(name: str, workdir: Path, kernels: Path, env: dict) -> nbformat.NotebookNode:
    """Run every cell of ``examples/<name>`` in a fresh kernel started in ``workdir`` with ``env`` set."""
    nb = nbformat.read(EXAMPLES / name, as_version=4)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JUPYTER_PATH", str(kernels))
        patch.setenv("IMGTUNE_CACHE", str(workdir / "cache"))
        patch.setenv("HF_HUB_OFFLINE", "1")
        for key, value in {**SETTINGS, **env}.items():
            patch.setenv(key, value)
        client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                         resources={"metadata": {"path": str(workdir)}})
        try:
            client.execute()  # a cell that raises fails the test with its traceback
        finally:  # the executed notebook, outputs and cell timings included, for a look after a failure
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, ARTIFACTS / name.replace(".ipynb", ".executed.ipynb"))
    return nb


def outputs_of(nb, text: str) -> list:
    """The outputs of the code cell whose source contains ``text``."""
    cells = [c for c in nb.cells if c.cell_type == "code" and text in c.source]
    assert cells, f"no cell with {text!r}"
    return cells[0].outputs


def printed(outputs) -> str:
    return "".join(o.get("text", "") for o in outputs if o.output_type == "stream")


def shows(outputs, mime: str) -> bool:
    return any(mime in o.get("data", {}) for o in outputs if o.output_type in ("display_data", "execute_result"))


def check_figures(nb) -> int:
    """Every cell that draws a figure showed a PNG; returns how many did."""
    drawn = 0
    for cell in nb.cells:
        if cell.cell_type == "code" and any(call in cell.source for call in FIGURES):
            assert shows(cell.outputs, "image/png"), f"no figure from:\n{cell.source}\n{cell.outputs}"
            drawn += 1
    return drawn


def accuracy(outputs) -> float:
    found = re.search(r"accuracy: (\d\.\d{3})", printed(outputs))
    assert found, printed(outputs)
    return float(found.group(1))


@pytest.fixture(scope="module")
def lesson1(pets, kernels, tmp_path_factory):
    return execute("lesson1.ipynb", tmp_path_factory.mktemp("lesson1"), kernels, {"IMGTUNE_PETS": str(pets)})


@pytest.mark.slow
def test_lesson1_runs_and_shows_its_figures(lesson1, pets):
    assert check_figures(lesson1) == 7
    assert 0.0 <= accuracy(outputs_of(lesson1, "learn.plot_losses()")) <= 1.0
    assert 0.0 <= accuracy(outputs_of(lesson1, "fit_one_cycle(UNFROZEN_EPOCHS")) <= 1.0
    train, valid = re.search(r"3 classes, (\d+) train / (\d+) valid images",
                             printed(outputs_of(lesson1, "data.summary()"))).groups()
    assert int(train) + int(valid) == len(list(pets.iterdir()))
    assert "suggested learning rate" in printed(outputs_of(lesson1, "lr.plot()"))
    for call in ("interp.most_confused()", "predictor.predict("):
        assert shows(outputs_of(lesson1, call), "text/html"), call  # the tables a notebook shows
    assert printed(outputs_of(lesson1, "export_onnx(")).strip().endswith("model.onnx")
    # Training progress in a kernel: tqdm's widget (ipywidgets is installed), epoch lines, no carriage returns.
    training = outputs_of(lesson1, "learn.fine_tune(")
    assert shows(training, "application/vnd.jupyter.widget-view+json")
    assert "epoch 1/1" in printed(training) and "\r" not in printed(training)


@pytest.fixture
def url_list(pets, tmp_path):
    """The pets subset served over HTTP on 127.0.0.1, and a CSV of ``url,label`` for it."""
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(pets))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    rows = [f"http://127.0.0.1:{server.server_port}/{p.name},{p.name.rsplit('_', 1)[0]}"
            for p in sorted(pets.iterdir())]
    csv = tmp_path / "urls.csv"
    csv.write_text("url,label\n" + "\n".join(rows) + "\n")
    yield csv, len(rows)
    server.shutdown()
    server.server_close()


@pytest.mark.slow
def test_own_images_downloads_checks_trains_and_predicts(url_list, kernels, tmp_path):
    csv, count = url_list
    nb = execute("own_images.ipynb", tmp_path, kernels, {"IMGTUNE_URLS": str(csv)})
    assert f"{count} downloaded" in printed(outputs_of(nb, "download_images("))
    assert "classes" in printed(outputs_of(nb, "imgtune.diagnose("))
    assert check_figures(nb) == 1
    assert 0.0 <= accuracy(outputs_of(nb, "run.learner.plot_losses()")) <= 1.0
    assert shows(outputs_of(nb, "imgtune.run_training("), "text/html")  # the run's table
    assert "the model says" in printed(outputs_of(nb, "find_mislabels("))
    assert "imgtune clean" in printed(outputs_of(nb, 'print(f"imgtune clean'))
    assert shows(outputs_of(nb, "predictor.predict("), "text/html")
    assert (tmp_path / "runs" / "mine" / "history.csv").is_file()


@pytest.mark.slow
def test_the_lesson_rendered_to_html_shows_its_figures_in_chromium(lesson1):
    executable = chromium_or_skip()
    from nbconvert import HTMLExporter
    from playwright.sync_api import sync_playwright

    artifacts = ARTIFACTS
    artifacts.mkdir(parents=True, exist_ok=True)
    html, _ = HTMLExporter().from_notebook_node(lesson1)
    page_file = artifacts / "lesson1.html"
    page_file.write_text(html, encoding="utf-8")
    with sync_playwright() as p:
        browser = launch_chromium(p, executable)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(page_file.as_uri())
        page.wait_for_load_state("load")
        sizes = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.naturalWidth, i.naturalHeight])")
        heading = page.inner_text("h1")
        page.screenshot(path=str(artifacts / "lesson1.png"), full_page=True)
        browser.close()
    assert "Lesson 1" in heading
    assert len([s for s in sizes if s[0] > 100 and s[1] > 100]) >= 7  # every figure decoded and drawn
