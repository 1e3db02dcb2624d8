"""The Learner on tiny colour folders: freezing, BatchNorm, discriminative rates, lr_find, fine_tune, seeds."""

import math

import pytest
import torch
from conftest import TINY
from torch.nn.modules.batchnorm import _BatchNorm

from imgtune import Learner, LRFinderResult
from imgtune.train import schedule
from imgtune.train.defaults import AUTO_STEPS


class Recorder:
    """Records the optimizer's rates and momentum, and the BatchNorm modes, after every batch."""

    def __init__(self):
        self.lrs, self.moms, self.steps, self.bn_training, self.events = [], [], [], [], []

    def before_fit(self, learner):
        self.events.append(("before_fit", learner.phase))

    def after_batch(self, learner):
        self.lrs.append([g["lr"] for g in learner.opt.param_groups])
        self.moms.append([g["betas"][0] for g in learner.opt.param_groups])
        self.steps.append((learner.step, learner.total_steps))
        self.bn_training.append({name: m.training for name, m in learner.model.named_modules()
                                 if isinstance(m, _BatchNorm)})

    def after_epoch(self, learner):
        self.events.append(("after_epoch", learner.epoch))

    def after_fit(self, learner):
        self.events.append(("after_fit", learner.phase))


def snapshot(tensors: dict) -> dict:
    return {k: v.detach().clone() for k, v in tensors.items()}


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} changed"


def opt_tensors(opt: torch.optim.Optimizer) -> dict:
    """Every tensor of the optimizer state, keyed by parameter index and name."""
    return {f"{pid}.{name}": torch.as_tensor(value).clone()
            for pid, per_param in opt.state_dict()["state"].items() for name, value in per_param.items()}


def opt_hypers(opt: torch.optim.Optimizer) -> list[dict]:
    """The optimizer's hyper-parameters (lr, betas, weight decay, ...) per param group."""
    return [{k: v for k, v in group.items() if k != "params"} for group in opt.state_dict()["param_groups"]]


def bn_modules(learner, group_index):
    """The BatchNorm modules whose parameters are in layer group ``group_index``."""
    ids = {id(p) for p in learner.groups[group_index]}
    return [m for m in learner.model.modules()
            if isinstance(m, _BatchNorm) and any(id(p) in ids for p in m.parameters(recurse=False))]


def bn_buffers(modules) -> dict:
    return {f"{i}.{name}": b.detach().clone() for i, m in enumerate(modules) for name, b in m.named_buffers()}


def requires_grad_by_group(learner) -> list[set[bool]]:
    return [{p.requires_grad for p in group} for group in learner.groups]


def bn_names(learner, modules) -> set[str]:
    return {name for name, m in learner.model.named_modules() if any(m is x for x in modules)}


# --- freezing -------------------------------------------------------------------------------------


def test_from_data_starts_frozen_with_only_the_head_trainable(tiny_learner):
    assert len(tiny_learner.groups) == 3
    assert requires_grad_by_group(tiny_learner) == [{False}, {False}, {True}]
    head = list(tiny_learner.model.get_classifier().parameters())
    assert {id(p) for p in tiny_learner.groups[-1]} == {id(p) for p in head}


def test_freeze_unfreeze_and_freeze_to_set_requires_grad_per_group(tiny_learner):
    tiny_learner.unfreeze()
    assert requires_grad_by_group(tiny_learner) == [{True}, {True}, {True}]
    tiny_learner.freeze_to(1)
    assert requires_grad_by_group(tiny_learner) == [{False}, {True}, {True}]
    tiny_learner.freeze_to(-2)
    assert requires_grad_by_group(tiny_learner) == [{False}, {True}, {True}]
    tiny_learner.freeze_to(2)
    assert requires_grad_by_group(tiny_learner) == [{False}, {False}, {True}]
    tiny_learner.freeze()
    assert requires_grad_by_group(tiny_learner) == [{False}, {False}, {True}]
    assert all(p.requires_grad for p in tiny_learner.model.get_classifier().parameters())


