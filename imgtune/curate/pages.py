"""The HTML pages of curate, rendered from the Jinja2 templates in ``templates/`` (package data).

Autoescape is on: a class name or a file name such as ``<script>`` shows as text. The pages are
self-contained: styles and scripts inline, pictures as ``data:`` URIs, nothing fetched from elsewhere.
"""

from __future__ import annotations

import base64
import functools
import io
from pathlib import Path

import jinja2

from imgtune.data.images import decode_image
from imgtune.errors import UnreadableImageError


@functools.cache
def environment() -> jinja2.Environment:
    """The template environment: the templates of the installed package, autoescaped, strict about names."""
    return jinja2.Environment(
        loader=jinja2.PackageLoader("imgtune.curate", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,  # a misspelt name fails the render instead of showing nothing
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render(name: str, **context) -> str:
    """The template ``name`` (e.g. ``"doctor.html"``) filled with ``context``.

    Returns:
        The page's HTML.
    """
    return environment().get_template(name).render(**context)


def jpeg_data_uri(path: str | Path, size: int, *, quality: int = 80) -> str | None:
    """A thumbnail of at most ``size`` pixels a side as a ``data:image/jpeg;base64,...`` URI.

    Returns:
        The URI, or ``None`` for a file that cannot be read as an image.
    """
    try:
        image = decode_image(Path(path), min_size=size)
    except (UnreadableImageError, OSError):
        return None
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return f"data:image/jpeg;base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"
