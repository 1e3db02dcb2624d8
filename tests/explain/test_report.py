"""The run report: figures are written, every section is there, a real browser renders it cleanly, every name
is escaped, nothing is fetched, and the templates ship with the package."""

from __future__ import annotations

import os
import re
from pathlib import Path

import jinja2
import pytest
from PIL import Image

from conftest import chromium_or_skip, launch_chromium, make_class_folders, watch_page
from imgtune.train.run import train

SECTIONS = ["Result", "Data", "Training images as the model sees them", "Learning-rate finder", "Training",
            "Per class", "Confusion matrix", "Most confused", "Top losses, with Grad-CAM", "Time",
            "Command and versions"]
FIGURES = ["lr_find.png", "training.png", "confusion_matrix.png", "top_losses.png", "samples.png"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    data = make_class_folders(root / "colours", n=8, size=32)
    (data / "red" / "broken.png").write_bytes(b"not a png")
    result = train(data, arch="test_efficientnet", weights="none", size=32, bs=6, num_workers=0, device="cpu",
                   epochs=1, freeze_epochs=1, progress=False, out=root / "run", valid_pct=0.25, stratify=True,
                   command="imgtune train colours")
    return result.run_dir


def test_figures_are_written_and_not_empty(run_dir):
    for name in FIGURES:
        image = Image.open(run_dir / name)
        assert image.format == "PNG" and image.width > 200 and image.height > 100, name
        colours = image.convert("L").getextrema()
        assert colours[0] < colours[1], f"{name} is blank"


def test_report_has_every_section(run_dir):
    page = (run_dir / "report.html").read_text()
    for section in SECTIONS:
        assert f"<h2>{section}</h2>" in page, section
    assert page.count("data:image/png;base64,") == len(FIGURES)
    assert "broken.png" in page  # skipped files are listed
    assert "imgtune train colours" in page
    # Self-contained: nothing is fetched from anywhere.
    for needle in ("<script", "http://", "https://", "<link", "@import", "url("):
        assert needle not in page, needle


@pytest.mark.parametrize("width, height, name", [(1200, 900, "report-desktop.png"), (390, 844, "report-phone.png")])
def test_report_in_a_real_browser(run_dir, width, height, name):
    from playwright.sync_api import sync_playwright

    artifacts = Path(os.environ.get("IMGTUNE_ARTIFACTS", run_dir.parent / "artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    errors, requests = [], []
    with sync_playwright() as p:
        browser = launch_chromium(p, chromium_or_skip())
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            watch_page(page, errors, requests)
            page.goto((run_dir / "report.html").as_uri())
            headings = page.locator("h2").all_inner_texts()
            widths = page.evaluate("() => Array.from(document.images).map(i => i.naturalWidth)")
            overflow = page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
            page.screenshot(path=str(artifacts / name), full_page=True)
        finally:
            browser.close()
    assert errors == []
    assert headings == SECTIONS
    assert len(widths) == len(FIGURES) and all(w > 0 for w in widths)  # every image decoded
    assert overflow <= 1, "the page scrolls sideways"
    assert all(url.startswith(("file:", "data:")) for url in requests)
    assert (artifacts / name).stat().st_size > 0


# --- the page on its own: a hand-made interpretation, hostile names, a stand-in lr finder ----------

HOSTILE = ["<b>", "a&b", "x\"y'z", "</script><script>alert(1)</script>"]


class StandInFinder:
    """What write_report needs of an lr finder: a plot() that gives a matplotlib figure."""

    def plot(self):
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6, 4), dpi=100)
        ax = fig.subplots()
        ax.plot([1e-5, 1e-3, 1e-1], [2.0, 1.0, 3.0])
        ax.set_xscale("log")
        return fig


def hostile_report(run_dir: Path, lr_finder=None) -> str:
    import numpy as np

    from imgtune.explain.interpret import Interpretation
    from imgtune.explain.report import write_report

    probs = np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 1, 0]] * 0.9 + 0.025
    interp = Interpretation(HOSTILE, probs, np.array([0, 1, 2, 3, 0, 1]))
    metrics = dict(
        data=dict(description="<i>folder</i> & co", counts={c: dict(train=3, valid=2) for c in HOSTILE}, train=12,
                  valid=6, skipped=[dict(path="/x/<img src=x onerror=alert(2)>.png", reason="a & b <c>")]),
        history=[dict(epoch=1, phase="frozen", train_loss=1.5, valid_loss=1.2, accuracy=0.5, seconds=2.3)],
        lr=dict(frozen=2e-3, unfrozen=[1e-5, 1e-3]), seconds=dict(train=1.2), device="cpu",
        command="imgtune train '<x>' && rm -r <y>", versions={"torch": "2<3"})
    meta = dict(arch="<arch>", timm_name="t&n", size=32, resize="crop", mean=[0.5] * 3, std=[0.2] * 3)
    run_dir.mkdir(parents=True, exist_ok=True)
    return write_report(run_dir, interp=interp, metrics=metrics, meta=meta, lr_finder=lr_finder).read_text()


