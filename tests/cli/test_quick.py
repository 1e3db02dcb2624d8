"""The quick CLI: help, usage errors and `imgtune datasets` answer without importing torch."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest

from imgtune.cli import cli


def command_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command and subcommand of ``group`` as its words, e.g. ``("cache", "info")``."""
    paths = []
    for name, command in sorted(group.commands.items()):
        paths.append((*prefix, name))
        if isinstance(command, click.Group):
            paths += command_paths(command, (*prefix, name))
    return paths


def run_imgtune(*args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """``python -X importtime -m imgtune ARGS``, and the modules it imported."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "imgtune", *args], check=False, capture_output=True,
                            text=True, timeout=120)
    modules = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    return result, modules


def torch_modules(modules: set[str]) -> set[str]:
    return {m for m in modules if m == "torch" or m.startswith("torch.")}


def test_every_command_is_found():
    paths = command_paths(cli)
    for expected in [("train",), ("lr-find",), ("predict",), ("export",), ("serve",), ("interpret",), ("download",),
                     ("doctor",), ("clean",), ("datasets",), ("cache", "info"), ("cache", "clear"), ("render",)]:
        assert expected in paths


@pytest.mark.parametrize("words", [(), *command_paths(cli)], ids=lambda words: " ".join(words) or "imgtune")
def test_help_imports_no_torch(words):
    result, modules = run_imgtune(*words, "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Usage: imgtune" in result.stdout
    assert not torch_modules(modules)


def test_datasets_imports_no_torch():
    result, modules = run_imgtune("datasets")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "elpv" in result.stdout
    assert not torch_modules(modules)


@pytest.mark.parametrize("args", [["train", "--no-such-option"], ["train", "--lr", "fast"], ["predict"],
                                  ["train", "--epochs", "three"], ["no-such-command"]])
def test_usage_errors_import_no_torch(args):
    result, modules = run_imgtune(*args)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].startswith("imgtune: error: ")
    assert not torch_modules(modules)


def test_debug_is_an_option_of_imgtune_only():
    result, _ = run_imgtune("train", "--debug")
    assert result.returncode == 2 and "No such option '--debug'" in result.stderr
    assert "--debug" in run_imgtune("--help")[0].stdout