def test_a_frozen_fit_changes_only_trainable_parameters(tiny_learner):
    tiny_learner.freeze_to(1)
    before = [[p.detach().clone() for p in group] for group in tiny_learner.groups]
    tiny_learner.fit_one_cycle(1, 1e-2)
    after = tiny_learner.groups
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0])), "a frozen group was trained"
    assert not all(torch.equal(a, b) for a, b in zip(before[1], after[1]))
    assert not all(torch.equal(a, b) for a, b in zip(before[2], after[2]))


def test_batchnorm_in_frozen_groups_stays_in_eval_mode_and_keeps_its_statistics(tiny_data):
    learner = Learner.from_data(tiny_data, **TINY, bn_stats="train")
    learner.freeze_to(1)  # group 0 frozen, group 1 and the head trainable
    frozen, trainable = bn_modules(learner, 0), bn_modules(learner, 1)
    assert frozen and trainable
    frozen_names, trainable_names = bn_names(learner, frozen), bn_names(learner, trainable)
    frozen_before, trainable_before = bn_buffers(frozen), bn_buffers(trainable)
    recorder = Recorder()
    learner.callbacks.append(recorder)

    learner.fit_one_cycle(1, 1e-2)

    assert recorder.bn_training, "no batch was trained"
    for modes in recorder.bn_training:
        assert not any(modes[n] for n in frozen_names), "a frozen BatchNorm was in training mode"
        assert all(modes[n] for n in trainable_names), "a trainable BatchNorm was in eval mode"
    assert_same_tensors(frozen_before, bn_buffers(frozen))
    after = bn_buffers(trainable)
    assert not all(torch.equal(trainable_before[k], after[k]) for k in after), "trainable BatchNorm did not update"


def test_bn_stats_default_follows_the_weights(tiny_learner, tiny_data, tmp_path):
    assert tiny_learner.bn_stats == "train"  # random initialisation: no statistics worth keeping
    path = tmp_path / "pretrained.pth"
    torch.save(tiny_learner.model.state_dict(), path)
    assert Learner.from_data(tiny_data, **{**TINY, "weights": str(path)}).bn_stats == "frozen"


def test_bn_stats_frozen_keeps_running_statistics_while_batchnorm_trains(tiny_data):
    tiny_learner = Learner.from_data(tiny_data, **TINY, bn_stats="frozen")
    tiny_learner.unfreeze()
    buffers = {k: v.clone() for k, v in tiny_learner.model.named_buffers()}
    bn = [m for m in tiny_learner.model.modules() if isinstance(m, _BatchNorm)]
    bn_weights = [m.weight.detach().clone() for m in bn]
    recorder = Recorder()
    tiny_learner.callbacks.append(recorder)

    tiny_learner.fit_one_cycle(1, 1e-2)

    assert all(not any(modes.values()) for modes in recorder.bn_training), "a BatchNorm used batch statistics"
    assert_same_tensors(buffers, dict(tiny_learner.model.named_buffers()))
    assert not all(torch.equal(a, m.weight) for a, m in zip(bn_weights, bn)), "BatchNorm scales did not train"


def test_bn_stats_must_be_known(tiny_data):
    with pytest.raises(ValueError, match="bn_stats"):
        Learner.from_data(tiny_data, **TINY, bn_stats="sometimes")


def test_a_fully_frozen_body_keeps_every_batchnorm_buffer(tiny_learner):
    before = {k: v.clone() for k, v in tiny_learner.model.named_buffers()}
    tiny_learner.fit_one_cycle(1, 1e-2)
    assert_same_tensors(before, dict(tiny_learner.model.named_buffers()))


# --- the one-cycle schedule and discriminative rates -------------------------------------------------


def test_one_optimizer_param_group_per_layer_group(tiny_learner):
    groups = tiny_learner.opt.param_groups
    assert len(groups) == len(tiny_learner.groups) == 3
    for opt_group, layer_group in zip(groups, tiny_learner.groups):
        assert [id(p) for p in opt_group["params"]] == [id(p) for p in layer_group]


