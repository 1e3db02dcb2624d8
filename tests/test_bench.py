"""The GPU benchmark script must work where it is needed, on a machine this project rarely has: its
smoke run (tiny network, a few steps) goes through every path on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_gpu_benchmark_runs_end_to_end_in_its_quick_mode(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--device", "cpu", "--quick",
                           "--archs", "test_efficientnet", "--results", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (record,) = [json.loads(p.read_text()) for p in tmp_path.glob("gpu-*-quick.json")]
    network = record["networks"]["test_efficientnet"]
    assert all(network[k] > 0 for k in ("train_fp32_nchw", "train_fast", "inference_fast", "features_fast"))
    assert record["loader"]["loader_presize_cache"] > 0
    phases = [phase for phase, _ in record["train"]["history"]]
    assert phases[-1] == "unfrozen" and set(phases[:-1]) == {"frozen"}
