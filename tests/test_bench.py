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


# --- bench/quality.py, driven through a stand-in `imgtune` that trains nothing ---------------------

FAKE_IMGTUNE = '''
import json, os, sys
from pathlib import Path
args = sys.argv[1:]
if "--help" in args:
    print("  --tune-stages TEXT  stages to tune")
    sys.exit(0)
if "--fail" in args:
    sys.exit("failed on purpose")
cache = Path(os.environ["IMGTUNE_CACHE"])
if any(cache.iterdir()):
    sys.exit("the cache was not empty")
(cache / "features").mkdir()  # the next run must get a new one
out = Path(args[args.index("--out") + 1])
out.mkdir(parents=True)
accuracy = 0.5 if "--tune-stages" in args else 0.75
(out / "metrics.json").write_text(json.dumps(dict(valid_accuracy=accuracy, seconds=dict(total=0.1),
                                                  history=[dict(accuracy=accuracy, balanced_accuracy=accuracy - 0.1)])))
'''


def quality(tmp_path, *options) -> tuple[subprocess.CompletedProcess, dict]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    fake = tmp_path / "fake_imgtune.py"
    fake.write_text(FAKE_IMGTUNE)
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "quality.py"), "--quick", "--imgtune",
                           f"{sys.executable} {fake}", "--results", str(tmp_path / "results"), "--scratch",
                           str(tmp_path / "scratch"), *options], capture_output=True, text=True, timeout=300, check=False)
    records = list((tmp_path / "results").glob("quality-quick-*.json"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(records) == 1
    return done, json.loads(records[0].read_text())


def test_the_quality_bench_runs_each_configuration_with_an_empty_cache_and_reads_its_metrics(tmp_path):
    done, record = quality(tmp_path)
    runs = {run["config"]: run for run in record["runs"]}
    assert list(runs) == ["head-only", "default"]
    assert "--tune-stages 0" in runs["head-only"]["command"] and "--tune-stages" not in runs["default"]["command"]
    assert all(run["rc"] == 0 and run["wall_seconds"] > 0 and run["peak_process_mb"] > 0 for run in runs.values())
    assert runs["default"]["accuracy"] == 0.75 and runs["head-only"]["accuracy"] == 0.5
    assert runs["default"]["macro_recall"] == 0.65 and "balanced_accuracy" in runs["default"]["macro_recall_from"]
    assert "| synthetic (seed 42) | default | 75.0% | 0.650 |" in done.stdout


def test_the_quality_bench_records_a_failed_run_and_goes_on(tmp_path):
    done, record = quality(tmp_path, "--configs", "bad=--fail", "default")
    bad, good = record["runs"]
    assert bad["rc"] != 0 and "failed on purpose" in bad["error_tail"] and "accuracy" not in bad
    assert good["rc"] == 0 and good["accuracy"] == 0.75
    assert [row["failed"] for row in record["summary"]] == [1, 0]
    assert "(1 failed)" in done.stdout


# --- bench/serve_load.py: the side-by-side summary -------------------------------------------------

def test_the_serve_bench_compares_batched_and_alone_per_backend_and_round():
    import importlib.util

    spec = importlib.util.spec_from_file_location("serve_load", ROOT / "bench" / "serve_load.py")
    serve_load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve_load)

    def row(mode, round_, clients, requests_per_s, p99_ms=100.0, cam=False):
        return dict(mix="normal", backend="onnx", mode=mode, round=round_, clients=clients, cam=cam, errors=0,
                    requests_per_s=requests_per_s, p99_ms=p99_ms)

    rows = [row("alone", 1, 8, 20.0), row("batched", 1, 8, 50.0), row("alone", 1, 1, 9.0), row("batched", 1, 1, 9.0),
            row("alone", 2, 8, 30.0), row("batched", 2, 8, 42.0, p99_ms=450.0), row("batched", 1, 8, 1.0, cam=True)]
    found = serve_load.speedups(rows, clients=8)
    assert [(f["round"], round(f["speedup"], 2)) for f in found] == [(1, 2.5), (2, 1.4)]
    assert all(found[0]["targets_met"].values())
    assert found[1]["targets_met"] == dict(speedup_1_6=False, requests_per_s_40=True, p99_400_ms=False, no_errors=True)


def test_the_quality_table_merges_several_results_files(tmp_path):
    _, first = quality(tmp_path / "a")
    _, second = quality(tmp_path / "b", "--configs", "default")
    paths = [next((tmp_path / side / "results").glob("*.json")) for side in ("a", "b")]
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "quality.py"), "--table", *map(str, paths)],
                          capture_output=True, text=True, timeout=120, check=True)
    assert "| synthetic (seed 42,42) | default | 75.0% | 0.650 |" in done.stdout
    assert "| synthetic (seed 42) | head-only | 50.0% | 0.400 |" in done.stdout


# --- bench/scale.py: the generated class folders and the process tree's memory ----------------------

def test_the_scale_bench_makes_its_folders_once_and_reads_a_tree_s_memory(tmp_path):
    import importlib.util
    import os
    import time

    from PIL import Image

    spec = importlib.util.spec_from_file_location("scale", ROOT / "bench" / "scale.py")
    scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale)
    sources = tmp_path / "pets"
    sources.mkdir()
    for i in range(3):
        Image.new("RGB", (500 + 10 * i, 375), (40 * i, 90, 200)).save(sources / f"Cat_{i}.jpg")
    folder = scale.generate(tmp_path / "images", 23, source=sources)
    files = sorted(folder.glob("class_*/*.jpg"))
    assert len(files) == 23 and len({f.parent.name for f in files}) == scale.CLASSES
    assert all(Image.open(f).size == (scale.WIDTH, scale.HEIGHT) for f in files)
    stamps = [f.stat().st_mtime_ns for f in files]
    assert [f.stat().st_mtime_ns for f in sorted(scale.generate(folder, 23, source=sources).glob("*/*.jpg"))] == stamps
    own = scale.tree_rss(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(64 << 20); time.sleep(30)"])
    try:
        for _ in range(100):  # until the child has touched its 64 MB (bytearray fills it with zeros)
            if scale.tree_rss(os.getpid()) > own + (60 << 20):
                break
            time.sleep(0.1)
        assert scale.tree_rss(os.getpid()) > own + (60 << 20) > scale.tree_rss(child.pid) - (20 << 20)
    finally:
        child.kill()
        child.wait()