def test_fit_one_cycle_with_a_pair_gives_geometric_rates_over_the_groups(tiny_learner):
    tiny_learner.unfreeze()
    recorder = Recorder()
    tiny_learner.callbacks.append(recorder)
    pct_start = 1 / len(tiny_learner.train_dl)  # so that the second step lands on the peak

    tiny_learner.fit_one_cycle(1, (1e-6, 1e-4), pct_start=pct_start)

    assert len(recorder.lrs) == len(tiny_learner.train_dl) >= 3
    for lrs in recorder.lrs:
        assert lrs[1] / lrs[0] == pytest.approx(10.0)
        assert lrs[2] / lrs[1] == pytest.approx(10.0)
    assert recorder.lrs[1] == pytest.approx([1e-6, 1e-5, 1e-4])
    assert max(lrs[-1] for lrs in recorder.lrs) == pytest.approx(1e-4)


def test_fit_one_cycle_follows_the_schedule_functions(tiny_learner):
    recorder = Recorder()
    tiny_learner.callbacks.append(recorder)
    tiny_learner.fit_one_cycle(2, 3e-3, pct_start=0.4, div=10.0, div_final=1e3)

    total = 2 * len(tiny_learner.train_dl)
    assert [s for s in recorder.steps] == [(i, total) for i in range(1, total + 1)]
    for i, (lrs, moms) in enumerate(zip(recorder.lrs, recorder.moms)):
        expected = schedule.one_cycle_lr(i / total, 3e-3, pct_start=0.4, div=10.0, div_final=1e3)
        assert lrs == pytest.approx([expected] * 3)
        assert moms == pytest.approx([schedule.one_cycle_momentum(i / total, pct_start=0.4)] * 3)
    assert recorder.lrs[0][0] == pytest.approx(3e-3 / 10)


# --- lr_find --------------------------------------------------------------------------------------


@pytest.fixture
def unfrozen_learner(tiny_data):
    """A learner whose unfrozen BatchNorm layers update their statistics, as plain PyTorch does."""
    learner = Learner.from_data(tiny_data, **TINY, bn_stats="train")
    learner.unfreeze()
    return learner


def test_lr_find_leaves_weights_buffers_and_a_fresh_optimizer_untouched(unfrozen_learner):
    model_before = snapshot(unfrozen_learner.model.state_dict())
    opt_before, hypers_before = opt_tensors(unfrozen_learner.opt), opt_hypers(unfrozen_learner.opt)

    result = unfrozen_learner.lr_find(num_steps=12)

    assert_same_tensors(model_before, unfrozen_learner.model.state_dict())
    assert_same_tensors(opt_before, opt_tensors(unfrozen_learner.opt))
    assert opt_hypers(unfrozen_learner.opt) == hypers_before
    assert not unfrozen_learner.opt.state, "the optimizer kept state from the sweep"
    assert all(p.grad is None for p in unfrozen_learner.model.parameters())
    assert isinstance(result, LRFinderResult)
    assert len(result.lrs) == len(result.losses) >= 3
    assert result.lrs[0] == pytest.approx(1e-7)
    assert all(b > a for a, b in zip(result.lrs, result.lrs[1:]))
    assert all(math.isfinite(loss) for loss in result.losses)
    assert result.suggested == result.suggestion["suggested"]
    assert result.lrs[0] / 10 <= result.suggested <= result.lrs[-1]


def test_lr_find_leaves_a_trained_optimizer_state_bit_identical(unfrozen_learner):
    unfrozen_learner.fit_one_cycle(1, 1e-3)
    assert unfrozen_learner.opt.state, "the short fit should have given the optimizer state"
    model_before = snapshot(unfrozen_learner.model.state_dict())
    opt_before, hypers_before = opt_tensors(unfrozen_learner.opt), opt_hypers(unfrozen_learner.opt)

    unfrozen_learner.lr_find(num_steps=12)

    assert_same_tensors(model_before, unfrozen_learner.model.state_dict())
    assert_same_tensors(opt_before, opt_tensors(unfrozen_learner.opt))
    assert opt_hypers(unfrozen_learner.opt) == hypers_before