def test_the_report_escapes_every_name_and_fetches_nothing(tmp_path):
    page = hostile_report(tmp_path / "run<1>", StandInFinder())
    for raw in ("<b>", "<i>", "<img src=x", "<script", "<x>", "<arch>", "a&b", "x\"y'z"):
        assert raw not in page, raw
    for escaped in ("&lt;b&gt;", "a&amp;b", "x&#34;y&#39;z", "&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;",
                    "&lt;i&gt;folder&lt;/i&gt; &amp; co", "/x/&lt;img src=x onerror=alert(2)&gt;.png",
                    "imgtune train &#39;&lt;x&gt;&#39; &amp;&amp; rm -r &lt;y&gt;", "&lt;arch&gt;", "2&lt;3",
                    "<title>imgtune run run&lt;1&gt;</title>"):
        assert escaped in page, escaped
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page)
    for needle in ("http://", "https://", "<link", "@import", "url("):
        assert needle not in page, needle


def test_the_lr_finder_figure_is_whatever_its_plot_gives(tmp_path):
    page = hostile_report(tmp_path / "with", StandInFinder())
    assert Image.open(tmp_path / "with" / "lr_find.png").size == (600, 400)
    assert 'alt="lr finder curve"' in page
    assert page.count("data:image/png;base64,") == 3  # the lr finder, training curves, confusion matrix
    page = hostile_report(tmp_path / "without")
    assert not (tmp_path / "without" / "lr_find.png").exists()
    assert "(lr finder curve: not available for this run)" in page
    assert page.count("data:image/png;base64,") == 2


def test_the_templates_ship_with_the_package():
    from importlib.resources import files

    from imgtune.explain.report import TEMPLATE, environment

    folder = files("imgtune.explain") / "templates"
    assert (folder / TEMPLATE).is_file() and (folder / "report.css").is_file()
    env = environment()
    assert isinstance(env.loader, jinja2.PackageLoader)
    assert set(env.list_templates()) <= {entry.name for entry in folder.iterdir()}
    assert env.from_string("{{ name }}").render(name="<b>&") == "&lt;b&gt;&amp;"  # autoescape on


def test_a_hostile_report_in_a_real_browser(tmp_path):
    from playwright.sync_api import sync_playwright

    hostile_report(tmp_path / "run", StandInFinder())
    errors, requests = [], []
    with sync_playwright() as p:
        browser = launch_chromium(p, chromium_or_skip())
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            watch_page(page, errors, requests)
            page.goto((tmp_path / "run" / "report.html").as_uri())
            injected = page.locator('b, i, script, img:not([src^="data:"])').count()
            first_column = page.locator("table").first.locator("tr td:first-child").all_inner_texts()
            command = page.locator("pre").inner_text()
        finally:
            browser.close()
    assert errors == [] and injected == 0
    assert first_column == HOSTILE
    assert command == "imgtune train '<x>' && rm -r <y>"
    assert all(url.startswith(("file:", "data:")) for url in requests)


def test_the_report_shows_the_macro_figures_and_the_classes_never_recognised():
    import numpy as np

    from imgtune.explain.interpret import Interpretation
    from imgtune.explain.report import render_report, report_values

    # 'rare' (2 images) is never predicted: 75% accuracy, balanced accuracy (1 + 1 + 0) / 3.
    probs = np.eye(3, dtype=np.float32)[[0, 0, 0, 0, 1, 1, 0, 0]]
    interp = Interpretation(["common", "other", "rare"], probs, np.array([0, 0, 0, 0, 1, 1, 2, 2]))
    meta = dict(arch="a", timm_name="t", size=32, resize="crop", tta="flip", training=dict(balance=True))
    history = [dict(epoch=1, phase="frozen", train_loss=1.0, valid_loss=0.9, accuracy=0.75, balanced_accuracy=2 / 3,
                    seconds=1.0)]
    values = report_values(interp=interp, metrics=dict(history=history), meta=meta)
    assert values["balanced_accuracy"] == pytest.approx(2 / 3) and values["macro_f1"] == pytest.approx(0.6)
    assert values["missed"] == ["rare"] and values["history"][0][5] == "66.67%"
    assert [row[0] for row in values["per_class"]] == ["common", "other", "rare", "macro avg"]
    page = render_report(title="t", interp=interp, metrics=dict(history=history), meta=meta, figures={})
    assert "balanced accuracy 66.67%" in page and "macro F1 0.600" in page
    assert "Never recognised: rare" in page
    assert "training loss weighted by inverse class frequency" in page
    assert "validation with test-time augmentation (flip)" in page
    assert "<th>balanced accuracy</th>" in page
    # A run without them says nothing of either.
    plain = render_report(title="t", interp=interp, metrics={}, meta=dict(arch="a", timm_name="t", size=32,
                                                                          resize="crop"), figures={})
    assert "weighted by inverse" not in plain and "test-time augmentation" not in plain
