"""The GPU check must work where it is needed, on a machine this project rarely has: its smoke run (a
tiny network, a few steps) goes through every step on the CPU, and its record survives a failed step
and a crash."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def gpu_check(tmp_path, *options) -> tuple[subprocess.CompletedProcess, dict | None]:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--device", "cpu", "--quick",
                           "--results", str(tmp_path), *options], capture_output=True, text=True, timeout=600,
                          check=False)
    records = [json.loads(p.read_text()) for p in tmp_path.glob("gpu-*-quick.json")]
    assert len(records) <= 1
    return done, records[0] if records else None


@pytest.mark.slow
def test_the_gpu_check_runs_every_step_in_its_quick_mode(tmp_path):
    done, record = gpu_check(tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    steps = record["steps"]
    assert list(steps) == ["device", "precision", "train_step", "loader", "features", "out_of_memory", "sync_bn",
                           "predictor", "end_to_end", "compile"]
    assert record["finished"] and not record["failed"]
    assert steps["precision"]["chosen"] == "fp32" and steps["precision"]["default_batch"] == 32
    assert steps["train_step"]["test_efficientnet"]["bs4"]["images_per_s"] > 0
    assert steps["loader"]["cache_warm_images_per_s"] > 0 and steps["features"]["images_per_s"] > 0
    assert steps["sync_bn"]["equal"] and steps["sync_bn"]["relu6_kept"] > 0
    for name in ("out_of_memory", "predictor", "compile"):  # what needs CUDA says so
        assert "CUDA" in steps[name]["skipped"]
    phases = [phase for phase, _ in steps["end_to_end"]["history"]]
    assert phases[-1] == "unfrozen" and set(phases[:-1]) == {"frozen"}


def test_a_failed_step_is_recorded_and_the_others_keep_their_figures(tmp_path):
    done, record = gpu_check(tmp_path, "--steps", "device", "precision", "sync_bn", "--fail-step", "precision")
    assert done.returncode == 1
    assert record["failed"] == ["precision"] and record["finished"]
    assert "failed on purpose" in record["steps"]["precision"]["error"]
    assert record["steps"]["device"]["torch"] and record["steps"]["sync_bn"]["equal"]  # before and after it


def test_a_crash_leaves_the_record_of_every_step_before_it(tmp_path):
    """The JSON is rewritten after every step: a crash (here a hard exit) loses only the step it hit."""
    done, record = gpu_check(tmp_path, "--steps", "device", "precision", "sync_bn", "--crash-step", "sync_bn")
    assert done.returncode == 3
    assert list(record["steps"]) == ["device", "precision"] and not record["finished"]
    assert record["steps"]["precision"]["chosen"] == "fp32"
