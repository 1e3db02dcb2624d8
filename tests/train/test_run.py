"""One `imgtune train` run: killed and resumed, its own folder, atomic files, a manifest, warnings not failures."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import COLOURS, TINY, make_class_folders

from imgtune import ImgtuneError
from imgtune.deploy.bundle import weights_sha256
from imgtune.train import run
from imgtune.train.checkpoint import CHECKPOINT_FILE, ResumeCheckpoint
from imgtune.train.run_folder import MANIFEST_FILE, RunFolder, read_manifest

CLI = ["--arch", "test_efficientnet", "--weights", "none", "--size", "32", "--bs", "6", "--num-workers", "0",
       "--device", "cpu"]
FIT = dict(TINY, epochs=1, freeze_epochs=1, lr=1e-2)
REPORT_FILES = {"report.html", "training.png", "confusion_matrix.png", "top_losses.png", "samples.png"}


def imgtune(*args, **popen):
    """``python -m imgtune ARGS`` on one thread (two runs of one seed then compute alike)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "imgtune", *map(str, args)]
    if popen:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def checkpoint_position(folder: Path) -> dict | None:
    try:
        return torch.load(folder / CHECKPOINT_FILE, weights_only=True)["position"]
    except FileNotFoundError:
        return None


def test_a_run_killed_mid_unfrozen_phase_resumes_to_the_same_weights(tmp_path):
    """The acceptance test: SIGKILL in the unfrozen phase, --resume, the same model.safetensors byte for
    byte as a run never stopped, and at most one epoch trained twice (the one the kill interrupted)."""
    data = make_class_folders(tmp_path / "colours")
    args = ["train", data, *CLI, "--freeze-epochs", "2", "--epochs", "12", "--no-report", "--checkpoint-every", "0"]  # the lr finder runs
    # The run never stopped, in this process (one thread, as the command's; it saves a start of Python).
    run.train(data, **dict(TINY, freeze_epochs=2, epochs=12, lr=None), report=False, out=tmp_path / "whole")

    killed_dir = tmp_path / "killed"
    process = imgtune(*args, "--out", killed_dir, popen=True)
    deadline, seen = time.monotonic() + 300, None
    while process.poll() is None and time.monotonic() < deadline:
        seen = checkpoint_position(killed_dir)
        if seen and seen["phase"] == "unfrozen" and seen["epoch"] >= 2:
            os.kill(process.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, f"the run was not killed in time (saw {seen})\n{stderr}"
    assert seen["epoch"] < 12 and not (killed_dir / "model.json").exists()
    assert CHECKPOINT_FILE in read_manifest(killed_dir)
    printed = [line for line in stderr.splitlines() if line.startswith("epoch ") and " unfrozen " in line]
    last_printed = int(printed[-1].split()[1].split("/")[0])

    resumed = imgtune(*args, "--resume", killed_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert (killed_dir / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model.safetensors").read_bytes()
    metrics = json.loads((killed_dir / "metrics.json").read_text())
    expected = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    (where,) = metrics["resumed"]
    assert where["phase"] == "unfrozen" and where["epoch"] >= seen["epoch"]
    assert last_printed - where["epoch"] <= 1, "more than one epoch was lost"
    retrained = [line for line in resumed.stderr.splitlines() if line.startswith("epoch ")]
    assert len(retrained) == 12 - where["epoch"]  # the resumed process trained only what was missing
    assert [(h["phase"], h["epoch"], h["train_loss"], h["valid_loss"]) for h in metrics["history"]] == \
        [(h["phase"], h["epoch"], h["train_loss"], h["valid_loss"]) for h in expected["history"]]
    assert metrics["lr"]["suggestion"] == expected["lr"]["suggestion"]
    assert not (killed_dir / CHECKPOINT_FILE).exists(), "a complete run keeps no checkpoint"
    assert CHECKPOINT_FILE not in read_manifest(killed_dir)
    assert f"resumed after unfrozen epoch {where['epoch']}/12" in resumed.stdout


def test_resume_refuses_other_options_and_a_finished_run(tmp_path, monkeypatch):
    data = make_class_folders(tmp_path / "colours")
    stopped = tmp_path / "stopped"
    options = dict(FIT, epochs=3, report=False)

    class Crash(Exception):
        pass

    write = ResumeCheckpoint.after_epoch

    def write_then_crash(self, learner):
        write(self, learner)
        if learner.phase == "unfrozen":
            raise Crash

    monkeypatch.setattr(ResumeCheckpoint, "after_epoch", write_then_crash)
    with pytest.raises(Crash):
        run.train(data, **options, out=stopped, checkpoint_every=0)
    monkeypatch.undo()
    with pytest.raises(ImgtuneError, match=r"`bs=6`, not `bs=3`"):
        run.train(data, **dict(options, bs=3), resume=stopped)
    with pytest.raises(ImgtuneError, match="leave out `out`"):
        run.train(data, **options, out=tmp_path / "elsewhere", resume=stopped)
    with pytest.raises(ImgtuneError, match="the run trained on"):
        run.train(make_class_folders(tmp_path / "other"), **options, resume=stopped)
    result = run.train(data, **options, resume=stopped)
    assert [h["phase"] for h in result.metrics["history"]] == ["frozen", "unfrozen", "unfrozen", "unfrozen"]
    assert result.metrics["resumed"] == [dict(phase="unfrozen", epoch=1, epochs=3)]
    with pytest.raises(ImgtuneError, match="no checkpoint.pt to resume from; the run finished"):
        run.train(data, **options, resume=stopped)


def test_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path, monkeypatch):
    data = make_class_folders(tmp_path / "colours")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run, "default_run_dir", lambda source, root="runs": Path(root) / "colours-20260101-120000")
    first = run.train(data, **FIT, report=False)
    second = run.train(data, **FIT, report=False)
    assert (first.run_dir.name, second.run_dir.name) == ("colours-20260101-120000", "colours-20260101-120000-2")
    assert (first.run_dir / "model.json").is_file() and (second.run_dir / "model.json").is_file()
    folder = tmp_path / "taken"
    assert RunFolder.create(folder, unique=True).path == folder
    assert RunFolder.create(folder, unique=True).path == tmp_path / "taken-2"


def test_of_two_runs_claiming_one_out_at_once_the_second_stops(tmp_path, monkeypatch):
    import imgtune.train.run_folder as run_folder

    RunFolder.create(tmp_path / "run")
    (tmp_path / "run" / "checkpoint.pt").write_text("the first run's")
    # The second run checked the folder (still empty) before the first claimed it.
    monkeypatch.setattr(run_folder, "check_out", lambda out, overwrite=False: Path(out))
    with pytest.raises(ImgtuneError, match="another run is writing to this folder"):
        RunFolder.create(tmp_path / "run")
    assert (tmp_path / "run" / "checkpoint.pt").read_text() == "the first run's"


def test_the_run_folder_lists_what_imgtune_wrote_and_overwrite_removes_only_that(tmp_path):
    data = make_class_folders(tmp_path / "colours")
    out = tmp_path / "run"
    first = run.train(data, **dict(FIT, lr=None), out=out)  # the lr finder and the report: figures
    written = set(read_manifest(out))
    assert {"model.safetensors", "model.json", "metrics.json", "summary.txt", "split.csv", MANIFEST_FILE,
            "history.csv", "lr_find.csv", "lr_find.png"} | REPORT_FILES == written
    assert {p.name for p in out.iterdir()} == written
    (out / "notes.txt").write_text("mine")
    meta = json.loads((out / "model.json").read_text())
    assert meta["weights_sha256"] == weights_sha256(out)

    run.train(data, **FIT, out=out, overwrite=True, report=False)  # a fixed rate, no report this time
    left = {p.name for p in out.iterdir()}
    assert left == {"model.safetensors", "model.json", "metrics.json", "summary.txt", "split.csv", MANIFEST_FILE,
                    "history.csv", "notes.txt"}, "the earlier run's report, figures, lr_find.csv gone; the user's stays"
    assert set(read_manifest(out)) == left - {"notes.txt"}
    assert first.run_dir == out


def test_a_planted_manifest_cannot_make_overwrite_delete_outside_the_folder(tmp_path):
    outside = tmp_path / "precious.txt"
    outside.write_text("keep")
    out = tmp_path / "run"
    out.mkdir()
    (out / "kept.txt").write_text("keep")
    (out / MANIFEST_FILE).write_text(json.dumps({"files": ["../precious.txt", str(outside), ".", "sub/x"]}))
    RunFolder.create(out, overwrite=True)
    assert outside.read_text() == "keep" and (out / "kept.txt").is_file()


def test_a_failed_report_is_a_warning_and_the_run_stands(tmp_path, monkeypatch, capsys):
    import imgtune.explain.report as report

    def broken(*args, **kwargs):
        raise ValueError("a figure that cannot be drawn\nsecond line")

    monkeypatch.setattr(report, "write_report", broken)
    result = run.train(make_class_folders(tmp_path / "colours"), **FIT, out=tmp_path / "run")
    assert result.metrics["report_error"] == "ValueError: a figure that cannot be drawn"
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["report_error"] == result.metrics["report_error"]
    assert "warning: report.html not written (ValueError: a figure that cannot be drawn)" in capsys.readouterr().err
    assert (tmp_path / "run" / "model.json").is_file() and (tmp_path / "run" / "summary.txt").is_file()


def test_class_names_with_dollar_signs_make_a_report(tmp_path):
    colours = {"a$b$c": COLOURS["red"], "x$_$y": COLOURS["green"], "plain": COLOURS["blue"]}
    data = make_class_folders(tmp_path / "colours", colours=colours)
    result = run.train(data, **FIT, out=tmp_path / "run")
    assert "report_error" not in result.metrics
    assert (tmp_path / "run" / "confusion_matrix.png").is_file() and "a$b$c" in (tmp_path / "run" /
                                                                                "report.html").read_text()
    from imgtune.explain.figures import plot_confusion_matrix

    labels = plot_confusion_matrix(torch.eye(3, dtype=torch.int64).numpy(), list(colours)).axes[0].get_xticklabels()
    assert [(label.get_text(), label.get_parse_math()) for label in labels][0] == ("a$b$c", False)


def test_skipped_files_and_empty_class_folders_are_named_on_the_terminal(tmp_path):
    data = make_class_folders(tmp_path / "colours")
    for i in range(25):
        (data / "red" / f"broken_{i:02}.png").write_bytes(b"not a png")
    (data / "empty").mkdir()
    (data / "empty" / "notes.txt").write_text("no images here")
    result = imgtune("train", data, *CLI, "--epochs", "0", "--freeze-epochs", "1", "--lr", "1e-2", "--no-report",
                     "--out", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    assert f"warning: class folder {data / 'empty'} has no images: ignored" in result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("  skipped ")]
    assert len(lines) == 20 and lines[0] == f"  skipped {data / 'empty'}: class folder has no images: ignored"
    assert lines[1].startswith(f"  skipped {data / 'red' / 'broken_00.png'}: ")
    assert "  ... and 6 more (see metrics.json)" in result.stdout  # 25 files and the folder
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(metrics["data"]["skipped"]) == 26 and metrics["data"]["classes"] == ["blue", "green", "red"]


def test_files_are_written_through_temporary_files(tmp_path, monkeypatch):
    """Every run file is renamed into place (atomic): the writes go through imgtune.files.atomic_writer."""
    import imgtune.files as files

    renamed = []
    real = os.replace
    monkeypatch.setattr(files.os, "replace", lambda src, dst: (renamed.append(Path(dst).name), real(src, dst))[1])
    run.train(make_class_folders(tmp_path / "colours"), **FIT, out=tmp_path / "run")
    assert {"model.safetensors", "model.json", "metrics.json", "summary.txt", "split.csv", MANIFEST_FILE,
            CHECKPOINT_FILE, "history.csv"} | REPORT_FILES <= set(renamed)
    assert renamed.index("model.json") > renamed.index("model.safetensors")
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]
