"""Callbacks driven by hand with a dummy learner, as Keras tests its callbacks."""

import io
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from imgtune import CheckpointCallback, EarlyStopping, History, ProgressCallback


def epoch_metrics(epoch=1, valid_loss=1.0, accuracy=0.5, phase="fit"):
    return dict(epoch=epoch, phase=phase, train_loss=1.2, valid_loss=valid_loss, accuracy=accuracy,
                error_rate=1 - accuracy, seconds=3.0)


def dummy_learner(**kwargs):
    defaults = dict(phase="fit", epoch=1, epochs=3, step=0, total_steps=6, loss=float("nan"), epoch_metrics={},
                    should_stop=False, model=None)
    return SimpleNamespace(**{**defaults, **kwargs})


def run_epochs(callback, learner, values, monitor="valid_loss"):
    """Feed ``values`` of ``monitor`` epoch by epoch; returns should_stop after each epoch."""
    stopped = []
    for epoch, value in enumerate(values, start=1):
        learner.epoch_metrics = {**epoch_metrics(epoch), monitor: value}
        callback.after_epoch(learner)
        stopped.append(learner.should_stop)
    return stopped


# --- History --------------------------------------------------------------------------------------


def test_history_records_a_copy_of_each_epochs_metrics():
    history, learner = History(), dummy_learner()
    for epoch in (1, 2):
        learner.epoch_metrics = epoch_metrics(epoch, valid_loss=1.0 / epoch)
        history.after_epoch(learner)
    learner.epoch_metrics["valid_loss"] = 99.0

    assert [r["epoch"] for r in history.records] == [1, 2]
    assert [r["valid_loss"] for r in history.records] == [1.0, 0.5]


# --- EarlyStopping --------------------------------------------------------------------------------


def test_early_stopping_stops_after_patience_epochs_without_improvement():
    callback, learner = EarlyStopping(patience=2), dummy_learner()
    callback.before_fit(learner)
    assert run_epochs(callback, learner, [1.0, 0.8, 0.9, 0.85]) == [False, False, False, True]


def test_early_stopping_waits_again_after_an_improvement():
    callback, learner = EarlyStopping(patience=2), dummy_learner()
    callback.before_fit(learner)
    assert run_epochs(callback, learner, [1.0, 1.1, 0.9, 1.0, 1.0]) == [False, False, False, False, True]


def test_early_stopping_counts_changes_below_min_delta_as_no_improvement():
    callback, learner = EarlyStopping(patience=1, min_delta=0.1), dummy_learner()
    callback.before_fit(learner)
    assert run_epochs(callback, learner, [1.0, 0.95]) == [False, True]


def test_early_stopping_on_accuracy_wants_it_higher():
    callback, learner = EarlyStopping(monitor="accuracy", patience=1), dummy_learner()
    callback.before_fit(learner)
    assert run_epochs(callback, learner, [0.5, 0.7, 0.9], monitor="accuracy") == [False, False, False]
    assert run_epochs(callback, learner, [0.8], monitor="accuracy") == [True]


def test_early_stopping_starts_afresh_each_fit():
    callback, learner = EarlyStopping(patience=1), dummy_learner()
    callback.before_fit(learner)
    run_epochs(callback, learner, [0.5])
    callback.before_fit(learner)  # a new phase with a higher loss is not "no improvement"
    assert run_epochs(callback, learner, [0.9]) == [False]


# --- CheckpointCallback ---------------------------------------------------------------------------


def test_checkpoint_writes_safetensors_only_when_the_monitored_value_improves(tmp_path):
    path = tmp_path / "ckpt" / "best.safetensors"
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    callback, learner = CheckpointCallback(path), dummy_learner(model=model)

    def epoch_with(valid_loss, weight_value):
        with torch.no_grad():
            model[0].weight.fill_(weight_value)
        learner.epoch_metrics = epoch_metrics(valid_loss=valid_loss)
        callback.after_epoch(learner)
        return load_file(str(path))["0.weight"][0, 0].item()

    assert epoch_with(1.0, 1.0) == 1.0
    assert epoch_with(1.5, 2.0) == 1.0, "a worse epoch overwrote the checkpoint"
    assert epoch_with(0.5, 3.0) == 3.0
    assert epoch_with(0.5, 4.0) == 3.0, "an equal epoch is not an improvement"
    assert set(load_file(str(path))) == set(model.state_dict())


def test_checkpoint_on_accuracy_wants_it_higher(tmp_path):
    path = tmp_path / "best.safetensors"
    model = nn.Linear(2, 2)
    callback, learner = CheckpointCallback(path, monitor="accuracy"), dummy_learner(model=model)
    learner.epoch_metrics = epoch_metrics(accuracy=0.6)
    callback.after_epoch(learner)
    assert path.is_file()
    path.unlink()
    learner.epoch_metrics = epoch_metrics(accuracy=0.4)
    callback.after_epoch(learner)
    assert not path.exists()
    learner.epoch_metrics = epoch_metrics(accuracy=0.9)
    callback.after_epoch(learner)
    assert path.is_file()


