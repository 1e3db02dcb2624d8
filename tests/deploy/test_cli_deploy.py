"""`imgtune export --int8` and `imgtune predict --int8/--tta/--no-tta` through the command line."""

import json

import pytest
from click.testing import CliRunner
from conftest import TINY, make_class_folders

from imgtune import Learner, load_data
from imgtune.cli import cli
from imgtune.train.run import write_split

pytest.importorskip("onnxruntime.quantization")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-int8")
    data = load_data(make_class_folders(root / "colours", n=12), valid_pct=0.5, stratify=True, seed=0)
    learner = Learner.from_data(data, **TINY)
    learner.fit_one_cycle(4, 1e-1)
    learner.save(root / "run")
    write_split(data, root / "run" / "split.csv")
    return root / "run", [str(item.path) for item in data.valid]


def error_line(result) -> str:
    assert result.exit_code == 1, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("imgtune: error: ") and "Traceback" not in result.output
    return line


def test_predict_int8_before_export_is_a_clear_error(run):
    run_dir, images = run
    line = error_line(CliRunner().invoke(cli, ["predict", str(run_dir), images[0], "--int8"]))
    assert "no model.int8.onnx" in line and "--int8" in line


def test_export_int8_then_predict_int8(run, tmp_path):
    import shutil

    run_dir, images = run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    result = CliRunner().invoke(cli, ["export", str(copy), "--int8", "--calibration-images", "12"])
    assert result.exit_code == 0, result.output
    assert str(copy / "model.int8.onnx") in result.stdout and "top-1 agreement" in result.stdout
    assert not (copy / "model.onnx").exists()
    assert "--overwrite" in error_line(CliRunner().invoke(cli, ["export", str(copy), "--int8"]))
    int8 = CliRunner().invoke(cli, ["predict", str(copy), *images, "--int8", "--json"])
    torch = CliRunner().invoke(cli, ["predict", str(copy), *images, "--backend", "torch", "--json"])
    assert int8.exit_code == 0 and torch.exit_code == 0, int8.output + torch.output
    labels = [[json.loads(line)["top_k"][0]["label"] for line in r.stdout.splitlines()] for r in (int8, torch)]
    assert sum(a == b for a, b in zip(*labels)) >= 0.8 * len(images)


def test_predict_tta_flags_override_the_bundle(run):
    run_dir, images = run
    outputs = {}
    for flag in ("--tta", "--no-tta"):
        result = CliRunner().invoke(cli, ["predict", str(run_dir), *images[:3], "--backend", "torch", "--json", flag])
        assert result.exit_code == 0, result.output
        outputs[flag] = [json.loads(line)["top_k"][0]["probability"] for line in result.stdout.splitlines()]
    default = CliRunner().invoke(cli, ["predict", str(run_dir), *images[:3], "--backend", "torch", "--json"])
    assert [json.loads(line)["top_k"][0]["probability"] for line in default.stdout.splitlines()] == outputs["--no-tta"]
    assert outputs["--tta"] != outputs["--no-tta"]
