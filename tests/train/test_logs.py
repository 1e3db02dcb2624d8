"""Run logs: history.csv matches learner.history, lr_find.csv the sweep, TensorBoard events read back with
TensorBoard's own reader, and the table a notebook shows for a run."""

from __future__ import annotations

import csv
import json
import sys

import pytest
from conftest import TINY, make_class_folders

from imgtune import ImgtuneError
from imgtune.train import logs, run, schedule
from imgtune.train.lr_find import LRFinderResult
from imgtune.train.run_folder import RunFolder, read_manifest

FIT = dict(TINY, epochs=1, freeze_epochs=2, report=False)


def _rows(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_a_run_writes_history_csv_that_matches_the_learners_history(tmp_path):
    out = tmp_path / "run"
    result = run.train(make_class_folders(tmp_path / "colours"), **FIT, lr=None, out=out)
    rows = _rows(out / logs.HISTORY_FILE)
    history = result.learner.history
    assert len(rows) == len(history) == 3
    assert list(rows[0])[:len(logs.HISTORY_COLUMNS)] == list(logs.HISTORY_COLUMNS)
    for row, record in zip(rows, history):
        assert (row["phase"], int(row["epoch"])) == (record["phase"], record["epoch"])
        for key in ("train_loss", "valid_loss", "accuracy", "error_rate", "seconds"):
            assert float(row[key]) == record[key]  # repr: read back exactly
        assert float(row["lr"]) > 0
    assert [r["phase"] for r in rows] == ["frozen", "frozen", "unfrozen"]
    sweep = _rows(out / logs.LR_FIND_FILE)
    finder = result.metrics["lr"]["curve"]
    assert [float(r["lr"]) for r in sweep] == finder["lrs"] and [float(r["loss"]) for r in sweep] == finder["losses"]
    assert [int(r["step"]) for r in sweep] == list(range(1, len(finder["lrs"]) + 1))
    assert {logs.HISTORY_FILE, logs.LR_FIND_FILE} <= set(read_manifest(out))
    assert not any(p.name.startswith(logs.EVENTS_PREFIX) for p in out.iterdir()), "TensorBoard only when asked"


def test_the_lr_column_is_the_heads_rate_at_the_end_of_each_epoch(tmp_path, tiny_learner):
    folder = RunFolder.create(tmp_path / "run")
    tiny_learner.callbacks.append(logs.HistoryLog(folder))
    tiny_learner.fit_one_cycle(2, 1e-2, phase="fit")
    rows = _rows(folder / logs.HISTORY_FILE)
    steps = tiny_learner.steps_per_epoch
    last_steps = [steps - 1, 2 * steps - 1]  # the rate of a step is the schedule's at its start
    assert [float(row["lr"]) for row in rows] == [schedule.one_cycle_lr(s / (2 * steps), 1e-2) for s in last_steps]


def test_a_resumed_history_log_keeps_the_rates_already_logged(tmp_path):
    folder = RunFolder.create(tmp_path / "run")
    history = [dict(phase="frozen", epoch=1, train_loss=1.0, valid_loss=1.0, accuracy=0.5, error_rate=0.5, seconds=1.0)]
    folder.write(logs.HISTORY_FILE, logs.history_csv(history, {("frozen", 1): 0.125}))
    assert logs.HistoryLog(RunFolder.reopen(folder.path)).lrs == {("frozen", 1): 0.125}


def test_history_csv_keeps_other_metrics_and_leaves_unknown_rates_empty():
    history = [dict(phase="frozen", epoch=1, train_loss=1.5, valid_loss=1.25, accuracy=0.5, error_rate=0.5,
                    seconds=2.0, macro_f1=0.4)]
    rows = list(csv.DictReader(logs.history_csv(history).splitlines()))
    assert rows == [dict(phase="frozen", epoch="1", train_loss="1.5", valid_loss="1.25", accuracy="0.5",
                         error_rate="0.5", seconds="2.0", lr="", macro_f1="0.4")]


def test_tensorboard_events_read_back_with_tensorboards_reader(tmp_path, tiny_learner):
    folder = RunFolder.create(tmp_path / "run")
    board = logs.TensorBoardLog(folder, every=1)
    board.log_lr_find(LRFinderResult([1e-4, 1e-3, 1e-2], [1.1, 0.9, 2.5]))
    tiny_learner.callbacks.append(board)
    tiny_learner.fit_one_cycle(1, 1e-2, phase="frozen")
    tiny_learner.fit_one_cycle(1, 1e-3, phase="unfrozen")
    scalars = _scalars(folder.path)
    history = tiny_learner.history
    for key in ("train_loss", "valid_loss", "accuracy", "error_rate"):
        assert [step for step, _ in scalars[f"epoch/{key}"]] == [1, 2]
        assert [value for _, value in scalars[f"epoch/{key}"]] == pytest.approx([h[key] for h in history], rel=1e-6)
    steps = tiny_learner.steps_per_epoch
    assert [step for step, _ in scalars["step/loss"]] == list(range(1, 2 * steps + 1)), "counted over both phases"
    assert [value for _, value in scalars["lr_find/loss"]] == pytest.approx([1.1, 0.9, 2.5])
    assert [value for _, value in scalars["lr_find/lr"]] == pytest.approx([1e-4, 1e-3, 1e-2])
    events = sorted(p.name for p in folder.path.iterdir() if p.name.startswith(logs.EVENTS_PREFIX))
    assert len(events) == 3 and set(events) <= set(read_manifest(folder.path)), "one file per phase, all listed"
    assert board.writer is None, "closed when the phase ended"


def test_a_run_with_log_tensorboard_writes_event_files_that_overwrite_removes(tmp_path):
    data, out = make_class_folders(tmp_path / "colours"), tmp_path / "run"
    run.train(data, **FIT, lr=1e-2, out=out, log="tensorboard")
    scalars = _scalars(out)
    assert [step for step, _ in scalars["epoch/valid_loss"]] == [1, 2, 3]
    assert "lr_find/loss" not in scalars, "no sweep with a given rate"
    run.train(data, **FIT, lr=1e-2, out=out, overwrite=True)
    assert not any(p.name.startswith(logs.EVENTS_PREFIX) for p in out.iterdir())


def test_log_names_are_checked_and_a_missing_tensorboard_says_what_to_install(tmp_path, monkeypatch):
    assert logs.check_log(None) is None and logs.check_log("none") is None
    with pytest.raises(ImgtuneError, match="unknown log 'wandb'; choose tensorboard"):
        run.train(make_class_folders(tmp_path / "colours"), **FIT, out=tmp_path / "run", log="wandb")
    assert not (tmp_path / "run").exists(), "refused before anything was written"
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # what an uninstalled package looks like to imports
    monkeypatch.setattr(logs.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImgtuneError, match=r"pip install 'imgtune\[tensorboard\]'"):
        logs.check_log("tensorboard")
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    with pytest.raises(ImgtuneError, match="needs the tensorboard package"):
        logs.summary_writer(tmp_path)


def test_the_cli_takes_log_tensorboard(tmp_path):
    from click.testing import CliRunner

    from imgtune.cli import cli

    result = CliRunner().invoke(cli, ["train", "--help"])
    assert "--log [tensorboard]" in result.output
    result = CliRunner().invoke(cli, ["train", str(tmp_path), "--log", "wandb"])
    assert result.exit_code == 2 and "'wandb' is not 'tensorboard'" in result.output


def test_a_run_result_shows_as_an_escaped_table(tmp_path):
    history = [dict(phase="frozen", epoch=1, train_loss=1.5, valid_loss=1.25, accuracy=0.5, error_rate=0.5,
                    seconds=2.0, macro_f1=0.4)]
    metrics = dict(valid_accuracy=0.5, error_rate=0.5, valid_loss=1.25, macro_f1=0.4, history=history)
    page = run.RunResult(tmp_path / "<b>run", None, metrics)._repr_html_()
    assert "&lt;b&gt;run" in page and "<b>run" not in page
    assert "macro F1" in page and "balanced accuracy" not in page, "only the metrics the run has"
    assert "50.00%" in page and ">frozen<" in page
    assert "http" not in page and "<script" not in page
    json.dumps(metrics)  # the metrics stay plain data