# --- ProgressCallback -----------------------------------------------------------------------------


def drive_progress(callback, learner, steps=3):
    callback.before_fit(learner)
    for step in range(1, steps + 1):
        learner.step, learner.loss = step, 1.0 / step
        callback.after_batch(learner)
    learner.epoch_metrics = epoch_metrics(epoch=1, valid_loss=0.75, accuracy=0.875)
    callback.after_epoch(learner)
    callback.after_fit(learner)


def test_progress_without_a_bar_writes_plain_lines():
    stream = io.StringIO()
    drive_progress(ProgressCallback(stream, interval=0, bar=False), dummy_learner(total_steps=3))
    lines = stream.getvalue().splitlines()

    assert lines[0] == "fit: 3 steps"
    assert lines[1].startswith("fit: step 1/3 (33%) loss 1.0000")
    assert lines[3].startswith("fit: step 3/3 (100%) loss 0.3333")
    assert lines[4].startswith("epoch 1/3 fit")
    assert "valid_loss 0.7500" in lines[4] and "accuracy 87.50%" in lines[4] and "error_rate 12.50%" in lines[4]
    assert "\r" not in stream.getvalue()


def test_progress_without_a_bar_writes_step_lines_only_after_the_interval():
    stream = io.StringIO()
    drive_progress(ProgressCallback(stream, interval=3600, bar=False), dummy_learner(total_steps=3))
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0] == "fit: 3 steps" and lines[1].startswith("epoch 1/3")


def test_progress_chooses_plain_lines_for_a_stream_that_is_not_a_terminal():
    stream = io.StringIO()
    drive_progress(ProgressCallback(stream, interval=0), dummy_learner(total_steps=3))
    assert stream.getvalue().startswith("fit: 3 steps\n")


def test_progress_with_a_bar_uses_tqdm():
    stream = io.StringIO()
    callback = ProgressCallback(stream, bar=True)
    learner = dummy_learner(phase="frozen", total_steps=3)
    callback.before_fit(learner)
    assert callback._pbar is not None and callback._pbar.total == 3
    for step in (1, 2, 3):
        learner.step, learner.loss = step, 0.5
        callback.after_batch(learner)
    assert callback._pbar.n == 3
    learner.epoch_metrics = epoch_metrics(phase="frozen", accuracy=0.875)
    callback.after_epoch(learner)
    callback.after_fit(learner)

    out = stream.getvalue()
    assert callback._pbar is None
    assert "frozen" in out and "3/3" in out and "\r" in out
    assert "accuracy 87.50%" in out
    assert "fit: step" not in out


class CountedLoss(SimpleNamespace):
    """A dummy learner whose ``loss`` counts its reads (on a GPU each read waits for the step)."""

    reads = 0

    @property
    def loss(self):
        type(self).reads += 1
        return 0.5


def test_a_progress_bar_reads_the_loss_twice_a_second_at_most_not_every_step():
    callback = ProgressCallback(io.StringIO(), bar=True)
    learner = CountedLoss(phase="frozen", step=0, total_steps=200, epoch=1, epochs=1)
    callback.before_fit(learner)
    for step in range(1, 201):  # 200 steps in far less than half a second
        learner.step = step
        callback.after_batch(learner)
    assert CountedLoss.reads == 2  # the first step and the last
    callback.after_fit(learner)


@pytest.mark.parametrize("bar", [True, False])
def test_progress_survives_an_lr_find_without_epochs(bar):
    stream = io.StringIO()
    callback, learner = ProgressCallback(stream, interval=0, bar=bar), dummy_learner(phase="lr_find", total_steps=5)
    callback.before_fit(learner)
    learner.step, learner.loss = 1, 2.0
    callback.after_batch(learner)
    callback.after_fit(learner)
    assert "lr_find" in stream.getvalue()


def test_progress_reports_feature_extraction_in_plain_lines():
    import io
    from types import SimpleNamespace

    from imgtune.train.callbacks import ProgressCallback

    out = io.StringIO()
    progress = ProgressCallback(out, bar=False, interval=0.0)
    learner = SimpleNamespace(phase="frozen")
    for done in (0, 64, 100):
        progress.on_features(learner, done, 100)
    lines = out.getvalue().splitlines()
    assert lines[0] == "features: 100 images (computed once, then cached)"
    assert lines[1].startswith("features: 64/100 images")
    assert lines[-1].startswith("features: 100 images in ")
