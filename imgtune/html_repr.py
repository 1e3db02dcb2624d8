"""HTML for notebooks: the ``_repr_html_`` of imgtune's results as small self-contained tables.

Jupyter shows what an object's ``_repr_html_()`` returns instead of its ``repr``. The tables here come
from Jinja2 templates with autoescape, so a class name such as ``<script>`` stays text; they use
inline styles only (no script, no external style sheet, font or image) and show at most
:data:`MAX_ROWS` rows, then a line saying how many more there are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache

import jinja2
from markupsafe import Markup

#: Rows a table shows at most; the others are counted in its last line.
MAX_ROWS = 20
#: The width in pixels of a probability bar at 100%.
BAR_WIDTH = 80

_CELL = "padding:2px 8px;border-bottom:1px solid #ddd;"
TABLE = (
    '<table style="border-collapse:collapse;font-size:13px;margin:4px 0">'
    '{% if caption %}<caption style="text-align:left;font-weight:bold;padding:2px 8px">{{ caption }}</caption>'
    '{% endif %}<thead><tr>{% for name in header %}'
    '<th style="' + _CELL + 'text-align:left">{{ name }}</th>{% endfor %}</tr></thead><tbody>'
    '{% for row in rows %}<tr>{% for cell in row %}'
    '<td style="' + _CELL + '{% if cell is number %}text-align:right;font-variant-numeric:tabular-nums{% endif %}">'
    '{{ cell | cell_text }}</td>{% endfor %}</tr>{% endfor %}'
    '{% if more %}<tr><td colspan="{{ header | length }}" style="' + _CELL + 'color:#666">'
    '... {{ more }} more</td></tr>{% endif %}</tbody></table>'
)
BAR = ('<span style="display:inline-block;vertical-align:middle;width:{{ width }}px;height:9px;'
       'background:#eee"><span style="display:block;width:{{ filled }}px;height:9px;background:#3b75af">'
       '</span></span>')
PROBABILITY = '<span style="white-space:nowrap">{{ label }} {{ bar }} {{ percent }}</span>'


@cache
def _template(source: str) -> jinja2.Template:
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    env.filters["cell_text"] = cell_text
    return env.from_string(source)


def render(source: str, **values) -> Markup:
    """Render the template text ``source`` with autoescape on; the result is markup (not escaped again)."""
    return Markup(_template(source).render(**values))


def cell_text(value) -> str:
    """A table cell's text: floats to 4 significant digits (NaN as "-"), anything else as ``str``."""
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    return value if isinstance(value, Markup) else str(value)


def table(header: Sequence[str], rows: Sequence[Sequence], *, caption: str = "", max_rows: int = MAX_ROWS) -> Markup:
    """An HTML table, numbers right-aligned, at most ``max_rows`` rows and then ``... N more``.

    Args:
        header: the column names.
        rows: the cells, row by row; a ``Markup`` cell (e.g. a :func:`bar`) is inserted as it is,
            anything else is escaped.
        caption: a title above the table.
        max_rows: rows shown at most.

    Returns:
        The table as markup.
    """
    rows = list(rows)
    return render(TABLE, header=list(header), rows=rows[:max_rows], more=max(0, len(rows) - max_rows),
                  caption=caption)


def bar(fraction: float, *, width: int = BAR_WIDTH) -> Markup:
    """A small horizontal bar filled to ``fraction`` (clipped to [0, 1]) of ``width`` pixels."""
    fraction = min(1.0, max(0.0, float(fraction))) if math.isfinite(fraction) else 0.0
    return render(BAR, width=int(width), filled=round(fraction * width))


def probability(label: str, p: float) -> Markup:
    """``label``, a bar of ``p`` and ``p`` as a percentage, on one line."""
    return render(PROBABILITY, label=label, bar=bar(p), percent=f"{100 * p:.1f}%")


def top_k_table(top_k: Sequence[Sequence[tuple[str, float]]], *, names: Sequence[str] | None = None) -> Markup:
    """Predictions as a table: one image as a row per class with its bar; several as a row per image.

    Args:
        top_k: for each image its most likely ``(class, probability)`` pairs, most likely first (as
            :meth:`imgtune.deploy.predict.Prediction.top_k` gives them).
        names: what to call each image (default ``1``, ``2``, ...).

    Returns:
        The table as markup, at most :data:`MAX_ROWS` images.
    """
    if len(top_k) == 1:
        return table(["class", "probability", ""], [[label, f"{100 * p:.1f}%", bar(p)] for label, p in top_k[0]])
    names = list(names) if names is not None else [str(i + 1) for i in range(len(top_k))]
    k = max((len(row) for row in top_k), default=0)
    header = ["image", "prediction", *(f"top {i + 1}" for i in range(1, k))]
    rows = [[name, *(probability(label, p) for label, p in row)] for name, row in zip(names, top_k)]
    return table(header, rows, caption=f"{len(top_k)} images")