def test_lr_find_has_no_effect_on_the_training_that_follows(tiny_data):
    # Weights, optimizer and every random number generator (the loader's shuffling included) are
    # restored, so training after lr_find is bit-identical to training without it.
    plain = Learner.from_data(tiny_data, **TINY, seed=3)
    plain.fit_one_cycle(1, 1e-2)
    plain_state = snapshot(plain.model.state_dict())

    probed = Learner.from_data(tiny_data, **TINY, seed=3)
    probed.lr_find(num_steps=5)
    probed.fit_one_cycle(1, 1e-2)

    assert probed.history[0]["train_loss"] == plain.history[0]["train_loss"]
    assert_same_tensors(plain_state, probed.model.state_dict())


def test_lr_find_stops_early_when_the_loss_diverges(tiny_learner):
    tiny_learner.unfreeze()
    result = tiny_learner.lr_find(start_lr=1e-3, end_lr=1e6, num_steps=60)
    assert len(result.lrs) < 60


# --- the training step ----------------------------------------------------------------------------


def linear_learner(**kwargs):
    """A learner of one linear layer (no BatchNorm, no dropout): its step can be recomputed by hand."""
    torch.manual_seed(0)
    return Learner(torch.nn.Linear(5, 3), None, None, classes="abc", device="cpu", channels_last=False, **kwargs)


def batch(n=8, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=generator), torch.randint(0, 3, (n,), generator=generator)


def test_the_training_step_is_forward_loss_backward_and_an_adamw_step_at_the_given_rate():
    learner = linear_learner()
    reference = torch.nn.Linear(5, 3)
    reference.load_state_dict(learner.model.state_dict())
    opt = torch.optim.AdamW(reference.parameters(), lr=3e-2, betas=(0.8, 0.999), weight_decay=0.01)
    xb, yb = batch()

    losses = learner.train_step(iter([(xb, yb)]), 1, [3e-2], 0.8)

    loss = torch.nn.functional.cross_entropy(reference(xb), yb)
    loss.backward()
    opt.step()
    assert losses == [(loss.item(), 8)]
    assert (learner.opt.param_groups[0]["lr"], learner.opt.param_groups[0]["betas"]) == (3e-2, (0.8, 0.999))
    assert_same_tensors(reference.state_dict(), learner.model.state_dict())
    learner.train_step(iter([(xb, yb)]), 1, [1e-3])
    assert learner.opt.param_groups[0]["betas"] == (0.8, 0.999), "momentum None leaves beta1 as it was"


def test_a_step_of_two_micro_batches_sums_their_scaled_gradients():
    whole, halves = linear_learner(), linear_learner()
    xb, yb = batch()
    (whole_loss, _), = whole.train_step(iter([(xb, yb)]), 1, [1e-2])
    losses = halves.train_step(iter([(xb[:4], yb[:4]), (xb[4:], yb[4:])]), 2, [1e-2])
    assert [n for _, n in losses] == [4, 4]
    for a, b in zip(whole.model.parameters(), halves.model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    assert (losses[0][0] + losses[1][0]) / 2 == pytest.approx(whole_loss, rel=1e-6)  # unscaled: each half's mean


def test_the_step_clips_the_gradient_norm_when_asked():
    xb, yb = batch()
    plain, clipped = linear_learner(), linear_learner(max_grad_norm=1e-3)
    for learner in (plain, clipped):
        learner.train_step(iter([(xb, yb)]), 1, [1e-2])
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in clipped.model.parameters()]))
    assert norm == pytest.approx(1e-3, rel=1e-4)
    assert torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in plain.model.parameters()])) > 1e-2


def test_the_step_trains_only_unfrozen_groups(tiny_learner):
    xb, yb = next(iter(tiny_learner.train_dl))
    before = [[p.detach().clone() for p in group] for group in tiny_learner.groups]
    tiny_learner.train_step(iter([(xb, yb)]), 1, [1e-2] * 3)
    assert all(torch.equal(a, b) for group, saved in zip(tiny_learner.groups[:-1], before) for a, b in zip(saved, group))
    assert not all(torch.equal(a, b) for a, b in zip(before[-1], tiny_learner.groups[-1]))


