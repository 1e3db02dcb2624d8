"""The notebook tables: escaped cells, markup cells kept, numbers right-aligned, long tables cut."""

from __future__ import annotations

import re

from markupsafe import Markup

from imgtune.html_repr import bar, cell_text, table


def test_cells_are_escaped_and_markup_cells_are_kept():
    page = table(["<th>"], [["<b>bold</b>"], [bar(0.5)]])
    assert "&lt;th&gt;" in page and "&lt;b&gt;bold&lt;/b&gt;" in page
    assert 'width:40px' in page, "the bar is markup, inserted as it is"


def test_numbers_are_right_aligned_and_floats_short():
    page = table(["n", "x"], [[3, 0.123456]])
    assert page.count("text-align:right") == 2 and ">0.1235</td>" in page and ">3</td>" in page
    assert cell_text(float("nan")) == "-" and cell_text(Markup("<i>")) == "<i>"


def test_long_tables_stop_at_max_rows_and_count_the_rest():
    page = table(["i"], [[i] for i in range(7)], max_rows=3)
    assert page.count("<tr>") == 1 + 3 + 1 and "... 4 more" in page and ">3</td>" not in page


def test_bars_are_clipped():
    filled = [re.search(r"display:block;width:(\d+)px", bar(p)).group(1) for p in (-1, 0.25, 7, float("nan"))]
    assert filled == ["0", "20", "80", "0"]
