"""``imgtune.doc(obj)``: help as plain text, anywhere (a terminal, a notebook, a CI log), no browser.

It prints an object's signature, its docstring and the README section that says most about it. The
README comes from the source checkout when imgtune runs from one, else from the installed package's
metadata: ``pyproject.toml`` makes README.md the package's long description, so every wheel carries it
in its ``METADATA`` and no copy is kept in the package. Where neither is there (a stripped install),
the README part is left out with a line saying so.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import re
from pathlib import Path

#: Lines of a README section shown at most; the rest is cut with a note.
MAX_SECTION_LINES = 40
_CHECKOUT_README = Path(__file__).resolve().parent.parent / "README.md"


def readme_text() -> str | None:
    """The README: the checkout's ``README.md``, else the installed package's long description.

    Returns:
        Its Markdown text, or ``None`` when neither is available.
    """
    if _CHECKOUT_README.is_file():
        return _CHECKOUT_README.read_text(encoding="utf-8")
    try:
        meta = importlib.metadata.metadata("imgtune")
    except importlib.metadata.PackageNotFoundError:
        return None
    body = meta.get_payload() if hasattr(meta, "get_payload") else None
    return body or meta.get("Description") or None


def readme_sections(text: str) -> list[tuple[str, str]]:
    """Split Markdown into ``(heading, body)`` at its ``#`` headings (not those inside code blocks).

    Args:
        text: the Markdown.

    Returns:
        The sections in order; text before the first heading has the heading ``""``.
    """
    sections: list[tuple[str, list[str]]] = [("", [])]
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and re.match(r"#{1,4} ", line):
            sections.append((line.lstrip("#").strip(), []))
        else:
            sections[-1][1].append(line)
    return [(heading, "\n".join(lines).strip()) for heading, lines in sections if heading or "".join(lines).strip()]


def find_section(names: list[str], text: str) -> tuple[str, str] | None:
    """The README section that mentions ``names[0]`` as code most often (then ``names[1]``, ...).

    Args:
        names: the words to look for, most specific first (``["fine_tune", "Learner"]``).
        text: the README's Markdown.

    Returns:
        ``(heading, body)``, or ``None`` when no section mentions any of them.
    """
    sections = readme_sections(text)
    for name in names:
        # Mentions as code only (``.name``, ``name(``, a backticked name), not the word in a sentence.
        word = re.escape(name)
        pattern = re.compile(rf"\.{word}\b|\b{word}\(|`{word}[`(\[]")
        counts = [len(pattern.findall(body)) for _, body in sections]
        if max(counts, default=0) > 0:
            return sections[counts.index(max(counts))]
    return None


def _resolve(obj) -> tuple[str, object]:
    """``(public name, object)`` for an object or a dotted name relative to ``imgtune``."""
    import imgtune

    if isinstance(obj, str) and re.fullmatch(r"[A-Za-z_][\w.]*", obj):
        dotted = obj.removeprefix("imgtune.")
        value = imgtune
        for part in dotted.split("."):
            value = getattr(value, part)
        return f"imgtune.{dotted}", value
    for public in imgtune.__all__:
        if getattr(imgtune, public) is obj:
            return f"imgtune.{public}", obj
    owner, _, rest = getattr(getattr(obj, "fget", obj), "__qualname__", "").partition(".")
    if owner in imgtune.__all__ and rest:  # a method or property of a public class
        return f"imgtune.{owner}.{rest}", obj
    return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', type(obj).__name__)}", obj


def doc_text(obj) -> str:
    """What :func:`doc` prints, as a string.

    Args:
        obj: a public imgtune object (``imgtune.Learner.fine_tune``) or its dotted name (``"Learner.fine_tune"``).

    Returns:
        The signature, the docstring and the README section, as plain text.
    """
    name, value = _resolve(obj)
    lines = []
    if isinstance(value, property):
        lines += [f"{name} (a property)", "", inspect.getdoc(value) or "(no docstring)"]
    elif callable(value):
        try:
            lines.append(f"{name}{inspect.signature(value)}")
        except (TypeError, ValueError):
            lines.append(name)
        lines += ["", inspect.getdoc(value) or "(no docstring)"]
        if inspect.isclass(value):
            methods = [m for m, v in vars(value).items() if not m.startswith("_") and callable(v)
                       or isinstance(v, (classmethod, staticmethod, property))]
            if methods:
                lines += ["", "Methods and properties: " + ", ".join(sorted(methods))]
    else:
        shown = repr(value)
        lines.append(f"{name} = {shown if len(shown) < 200 else shown[:200] + ' ...'}")
    text = readme_text()
    words = [part for part in reversed(name.split(".")[1:]) if part]
    section = find_section(words, text) if text else None
    if text is None:
        lines += ["", "README: not installed with this copy of imgtune (see the project's README.md)."]
    elif section is not None:
        heading, body = section
        body_lines = body.splitlines()
        if len(body_lines) > MAX_SECTION_LINES:
            body_lines = body_lines[:MAX_SECTION_LINES] + [f"... (the rest of '{heading}' in README.md)"]
        lines += ["", f"README: {heading}", "-" * (8 + len(heading)), *body_lines]
    return "\n".join(lines)


def doc(obj) -> None:
    """Print an imgtune object's signature, its docstring and the README section about it, as plain text.

    Works the same in a terminal, a notebook or a log: nothing opens a browser. The README is read
    from the source checkout, else from the installed package's metadata (see :mod:`imgtune.help`).

    Args:
        obj: a public imgtune object (``imgtune.Learner.fine_tune``, ``imgtune.load_data``) or its
            dotted name relative to ``imgtune`` (``"Learner.fine_tune"``).

    Raises:
        AttributeError: a dotted name that imgtune does not have.
    """
    print(doc_text(obj))
