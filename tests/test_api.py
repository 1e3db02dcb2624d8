"""The public API: a sorted ``__all__`` whose every name can be imported from ``imgtune``, lazily."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import imgtune


def imported_modules(*args: str) -> set[str]:
    """The modules a fresh ``python -X importtime ARGS`` imports (read from its stderr)."""
    result = subprocess.run([sys.executable, "-X", "importtime", *args], check=False, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}


def test_all_is_sorted_and_has_no_duplicates():
    assert imgtune.__all__ == sorted(imgtune.__all__)
    assert len(set(imgtune.__all__)) == len(imgtune.__all__)


def test_every_public_name_is_importable():
    for name in imgtune.__all__:
        assert getattr(importlib.import_module("imgtune"), name, None) is not None, name
        namespace = {}
        exec(f"from imgtune import {name}", namespace)
        assert namespace[name] is getattr(imgtune, name)


def test_every_lazy_name_is_public_and_listed_by_dir():
    assert set(imgtune._SOURCES) | {"__version__"} == set(imgtune.__all__)
    assert set(imgtune.__all__) <= set(dir(imgtune))


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        imgtune.no_such_name  # noqa: B018
    with pytest.raises(ImportError):
        exec("from imgtune import no_such_name", {})


def test_the_main_entry_points_are_public():
    for name in ("Learner", "Predictor", "Prediction", "create_model", "load_data", "ImgtuneError", "REGISTRY"):
        assert name in imgtune.__all__


def test_what_the_readme_uses_is_public():
    for name in ("run_training", "export_onnx", "load_predictor", "imagenet_features", "Interpretation",
                 "EarlyStopping"):
        assert name in imgtune.__all__
    from imgtune.train.run import train

    assert imgtune.run_training is train  # `imgtune.train` stays the subpackage


def test_the_version_is_a_string():
    assert isinstance(imgtune.__version__, str) and imgtune.__version__.count(".") >= 1


def test_importing_imgtune_imports_no_stage():
    modules = imported_modules("-c", "import imgtune")
    assert not {m for m in modules if m.startswith("imgtune.")}
    assert "torch" not in modules


@pytest.mark.parametrize("code", ["from imgtune import Predictor", "from imgtune import load_predictor",
                                  "import imgtune.serve.app"])
def test_a_predictor_loads_no_training_code(code):
    modules = imported_modules("-c", code)
    assert not {m for m in modules if m == "imgtune.train" or m.startswith("imgtune.train.")}


def test_the_help_imports_no_torch():
    modules = imported_modules("-m", "imgtune", "--help")
    assert "imgtune.cli" in modules
    assert not {m for m in modules if m == "torch" or m.startswith("torch.")}
