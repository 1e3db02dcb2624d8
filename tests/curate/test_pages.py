"""The curate pages come from the package's templates, escape what the data names, and fetch nothing."""

from __future__ import annotations

import csv
import fnmatch
import importlib.resources
import shutil
from pathlib import Path

import pytest

from conftest import make_class_folders
from imgtune.curate import pages
from imgtune.curate.doctor import diagnose, gallery

HOSTILE = "</script><script>alert(1)</script>"
TEMPLATES = ["doctor.html", "clean.html", "clean.js"]


def test_the_templates_are_package_data_and_render_from_the_package():
    folder = importlib.resources.files("imgtune.curate") / "templates"
    shipped = sorted(entry.name for entry in folder.iterdir() if entry.is_file())
    assert shipped == sorted(TEMPLATES)
    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parents[2]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["*"]
    assert all(any(fnmatch.fnmatch(f"templates/{name}", p) for p in patterns) for name in shipped)
    loader = pages.environment().loader
    assert all(loader.get_source(pages.environment(), name)[1].startswith(str(Path(str(folder))))
               for name in TEMPLATES)
    assert pages.environment().autoescape is True


def test_a_hostile_label_is_text_in_the_doctors_gallery(tmp_path):
    root = make_class_folders(tmp_path / "data", n=3)
    shutil.copy(root / "red" / "red_0.png", root / "copy.png")  # the same picture under a second label
    rows = [(f"{c}/{c}_{i}.png", c) for c in ("red", "green") for i in range(3)] + [("copy.png", HOSTILE)]
    with open(tmp_path / "labels.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("file", "label"), *rows])
    diagnosis = diagnose(root, csv_path=tmp_path / "labels.csv", mislabels=0, min_side=1)
    assert any(HOSTILE in problem.detail for problem in diagnosis.problems)  # a conflict names the label
    page = gallery(diagnosis)
    assert "<script" not in page and "alert(1)" in page
    assert "&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count("data:image/jpeg;base64,") == 2  # the two copies of the conflict


def test_a_hostile_folder_name_is_text_in_the_cleaners_page(tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from imgtune.curate.clean import CleanSession, create_app

    name = "<img src=x onerror=alert(1)>"
    root = make_class_folders(tmp_path / name, n=4)
    session = CleanSession(root, features=_mean_colour)
    page = TestClient(create_app(session), base_url="http://127.0.0.1").get("/").text
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert page.count("<script>") == 1 and '"use strict";' in page  # the page's own script, inline
    for needle in ("http://", "https://", "<link", "<script src"):
        assert needle not in page


def _mean_colour(paths):
    import numpy as np
    import torch
    from PIL import Image

    return torch.tensor(np.array([np.asarray(Image.open(p).convert("RGB"), dtype=np.float32).mean((0, 1)) / 255
                                  for p in paths]))
