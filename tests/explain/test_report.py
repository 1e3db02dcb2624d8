"""The run report: figures are written, every section is there, and a real browser renders it cleanly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from conftest import chromium_or_skip, launch_chromium, make_class_folders
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
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
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
