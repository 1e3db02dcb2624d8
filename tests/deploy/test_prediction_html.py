"""A Prediction in a notebook: each image's top 3 as small bars, every class name escaped, long lists cut."""

from __future__ import annotations

import re

import numpy as np

from imgtune.deploy.predict import Prediction
from imgtune.html_repr import MAX_ROWS

HOSTILE = '<script>alert("x")</script>'
CLASSES = [HOSTILE, "cat & dog", "owl", "fox"]


def _bar_widths(page: str) -> list[int]:
    return [int(w) for w in re.findall(r"display:block;width:(\d+)px", page)]


def test_one_image_shows_its_top_3_with_bars_and_escaped_names():
    page = Prediction(CLASSES, np.array([[0.6, 0.3, 0.05, 0.05]], dtype=np.float32))._repr_html_()
    assert "<script" not in page and "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in page
    assert "cat &amp; dog" in page
    assert page.index("&lt;script&gt;") < page.index("cat &amp; dog") < page.index("owl"), "most likely first"
    assert ["60.0%", "30.0%", "5.0%"] == re.findall(r"\d+\.\d%", page)
    assert _bar_widths(page) == [48, 24, 4]  # of 80 px
    assert "fox" not in page, "the top 3 only"


def test_many_images_are_a_table_of_at_most_max_rows_then_a_count():
    probs = np.tile(np.array([[0.1, 0.2, 0.3, 0.4]], dtype=np.float32), (MAX_ROWS + 5, 1))
    page = Prediction(CLASSES, probs)._repr_html_()
    assert page.count("<tr>") == 1 + MAX_ROWS + 1  # header, rows, "... 5 more"
    assert "... 5 more" in page and f"{MAX_ROWS + 5} images" in page
    assert page.count("fox") == MAX_ROWS and "<script" not in page
    assert "http" not in page and "<link" not in page and "<img" not in page, "self-contained"
