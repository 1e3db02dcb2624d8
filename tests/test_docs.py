"""Help that works everywhere: every public name has a docstring with its arguments, and ``imgtune.doc``
prints it with the README section about it, as plain text."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

import imgtune
from imgtune import help as imgtune_help

#: Public names that are data, not code (a docstring cannot be attached to them).
CONSTANTS = {"CATALOGUE", "PETS_LABEL_RE", "REGISTRY", "__version__"}


def public_objects():
    """``(name, object)`` for every public callable and the public methods and properties of each class."""
    for name in imgtune.__all__:
        if name in CONSTANTS:
            continue
        value = getattr(imgtune, name)
        yield name, value
        if inspect.isclass(value):
            for attribute, member in vars(value).items():
                if attribute.startswith("_"):
                    continue
                if isinstance(member, (classmethod, staticmethod)):
                    member = member.__func__
                if inspect.isfunction(member) or isinstance(member, property):
                    yield f"{name}.{attribute}", member


def parameters(obj) -> list[str]:
    """The parameters a caller passes (``self``, ``cls`` left out)."""
    if inspect.isclass(obj):
        owners = [c for c in obj.__mro__ if "__init__" in vars(c)]
        if not owners[0].__module__.startswith("imgtune"):  # e.g. Exception's (*args, **kwargs)
            return []
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return []
    return [p for p in signature.parameters if p not in ("self", "cls")]


def docstring(obj) -> str:
    """The docstring a reader sees: a class's own, then its ``__init__``'s; none for dataclasses' generated ones."""
    doc = inspect.getdoc(obj) or ""
    if inspect.isclass(obj):
        if doc.startswith(f"{obj.__name__}(") or doc == inspect.getdoc(object):
            doc = ""
        init = vars(obj).get("__init__")
        doc += "\n" + (inspect.getdoc(init) or "" if init else "")
    return doc.strip()


def test_imgtune_all_is_sorted_and_every_name_resolves():
    names = [n for n in imgtune.__all__ if n != "__version__"]
    assert names == sorted(names) and "doc" in imgtune.__all__
    for name in imgtune.__all__:
        getattr(imgtune, name)


def test_every_public_function_class_and_method_has_a_docstring_with_its_arguments():
    missing, no_args = [], []
    for name, obj in public_objects():
        doc = docstring(obj)
        if not doc:
            missing.append(name)
            continue
        if isinstance(obj, property):
            continue
        needs_args = parameters(obj) and not (inspect.isclass(obj) and dataclasses.is_dataclass(obj))
        section = "Args:" in doc or (inspect.isclass(obj) and "Attributes:" in doc)
        if needs_args and not section:
            no_args.append(f"{name}({', '.join(parameters(obj))})")
    assert not missing, "no docstring: " + ", ".join(missing)
    assert not no_args, "no Args: section: " + ", ".join(no_args)


def test_the_walk_sees_what_it_must():
    names = dict(public_objects())
    assert {"Learner", "Learner.fine_tune", "Learner.history", "Interpretation.plot_top_losses", "load_data",
            "doc"} <= set(names)
    assert "CATALOGUE" not in names and not any(".__" in n for n in names)
    assert parameters(imgtune.load_data)[0] == "source" and "self" not in parameters(imgtune.Learner.fine_tune)


def test_doc_prints_the_signature_the_docstring_and_the_readme_section(capsys):
    imgtune.doc(imgtune.load_data)
    text = capsys.readouterr().out
    assert text.startswith("imgtune.load_data(source")
    assert "Args:\n    source:" in text
    assert "README: " in text and "imgtune.load_data(" in text.split("README: ", 1)[1]
    assert "\x1b[" not in text  # plain text: no terminal colours

    imgtune.doc("Learner.fine_tune")  # a dotted name works as well as the object
    text = capsys.readouterr().out
    assert text.startswith("imgtune.Learner.fine_tune(self, epochs") and "The lesson's recipe" in text

    imgtune.doc(imgtune.PETS_LABEL_RE)
    assert capsys.readouterr().out.startswith("imgtune.PETS_LABEL_RE = '^(.+)")

    with pytest.raises(AttributeError):
        imgtune.doc("Learner.no_such_method")


def test_doc_reads_the_readme_from_the_package_metadata_without_a_checkout(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(imgtune_help, "_CHECKOUT_README", tmp_path / "README.md")  # as in an installed wheel

    class Metadata:
        def get_payload(self):
            return "# imgtune\n\n## Python API\n\nCall `imgtune.load_data(...)` first.\n"

    monkeypatch.setattr(imgtune_help.importlib.metadata, "metadata", lambda name: Metadata())
    imgtune.doc(imgtune.load_data)
    text = capsys.readouterr().out
    assert "README: Python API" in text and "Call `imgtune.load_data(...)` first." in text

    def not_installed(name):
        raise imgtune_help.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(imgtune_help.importlib.metadata, "metadata", not_installed)
    imgtune.doc(imgtune.load_data)
    text = capsys.readouterr().out
    assert "Find, check and split" in text and "README: not installed" in text


def test_readme_sections_skip_headings_inside_code_blocks():
    text = "intro\n# Title\nbody\n```sh\n# a comment, not a heading\n```\n## Next\nmore `load_data(` here\n"
    sections = imgtune_help.readme_sections(text)
    assert [h for h, _ in sections] == ["", "Title", "Next"]
    assert "# a comment" in sections[1][1]
    assert imgtune_help.find_section(["load_data"], text)[0] == "Next"
    assert imgtune_help.find_section(["nothing_like_this"], text) is None
