"""Checkpoints: a fine_tune stopped after any epoch and resumed from its checkpoint ends bit-identical."""

import random

import numpy as np
import pytest
import torch
from conftest import TINY, Crash, CrashAfter

from imgtune import ImgtuneError, Learner
from imgtune.train.checkpoint import (
    CHECKPOINT_FILE,
    ResumeCheckpoint,
    check_resume,
    data_fingerprint,
    load_checkpoint,
    random_state,
    restore_random_state,
    resume_points,
)

PLAN = dict(epochs=2, base_lr=1e-2, freeze_epochs=3)


def learner_with_checkpoints(data, path, *extra, **options):
    learner = Learner.from_data(data, **{**TINY, **options})
    learner.callbacks += [ResumeCheckpoint(path, learner.model), *extra]
    return learner


def final_state(learner):
    return {k: v.clone() for k, v in learner.model.state_dict().items()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The weights and history of each kind of run without a stop (features: the frozen phase on
    cached features; images: the frozen body run on every step)."""
    from conftest import make_class_folders

    from imgtune import load_data

    root = tmp_path_factory.mktemp("whole")
    data = load_data(make_class_folders(root / "colours"), valid_pct=0.25, stratify=True, seed=0)
    runs, threads = {}, torch.get_num_threads()
    # As the tests run (conftest's function fixtures are not active here): one thread, a cache of its own.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("IMGTUNE_CACHE", str(root / "cache"))
        torch.set_num_threads(1)
        for kind in ("features", "images"):
            learner = learner_with_checkpoints(data, root / kind / CHECKPOINT_FILE, feature_cache=kind == "features")
            learner.fine_tune(**PLAN)
            runs[kind] = final_state(learner), [dict(h) for h in learner.history]
        torch.set_num_threads(threads)
    return data, runs


@pytest.mark.parametrize("kind", ["features", "images"])
@pytest.mark.parametrize("phase, epoch", [("frozen", 1), ("frozen", 3), ("unfrozen", 1), ("unfrozen", 2)])
def test_a_run_resumed_after_any_epoch_ends_with_the_same_weights(uninterrupted, tmp_path, kind, phase, epoch):
    data, runs = uninterrupted
    expected, history = runs[kind]
    path = tmp_path / CHECKPOINT_FILE
    stopped = learner_with_checkpoints(data, path, CrashAfter(phase, epoch), feature_cache=kind == "features")
    with pytest.raises(Crash):
        stopped.fine_tune(**PLAN)
    torch.manual_seed(1234), random.seed(5), np.random.seed(6)  # the new process's generators are anything
    state = load_checkpoint(tmp_path)
    assert (state["position"]["phase"], state["position"]["epoch"]) == (phase, epoch)
    resumed = learner_with_checkpoints(data, path, feature_cache=kind == "features")
    resumed.fine_tune(**PLAN, resume=state)
    for key, value in expected.items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
    assert [(h["phase"], h["epoch"]) for h in resumed.history] == [(h["phase"], h["epoch"]) for h in history]
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in history]
    assert not resumed.body_frozen()


def test_the_checkpoint_holds_plain_data_and_says_where_the_run_stood(uninterrupted, tmp_path):
    data, _ = uninterrupted
    learner = learner_with_checkpoints(data, tmp_path / CHECKPOINT_FILE, CrashAfter("unfrozen", 1))
    with pytest.raises(Crash):
        learner.fine_tune(**PLAN)
    state = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)  # no pickled objects: loads without code
    assert state["position"] == dict(phase="unfrozen", epoch=1, epochs=2, step=learner.steps_per_epoch,
                                     stopped=False, epochs_trained=4, steps_per_epoch=learner.steps_per_epoch)
    assert state["plan"] == dict(freeze_epochs=3, epochs=2, lr=learner.config["lr"])
    assert [(h["phase"], h["epoch"]) for h in state["history"]] == [("frozen", 1), ("frozen", 2), ("frozen", 3),
                                                                    ("unfrozen", 1)]
    assert set(state["random"]) == {"torch", "cuda", "python", "numpy", "generators", "on_features"}
    assert set(state["random"]["generators"]) == {"loader"}
    assert len(state["optimizer"]["param_groups"]) == len(learner.groups)
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_FILE], "no temporary file is left behind"


def test_random_state_round_trips_every_generator(tiny_learner):
    state = random_state(tiny_learner)
    expected = (torch.rand(3), random.random(), np.random.rand(), torch.rand(2, generator=tiny_learner.train_dl.generator))
    torch.manual_seed(0), random.seed(0), np.random.seed(0), tiny_learner.train_dl.generator.manual_seed(0)
    restore_random_state(tiny_learner, state)
    again = (torch.rand(3), random.random(), np.random.rand(), torch.rand(2, generator=tiny_learner.train_dl.generator))
    assert torch.equal(expected[0], again[0]) and expected[1:3] == again[1:3] and torch.equal(expected[3], again[3])


def test_resume_points_continue_the_phase_or_start_the_next():
    def state(phase, epoch, epochs, stopped=False):
        return dict(position=dict(phase=phase, epoch=epoch, epochs=epochs, step=4 * epoch, stopped=stopped),
                    random="R")

    plan = [("frozen", 3), ("unfrozen", 2)]
    assert resume_points(state("frozen", 1, 3), plan) == {"frozen": dict(epoch=1, step=4, random="R"),
                                                          "unfrozen": None}
    assert resume_points(state("frozen", 3, 3), plan) == {"frozen": False,
                                                          "unfrozen": dict(epoch=0, step=0, random="R")}
    assert resume_points(state("frozen", 2, 3, stopped=True), plan)["frozen"] is False
    assert resume_points(state("unfrozen", 1, 2), plan) == {"frozen": False,
                                                            "unfrozen": dict(epoch=1, step=4, random="R")}
    assert resume_points(state("unfrozen", 2, 2), plan) == {"frozen": False, "unfrozen": False}
    with pytest.raises(ImgtuneError, match="lr_find"):
        resume_points(state("lr_find", 1, 1), plan)


def test_fine_tune_refuses_other_epochs_than_the_checkpoints(uninterrupted, tmp_path):
    data, _ = uninterrupted
    learner = learner_with_checkpoints(data, tmp_path / CHECKPOINT_FILE, CrashAfter("frozen", 1))
    with pytest.raises(Crash):
        learner.fine_tune(**PLAN)
    again = Learner.from_data(data, **TINY)
    with pytest.raises(ImgtuneError, match="`freeze_epochs` and `epochs`"):
        again.fine_tune(5, 1e-2, freeze_epochs=3, resume=load_checkpoint(tmp_path))


def test_no_or_a_broken_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ImgtuneError, match="no checkpoint.pt to resume from"):
        load_checkpoint(tmp_path)
    (tmp_path / "model.json").write_text("{}")
    with pytest.raises(ImgtuneError, match="the run finished"):
        load_checkpoint(tmp_path)
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"cut sho")
    with pytest.raises(ImgtuneError, match="cannot read the checkpoint"):
        load_checkpoint(tmp_path)


def test_a_resume_with_other_options_or_data_is_refused(tiny_data, image_folder):
    state = dict(run=dict(options=dict(source=str(image_folder), bs=6, lr=[1e-4, 1e-3], epochs=None),
                          data=data_fingerprint(tiny_data), command="imgtune train colours --bs 6"))
    same = dict(source=str(image_folder), bs=6, lr=(1e-4, 1e-3), epochs=None)
    check_resume(state, options=same, data=data_fingerprint(tiny_data), where="run")
    with pytest.raises(ImgtuneError, match=r"`bs=6`, not `bs=8`.*it was: imgtune train colours --bs 6"):
        check_resume(state, options={**same, "bs": 8}, where="run")
    with pytest.raises(ImgtuneError, match="`epochs=auto`, not `epochs=3`"):
        check_resume(state, options={**same, "epochs": 3}, where="run")
    with pytest.raises(ImgtuneError, match="trained on .*colours, not elsewhere"):
        check_resume(state, options={**same, "source": "elsewhere"}, where="run")
    edited = tiny_data.valid[0].path
    edited.write_bytes(edited.read_bytes() + b"\0")
    with pytest.raises(ImgtuneError, match="the valid images differ"):
        check_resume(state, options=same, data=data_fingerprint(tiny_data), where="run")


class Saves:
    """Records, after every epoch, which epoch the checkpoint file holds (it runs after ResumeCheckpoint)."""

    def __init__(self, path):
        self.path, self.seen = path, []

    def after_epoch(self, learner):
        position = load_checkpoint(self.path.parent)["position"]
        self.seen.append((position["phase"], position["epoch"]))


def test_checkpoints_closer_than_every_seconds_are_skipped_but_each_phase_end_is_saved(tmp_path):
    from conftest import make_class_folders

    from imgtune import load_data

    data = load_data(make_class_folders(tmp_path / "colours"), valid_pct=0.25, stratify=True, seed=0)
    path = tmp_path / CHECKPOINT_FILE
    learner = Learner.from_data(data, **TINY)
    saves = Saves(path)
    learner.callbacks += [ResumeCheckpoint(path, learner.model, every=3600.0), saves]
    learner.fine_tune(**PLAN)
    # The first epoch, then nothing until each phase's last: 3 frozen and 2 unfrozen epochs.
    assert saves.seen == [("frozen", 1), ("frozen", 1), ("frozen", 3), ("frozen", 3), ("unfrozen", 2)]