# --- training -------------------------------------------------------------------------------------


def test_fine_tune_runs_a_frozen_then_an_unfrozen_phase_and_learns(tiny_data):
    tiny_learner = Learner.from_data(tiny_data, **TINY, bn_stats="frozen")
    untrained = tiny_learner.validate()
    recorder = Recorder()
    tiny_learner.callbacks.append(recorder)

    returned = tiny_learner.fine_tune(2, (3e-3, 1e-2), freeze_epochs=1)

    assert returned is tiny_learner
    history = tiny_learner.history
    assert [(h["phase"], h["epoch"]) for h in history] == [("frozen", 1), ("unfrozen", 1), ("unfrozen", 2)]
    assert set(history[0]) >= {"epoch", "phase", "train_loss", "valid_loss", "accuracy", "error_rate", "seconds"}
    assert [e for e in recorder.events if e[0] != "after_epoch"] == [
        ("before_fit", "frozen"), ("after_fit", "frozen"), ("before_fit", "unfrozen"), ("after_fit", "unfrozen")]
    assert requires_grad_by_group(tiny_learner) == [{True}, {True}, {True}]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["valid_loss"] < untrained["valid_loss"] / 2
    assert history[-1]["accuracy"] >= max(untrained["accuracy"], 0.8)


def test_fine_tune_follows_the_lesson_recipe(tiny_learner, monkeypatch):
    calls = []

    def fake_fit(epochs, lr_max, **kwargs):
        calls.append((epochs, lr_max, kwargs, requires_grad_by_group(tiny_learner)))
        return tiny_learner

    monkeypatch.setattr(tiny_learner, "fit_one_cycle", fake_fit)
    tiny_learner.unfreeze()
    tiny_learner.fine_tune(3, 1e-2, freeze_epochs=2)

    (frozen_epochs, frozen_lr, frozen_kw, frozen_grads), (epochs, rates, kw, grads) = calls
    assert (frozen_epochs, frozen_lr, frozen_kw["phase"], frozen_kw["pct_start"]) == (2, 1e-2, "frozen", 0.99)
    assert frozen_grads == [{False}, {False}, {True}]
    assert (epochs, kw["phase"], kw["pct_start"], kw["div"]) == (3, "unfrozen", 0.3, 5.0)
    assert rates == pytest.approx((1e-2 / 2 / 100, 1e-2 / 2))
    assert grads == [{True}, {True}, {True}]
    assert tiny_learner.config["lr"] == {"frozen": 1e-2, "unfrozen": pytest.approx([5e-5, 5e-3])}


def test_fine_tune_without_a_rate_uses_the_lr_finder_suggestion(tiny_learner, monkeypatch):
    calls = []
    monkeypatch.setattr(tiny_learner, "lr_find", lambda: LRFinderResult([1e-3] * 3, [1.0] * 3, {"suggested": 4e-3}))
    monkeypatch.setattr(tiny_learner, "fit_one_cycle", lambda epochs, lr_max, **kw: calls.append(lr_max))
    tiny_learner.fine_tune(1, freeze_epochs=1)
    assert calls[0] == 4e-3
    assert calls[1] == pytest.approx((2e-5, 2e-3))


def test_fine_tune_without_epoch_counts_aims_for_enough_steps(tiny_data, monkeypatch):
    learner = Learner.from_data(tiny_data, **TINY, feature_cache=False)
    epochs = []
    monkeypatch.setattr(learner, "fit_one_cycle", lambda n, lr_max, **kw: epochs.append(n))
    learner.fine_tune(base_lr=1e-3)
    steps = len(learner.train_dl)
    assert epochs[0] * steps >= AUTO_STEPS["frozen"] > (epochs[0] - 1) * steps
    assert epochs[1] * steps >= AUTO_STEPS["unfrozen"] > (epochs[1] - 1) * steps


