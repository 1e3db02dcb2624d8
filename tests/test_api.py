"""The public API: a sorted ``__all__`` whose every name can be imported from ``imgtune``."""

import importlib

import imgtune


def test_all_is_sorted_and_has_no_duplicates():
    assert imgtune.__all__ == sorted(imgtune.__all__)
    assert len(set(imgtune.__all__)) == len(imgtune.__all__)


def test_every_public_name_is_importable():
    for name in imgtune.__all__:
        assert getattr(importlib.import_module("imgtune"), name, None) is not None, name
        namespace = {}
        exec(f"from imgtune import {name}", namespace)
        assert namespace[name] is getattr(imgtune, name)


def test_the_main_entry_points_are_public():
    for name in ("Learner", "Predictor", "Prediction", "create_model", "load_data", "ImgtuneError", "REGISTRY"):
        assert name in imgtune.__all__


def test_the_version_is_a_string():
    assert isinstance(imgtune.__version__, str) and imgtune.__version__.count(".") >= 1
