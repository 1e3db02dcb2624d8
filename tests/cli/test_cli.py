"""The CLI through click's test runner: the commands work, and every error is one line with a status."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import make_class_folders
from imgtune.cli import cli, with_flags
from imgtune.cli.options import parse_lr

FAST = ["--arch", "test_efficientnet", "--weights", "none", "--size", "32", "--bs", "6", "--num-workers", "0",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("cli")
    data = make_class_folders(root / "colours")
    out = root / "run"
    # A fixed rate keeps this shared run quick and repeatable; the lr finder is tested on its own below.
    args = ["train", str(data), *FAST, "--epochs", "1", "--freeze-epochs", "1", "--lr", "3e-3", "--out", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return data, out, result


def one_line_error(result, code: int) -> str:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("imgtune: error: ")
    assert "Traceback" not in result.output
    return lines[0]


def test_train_writes_the_run_folder(trained):
    _, out, result = trained
    for name in ("model.safetensors", "model.json", "metrics.json", "summary.txt", "split.csv"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["valid_accuracy"] <= 1.0
    assert metrics["error_rate"] == pytest.approx(1 - metrics["valid_accuracy"])
    assert [h["phase"] for h in metrics["history"]] == ["frozen", "unfrozen"]
    assert {"features", "frozen", "unfrozen", "total"} <= set(metrics["seconds"])
    assert "validation accuracy" in result.stdout and str(out) in result.stdout


def test_train_without_lr_runs_the_lr_finder_and_caches_what_it_computed(tmp_path):
    data = make_class_folders(tmp_path / "colours")
    cache = tmp_path / "cache"
    args = ["train", str(data), *FAST, "--epochs", "0", "--freeze-epochs", "1", "--cache-dir", str(cache)]
    first = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert (tmp_path / "a" / "lr_find.png").is_file() and metrics["lr"]["suggestion"]["suggested"] > 0
    assert [h["phase"] for h in metrics["history"]] == ["frozen"]
    assert metrics["cache"]["features"]["computed"] == 24 and metrics["cache"]["features"]["cached"] == 0
    assert len(list((cache / "presized" / "valid-32-crop").rglob("*.npy"))) == 24  # every image, presized once
    second = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "b")])
    assert second.exit_code == 0, second.output
    again = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert again["cache"]["features"]["computed"] == 0 and again["cache"]["features"]["cached"] == 24
    assert "features" not in again["seconds"]
    assert again["valid_accuracy"] == metrics["valid_accuracy"]


def test_train_refuses_to_overwrite_a_run(trained, tmp_path):
    data, out, _ = trained
    before = (out / "model.json").read_bytes()
    result = CliRunner().invoke(cli, ["train", str(data), *FAST, "--epochs", "1", "--freeze-epochs", "1", "--lr", "1e-2", "--out", str(out)])
    assert "--overwrite" in one_line_error(result, 1)
    assert (out / "model.json").read_bytes() == before


def test_train_with_overwrite_and_discriminative_lr(trained, tmp_path):
    data, _, _ = trained
    out = tmp_path / "run2"
    out.mkdir()
    (out / "old.txt").write_text("x")
    args = ["train", str(data), *FAST, "--epochs", "1", "--freeze-epochs", "0", "--lr", "1e-4:1e-2", "--out", str(out)]
    result = CliRunner().invoke(cli, [*args, "--overwrite"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["lr"]["unfrozen"] == [1e-4, 1e-2]
    assert [h["phase"] for h in metrics["history"]] == ["unfrozen"]
    assert not (out / "lr_find.png").exists()


def test_predict_prints_top_k(trained):
    data, out, _ = trained
    image = next((data / "red").iterdir())
    result = CliRunner().invoke(cli, ["predict", str(out), str(image), "--top-k", "3"])
    assert result.exit_code == 0, result.output
    line = result.stdout.strip()
    assert line.startswith(str(image)) and line.count("%") == 3
    assert all(name in line for name in ("red", "green", "blue"))


def test_predict_loads_no_training_code(trained):
    import subprocess
    import sys

    data, out, _ = trained
    image = next((data / "red").iterdir())
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "imgtune", "predict", str(out), str(image)],
                            check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(str(image))
    modules = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    # The CLI reads only the defaults its --help shows (no torch in them) from the training package.
    assert {m for m in modules if m.startswith("imgtune.train")} == {"imgtune.train", "imgtune.train.defaults"}


def test_predict_json(trained):
    data, out, _ = trained
    images = [str(p) for p in sorted((data / "blue").iterdir())[:2]]
    result = CliRunner().invoke(cli, ["predict", str(out), *images, "--json", "--top-k", "2"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["file"] for r in rows] == images
    for row in rows:
        probs = [t["probability"] for t in row["top_k"]]
        assert len(probs) == 2 and probs == sorted(probs, reverse=True)


def test_predict_reports_unreadable_images_and_continues(trained, tmp_path):
    data, out, _ = trained
    bad = tmp_path / "broken.jpg"
    bad.write_text("not an image")
    good = next((data / "green").iterdir())
    result = CliRunner().invoke(cli, ["predict", str(out), str(bad), str(good)])
    assert result.exit_code == 1
    assert str(good) in result.stdout
    assert "broken.jpg" in result.stderr and "Traceback" not in result.output


def test_predict_on_a_folder_that_is_not_a_run(tmp_path):
    result = CliRunner().invoke(cli, ["predict", str(tmp_path), "x.jpg"])
    assert "not a model bundle" in one_line_error(result, 1)


def test_lr_find_command(trained, tmp_path):
    data, _, _ = trained
    png = tmp_path / "curve.png"
    result = CliRunner().invoke(cli, ["lr-find", str(data), *FAST, "--steps", "30", "--out", str(png)])
    assert result.exit_code == 0, result.output
    assert "suggested lr" in result.stdout
    assert Image.open(png).format == "PNG"
    again = CliRunner().invoke(cli, ["lr-find", str(data), *FAST, "--steps", "30", "--out", str(png)])
    assert "--overwrite" in one_line_error(again, 1)


def test_datasets_lists_the_catalogue():
    result = CliRunner().invoke(cli, ["datasets"])
    assert result.exit_code == 0
    assert "elpv" in result.stdout and "pets" in result.stdout
    assert "elpv         available offline  [default]" in result.stdout


@pytest.mark.parametrize("command", ["train", "lr-find", "predict", "datasets"])
def test_help_documents_options_and_defaults(command):
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0
    if command in ("train", "lr-find"):
        for text in ("--arch", "--label-re", "--valid-pct", "[default: 0.2]", "224", "--weights"):
            assert text in result.stdout


@pytest.mark.parametrize(
    "args, code, text",
    [
        (["train", "--no-such-option"], 2, "No such option"),
        (["train", "--lr", "fast"], 2, "LOW:HIGH"),
        (["train", "--resize", "stretch"], 2, "stretch"),
        (["predict"], 2, "Missing argument"),
        (["train", "/no/such/folder"], 1, "no such folder"),
        (["train", "no-such-dataset-name"], 1, "imgtune datasets"),
    ],
)
def test_errors_are_one_line(args, code, text):
    assert text in one_line_error(CliRunner().invoke(cli, args), code)


def test_one_class_is_an_error(tmp_path):
    make_class_folders(tmp_path / "one", colours={"red": (200, 0, 0)})
    result = CliRunner().invoke(cli, ["train", str(tmp_path / "one"), *FAST, "--out", str(tmp_path / "r")])
    assert "at least two classes" in one_line_error(result, 1)
    assert not (tmp_path / "r").exists()


def test_unknown_arch_is_an_error(image_folder, tmp_path):
    result = CliRunner().invoke(cli, ["train", str(image_folder), "--arch", "resnet9000", "--out", str(tmp_path / "r")])
    assert "unknown --arch" in one_line_error(result, 1)


def test_offline_resnet_names_both_ways_out(image_folder, tmp_path):
    result = CliRunner().invoke(cli, ["train", str(image_folder), "--arch", "resnet34", "--out", str(tmp_path / "r")])
    line = one_line_error(result, 1)
    assert "--weights" in line and "internet" in line


def test_bugs_are_one_line_unless_debug(monkeypatch, image_folder):
    import imgtune.train.run

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(imgtune.train.run, "train", broken)
    line = one_line_error(CliRunner().invoke(cli, ["train", str(image_folder)]), 1)
    assert "internal error" in line and "boom" in line
    debug = CliRunner().invoke(cli, ["--debug", "train", str(image_folder)])
    assert debug.exit_code == 1 and "Traceback" in debug.stderr


def test_debug_shows_the_traceback_of_an_error_too():
    result = CliRunner().invoke(cli, ["--debug", "train", "/no/such/folder"])
    assert result.exit_code == 1 and "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("imgtune: error: ")
    assert "no such folder" in result.stderr


def test_library_errors_name_the_options_on_the_command_line(image_folder, tmp_path):
    result = CliRunner().invoke(cli, ["train", str(image_folder), *FAST, "--valid-pct", "1.5", "--out", str(tmp_path / "run")])
    assert "--valid-pct must be between 0 and 1 (exclusive), not 1.5" in one_line_error(result, 1)


def test_with_flags_turns_parameters_into_options():
    train, render = cli.commands["train"], cli.commands["render"]
    message = "`valid_pct` too big; pass `overwrite=True`; rerun with `bs=2` `accumulate=4`; see `imgtune datasets`"
    assert with_flags(message, train) == ("--valid-pct too big; pass --overwrite; rerun with --bs 2 --accumulate 4;"
                                          " see `imgtune datasets`")
    assert with_flags("`csv_path=a.csv` and `no_such_parameter`", train) == "--csv a.csv and `no_such_parameter`"
    assert with_flags("pass `time_column`", render) == "pass --time-col"
    assert with_flags("pass `label_re`", cli.commands["cache"]) == "pass `label_re`"


def test_parse_lr():
    assert parse_lr(None) is None and parse_lr("auto") is None
    assert parse_lr("3e-3") == 3e-3
    assert parse_lr("1e-6:1e-4") == (1e-6, 1e-4)


def test_epochs_auto_or_a_count(trained, tmp_path):
    data, _, _ = trained
    result = CliRunner().invoke(cli, ["train", str(data), *FAST, "--epochs", "three", "--out", str(tmp_path / "r")])
    assert "--epochs" in one_line_error(result, 2)


def test_split_csv_rebuilds_the_runs_validation_set(trained):
    from imgtune import load_data

    data, out, _ = trained
    again = load_data(csv_path=out / "split.csv")
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(again.valid) == metrics["data"]["valid"] and len(again.train) == metrics["data"]["train"]
    assert all(item.path.is_file() and item.path.is_relative_to(data) for item in again.valid)


def test_interpret_rebuilds_the_report_and_prints_tables(trained):
    _, out, _ = trained
    (out / "report.html").unlink()
    result = CliRunner().invoke(cli, ["interpret", str(out), "--top-k", "4"])
    assert result.exit_code == 0, result.output
    assert "most confused" in result.stdout and "top losses" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert f"validation accuracy {100 * metrics['valid_accuracy']:.2f}%" in result.stdout
    loss_lines = [line for line in result.stdout.split("top losses")[1].splitlines() if ".png" in line]
    assert len(loss_lines) == 4
    assert "<h2>Top losses, with Grad-CAM</h2>" in (out / "report.html").read_text()


def test_interpret_on_data_with_an_unknown_class_is_an_error(trained, tmp_path):
    _, out, _ = trained
    make_class_folders(tmp_path / "other", n=3, colours={"red": (200, 0, 0), "purple": (120, 0, 120)})
    result = CliRunner().invoke(cli, ["interpret", str(out), str(tmp_path / "other")])
    assert "purple" in one_line_error(result, 1)


def test_export_then_predict_with_onnx(trained, tmp_path):
    import shutil

    data, out, _ = trained
    run = tmp_path / "run"
    shutil.copytree(out, run)
    result = CliRunner().invoke(cli, ["export", str(run)])
    assert result.exit_code == 0, result.output
    assert str(run / "model.onnx") in result.stdout and "max logit difference" in result.stdout
    assert "--overwrite" in one_line_error(CliRunner().invoke(cli, ["export", str(run)]), 1)
    image = str(next((data / "red").iterdir()))
    onnx = CliRunner().invoke(cli, ["predict", str(run), image, "--backend", "onnx", "--json"])
    torch = CliRunner().invoke(cli, ["predict", str(run), image, "--backend", "torch", "--json"])
    assert onnx.exit_code == 0 and torch.exit_code == 0, onnx.output + torch.output
    onnx_top, torch_top = (json.loads(r.stdout)["top_k"] for r in (onnx, torch))
    assert [t["label"] for t in onnx_top] == [t["label"] for t in torch_top]
    assert [t["probability"] for t in onnx_top] == pytest.approx([t["probability"] for t in torch_top], abs=1e-4)


def test_predict_on_many_files_with_pytorch_on_a_cpu_suggests_the_export(trained, tmp_path, monkeypatch):
    """One line on stderr, only where the run has no model.onnx and the backend was left to auto;
    the predictions on stdout are unchanged."""
    import shutil

    import imgtune.cli.deploy as deploy

    monkeypatch.setattr(deploy, "ONNX_HINT_MIN_FILES", 3)
    data, out, _ = trained
    run = tmp_path / "run"
    shutil.copytree(out, run)
    many, few = [str(data / "red")], [str(next((data / "red").iterdir()))]
    hinted = CliRunner().invoke(cli, ["predict", str(run), *many, "--json"])
    assert hinted.exit_code == 0, hinted.output
    assert f"`imgtune export {run}`" in hinted.stderr and len(hinted.stderr.strip().splitlines()) == 1
    rows = [json.loads(line) for line in hinted.stdout.splitlines()]  # stdout stays one JSON object a line
    assert len(rows) == len(list((data / "red").iterdir())) and all(row["top_k"] for row in rows)
    for args in (few, [*many, "--backend", "torch"]):
        assert CliRunner().invoke(cli, ["predict", str(run), *args]).stderr == ""
    assert CliRunner().invoke(cli, ["export", str(run)]).exit_code == 0
    assert CliRunner().invoke(cli, ["predict", str(run), *many]).stderr == ""


def test_predict_onnx_without_export_is_an_error(trained):
    _, out, _ = trained
    assert "imgtune export" in one_line_error(CliRunner().invoke(cli, ["predict", str(out), "x.png", "--backend", "onnx"]), 1)


def test_predict_a_folder_to_csv(trained, tmp_path):
    import csv

    data, out, _ = trained
    table = tmp_path / "predictions.csv"
    result = CliRunner().invoke(cli, ["predict", str(out), str(data), "--csv", str(table), "--bs", "5", "--top-k", "2"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(table.open()))
    images = sorted(p for p in data.rglob("*.png"))
    assert [r["file"] for r in rows] == [str(p) for p in images]
    for row in rows:
        assert row["label"] in ("red", "green", "blue") and not row["error"]
        top = [pair.split(":") for pair in row["top_k"].split(";")]
        assert len(top) == 2 and top[0] == [row["label"], row["probability"]]
    assert f"{len(images)} predictions written to {table}" in result.stdout


def test_predict_csv_reports_unreadable_files_and_refuses_to_overwrite(trained, tmp_path):
    import csv
    from pathlib import Path

    data, out, _ = trained
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a_broken.png").write_text("not an image")
    Image.open(next((data / "blue").iterdir())).save(folder / "b_good.png")
    table = tmp_path / "predictions.csv"
    result = CliRunner().invoke(cli, ["predict", str(out), str(folder), "--csv", str(table)])
    assert result.exit_code == 1
    assert "1 of 2 images could not be read" in result.stderr
    rows = list(csv.DictReader(table.open()))
    assert [Path(r["file"]).name for r in rows] == ["a_broken.png", "b_good.png"]
    assert "a_broken.png" in rows[0]["error"] and rows[0]["label"] == ""
    assert rows[1]["label"] in ("red", "green", "blue") and rows[1]["error"] == ""
    before = table.read_bytes()
    again = CliRunner().invoke(cli, ["predict", str(out), str(folder), "--csv", str(table)])
    assert "--overwrite" in one_line_error(again, 1)
    assert table.read_bytes() == before
    replaced = CliRunner().invoke(cli, ["predict", str(out), str(folder / "b_good.png"), "--csv", str(table), "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert len(list(csv.DictReader(table.open()))) == 1


def test_predict_on_an_empty_folder_is_an_error(trained, tmp_path):
    _, out, _ = trained
    assert "no image files" in one_line_error(CliRunner().invoke(cli, ["predict", str(out), str(tmp_path)]), 1)


def test_export_and_predict_help_document_the_new_options():
    export = CliRunner().invoke(cli, ["export", "--help"])
    assert export.exit_code == 0 and "--opset" in export.stdout and "--overwrite" in export.stdout
    predict = CliRunner().invoke(cli, ["predict", "--help"])
    for text in ("--csv", "--backend", "--bs", "[default: auto]"):
        assert text in predict.stdout