def test_fine_tune_on_a_cpu_with_cached_features_trains_the_head_only_by_default(tiny_learner, monkeypatch):
    epochs = []
    monkeypatch.setattr(tiny_learner, "fit_one_cycle", lambda n, lr_max, **kw: epochs.append(n))
    tiny_learner.fine_tune(base_lr=1e-3)
    steps = len(tiny_learner.train_dl)
    assert len(epochs) == 1 and epochs[0] == min(50, -(-AUTO_STEPS["frozen_features"] // steps))
    assert tiny_learner.body_frozen()
    tiny_learner.fine_tune(2, base_lr=1e-3)  # asked for: the body is fine-tuned too
    assert epochs[1:] == [epochs[0], 2] and not tiny_learner.body_frozen()


def test_the_same_seed_repeats_a_cpu_run_and_another_seed_differs(tiny_data):
    def run(seed):
        learner = Learner.from_data(tiny_data, **TINY, seed=seed)
        learner.unfreeze()
        learner.fit_one_cycle(2, 1e-2)
        return [(h["train_loss"], h["valid_loss"]) for h in learner.history]

    first, again, other = run(7), run(7), run(8)
    assert first == again
    assert first != other


class StopAfter:
    def __init__(self, event, count):
        self.event, self.count, self.seen = event, count, 0

    def after_batch(self, learner):
        self._maybe_stop("after_batch", learner)

    def after_epoch(self, learner):
        self._maybe_stop("after_epoch", learner)

    def _maybe_stop(self, event, learner):
        if event == self.event:
            self.seen += 1
            if self.seen >= self.count:
                learner.should_stop = True


def test_a_callback_stops_training_after_an_epoch(tiny_data):
    recorder = Recorder()
    learner = Learner.from_data(tiny_data, **TINY, callbacks=[StopAfter("after_epoch", 1), recorder])
    learner.fit_one_cycle(3, 1e-3)
    assert len(learner.history) == 1
    assert recorder.events[-1] == ("after_fit", "fit")


def test_a_callback_stops_training_mid_epoch(tiny_data):
    learner = Learner.from_data(tiny_data, **TINY, callbacks=[StopAfter("after_batch", 2)])
    learner.fit_one_cycle(3, 1e-3)
    assert learner.step == 2
    assert len(learner.history) == 1, "the stopped epoch is still validated and recorded"

    # The flag is reset by the next fit.
    learner.callbacks.pop()
    learner.fit_one_cycle(1, 1e-3)
    assert learner.step == len(learner.train_dl)


# --- evaluation -----------------------------------------------------------------------------------


def test_get_preds_shapes_and_consistency(tiny_learner, tiny_data):
    probs, targets, losses = tiny_learner.get_preds()
    n, c = len(tiny_data.valid), len(tiny_data.classes)

    assert probs.shape == (n, c) and targets.shape == (n,) and losses.shape == (n,)
    assert torch.allclose(probs.sum(1), torch.ones(n), atol=1e-5)
    index = {name: i for i, name in enumerate(tiny_data.classes)}
    assert targets.tolist() == [index[item.label] for item in tiny_data.valid]
    assert torch.allclose(losses, -probs[torch.arange(n), targets].log(), atol=1e-5)
    assert not tiny_learner.model.training


def test_validate_agrees_with_get_preds(tiny_learner):
    tiny_learner.unfreeze()
    tiny_learner.fit_one_cycle(1, 1e-2)
    probs, targets, losses = tiny_learner.get_preds()
    metrics = tiny_learner.validate()

    assert metrics["accuracy"] == pytest.approx((probs.argmax(1) == targets).float().mean().item())
    assert metrics["error_rate"] == pytest.approx(1 - metrics["accuracy"])
    assert metrics["valid_loss"] == pytest.approx(losses.mean().item())
    record = tiny_learner.history[-1]
    assert record["accuracy"] == pytest.approx(metrics["accuracy"])
    assert record["error_rate"] == pytest.approx(1 - record["accuracy"])


def test_get_preds_on_another_loader(tiny_learner):
    probs, targets, _ = tiny_learner.get_preds(tiny_learner.train_dl)
    assert probs.shape == (len(tiny_learner.train_dl.dataset), 3)
    assert targets.shape == (len(tiny_learner.train_dl.dataset),)
