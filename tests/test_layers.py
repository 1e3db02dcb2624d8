"""The layering contracts in pyproject.toml: the tree keeps them, and a forbidden import breaks them.

Each case copies the package beside pyproject.toml into a temporary folder, adds one small module
that imports what its layer must not, and runs ``lint-imports`` there.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(where: Path, *contracts: str) -> subprocess.CompletedProcess:
    """``lint-imports`` on the package in ``where``, limited to the contracts with these ids (all if none)."""
    limit = [arg for contract in contracts for arg in ("--contract", contract)]
    return subprocess.run([str(LINT_IMPORTS), "--no-logo", "--no-cache", *limit], check=False, cwd=where,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def tree(tmp_path):
    """A copy of the package and its pyproject.toml that a test may change."""
    shutil.copytree(ROOT / "imgtune", tmp_path / "imgtune", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def test_the_tree_keeps_every_contract():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_the_copy_is_the_one_checked(tree):
    """A control for the cases below: unchanged, the copy keeps every contract."""
    (tree / "imgtune" / "data" / "probe.py").write_text("import imgtune.errors\n")
    result = lint_imports(tree)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "files, broken",
    [
        # A lazy import inside a function counts too.
        ({"data/probe.py": "def f():\n    import imgtune.train.learner\n"}, "layers"),
        ({"models_probe.py": ""}, "layers"),  # a new top-level module must be given a layer
        ({"deploy/probe.py": "import imgtune.train.run\n"}, "no-training-to-predict"),
        ({"serve/probe.py": "from imgtune.train import learner\n"}, "no-training-to-predict"),
        ({"explain/probe.py": "import imgtune.cli.train\n"}, "layers"),
        ({"data/probe.py": "import imgtune.data.probe_b\n", "data/probe_b.py": "import imgtune.data.probe\n"},
         "acyclic"),
    ],
)
def test_a_forbidden_import_breaks_a_contract(tree, files, broken):
    for module, source in files.items():
        (tree / "imgtune" / module).write_text(source)
    result = lint_imports(tree, broken)
    assert result.returncode != 0, result.stdout
    assert "BROKEN" in result.stdout and "1 broken" in result.stdout


def test_a_base_module_must_not_import_the_cli(tree):
    with (tree / "imgtune" / "errors.py").open("a") as errors:
        errors.write("\n\ndef probe():\n    import imgtune.cli\n")
    result = lint_imports(tree, "layers")
    assert result.returncode != 0 and "imgtune.errors -> imgtune.cli" in result.stdout, result.stdout


def test_serve_may_sit_above_train_in_the_layers_but_not_import_it(tree):
    (tree / "imgtune" / "serve" / "probe.py").write_text("import imgtune.train.learner\n")
    assert lint_imports(tree, "layers").returncode == 0
    assert lint_imports(tree, "no-training-to-predict").returncode != 0
