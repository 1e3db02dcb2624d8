"""The lr finder's module: the state it restores (one context manager), its result and figure."""

import contextlib
import random

import numpy as np
import pytest
import torch
from conftest import TINY
from matplotlib.figure import Figure
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from imgtune import Learner
from imgtune.train.lr_find import LRFinderResult, feature_probe, restored_afterwards
from imgtune.train.schedule import LR_FIND_BETA, smooth_losses


class Boom(Exception):
    pass


def training_state(model, opt, scaler, loader):
    """Everything restored_afterwards promises to put back, as comparable values."""
    return dict(
        model={k: v.clone() for k, v in model.state_dict().items()},
        opt=[{k: v for k, v in g.items() if k != "params"} for g in opt.state_dict()["param_groups"]],
        opt_state={f"{p}.{k}": torch.as_tensor(v).clone() for p, s in opt.state_dict()["state"].items()
                   for k, v in s.items()},
        scaler=scaler.state_dict(),
        torch=torch.get_rng_state(), python=random.getstate(), numpy=np.random.get_state()[1].copy(),
        loader=loader.generator.get_state(), view=loader.dataset.generator.get_state(),
    )


def assert_same_state(a, b):
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["opt"] == b["opt"]
    assert a["opt_state"].keys() == b["opt_state"].keys()
    assert all(torch.equal(a["opt_state"][k], b["opt_state"][k]) for k in a["opt_state"])
    assert a["scaler"] == b["scaler"] and a["python"] == b["python"]
    for key in ("torch", "loader", "view"):
        assert torch.equal(a[key], b[key]), key
    assert np.array_equal(a["numpy"], b["numpy"])


class Scaler:
    """Stands in for a GradScaler (a real one needs CUDA): a state to snapshot and load."""

    def __init__(self):
        self.scale = 65536.0

    def state_dict(self):
        return {"scale": self.scale}

    def load_state_dict(self, state):
        self.scale = state["scale"]


class ViewDataset(TensorDataset):
    """A dataset with its own generator, as the cached features pick their views with."""

    def __init__(self, *tensors):
        super().__init__(*tensors)
        self.generator = torch.Generator().manual_seed(5)


@pytest.mark.parametrize("raises", [False, True])
def test_restored_afterwards_puts_every_state_back_bit_for_bit(raises):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = Scaler()
    data = ViewDataset(torch.randn(12, 4), torch.randint(0, 2, (12,)))
    loader = DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(3))
    model(torch.randn(4, 4)).sum().backward()
    opt.step()  # an optimizer with state, as after some training
    opt.zero_grad(set_to_none=True)
    before = training_state(model, opt, scaler, loader)

    with pytest.raises(Boom) if raises else contextlib.nullcontext():
        with restored_afterwards(model, opt, scaler=scaler, loader=loader):
            for xb, yb in loader:  # trains: weights, BatchNorm statistics, optimizer, generators move
                nn.functional.cross_entropy(model(xb), yb).backward()
                opt.param_groups[0]["lr"] = 10.0
                opt.step()
            scaler.scale = 8.0
            random.random(), np.random.rand(), torch.rand(1), torch.rand(1, generator=data.generator)
            if raises:
                raise Boom

    assert_same_state(before, training_state(model, opt, scaler, loader))
    assert all(p.grad is None for p in model.parameters())


def test_restored_afterwards_without_a_scaler_or_loader():
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    weight = model.weight.detach().clone()
    with restored_afterwards(model, opt):
        model(torch.randn(2, 3)).sum().backward()
        opt.step()
        assert not torch.equal(model.weight, weight)
    assert torch.equal(model.weight, weight)


def test_lr_find_restores_the_learner_when_a_callback_raises(tiny_data):
    class FailAfter:
        def __init__(self):
            self.steps = 0

        def after_batch(self, learner):
            self.steps += 1
            if self.steps == 3:
                raise Boom

    learner = Learner.from_data(tiny_data, **{**TINY, "feature_cache": False}, bn_stats="train",
                                callbacks=[FailAfter()])
    learner.unfreeze()
    weights = {k: v.clone() for k, v in learner.model.state_dict().items()}
    rng = torch.get_rng_state()
    with pytest.raises(Boom):
        learner.lr_find(num_steps=10)
    assert all(torch.equal(v, learner.model.state_dict()[k]) for k, v in weights.items())
    assert torch.equal(rng, torch.get_rng_state()) and not learner.opt.state


def test_from_metrics_rebuilds_the_result_a_run_recorded():
    result = LRFinderResult([1e-5, 1e-4, 1e-3], [2.0, 1.5, 3.0], {"suggested": 1e-4, "minimum": 1e-5})
    metrics = {"lr": {"frozen": 1e-3, "suggestion": result.suggestion,
                      "curve": {"lrs": result.lrs, "losses": result.losses}}}
    assert LRFinderResult.from_metrics(metrics) == result
    assert LRFinderResult.from_metrics({"lr": {"frozen": 1e-3, "suggestion": None, "curve": None}}) is None
    assert LRFinderResult.from_metrics({}) is None
    no_suggestion = {"lr": {"curve": {"lrs": [1.0, 2.0, 3.0], "losses": [1.0, 1.0, 1.0]}, "suggestion": None}}
    assert LRFinderResult.from_metrics(no_suggestion).suggestion == {}


def test_plot_draws_the_raw_and_smoothed_curve_and_marks_the_suggestions():
    lrs = list(np.geomspace(1e-6, 1.0, 40))
    losses = [2.0 - 0.03 * i if i < 30 else 1.1 + 0.5 * (i - 30) for i in range(40)]
    result = LRFinderResult(lrs, losses, {"suggested": 1e-3, "minimum": 1e-2, "steepest": 1e-4, "valley": 1e-3})
    fig = result.plot()
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    raw, smooth, *marks = ax.get_lines()
    assert list(raw.get_ydata()) == losses and list(raw.get_xdata()) == lrs
    assert list(smooth.get_ydata()) == pytest.approx(smooth_losses(losses, beta=LR_FIND_BETA, centered=True))
    assert [line.get_xdata()[0] for line in marks] == [1e-3, 1e-2, 1e-4]  # suggested, minimum, steepest
    assert ax.get_xscale() == "log" and ax.get_xlabel() == "learning rate"
    assert [t.get_text() for t in ax.get_legend().get_texts()][2:] == ["suggested 0.001", "minimum 0.01",
                                                                        "steepest 0.0001"]


def test_the_feature_probe_is_a_fixed_sample_of_cached_features(tiny_learner):
    from imgtune.train.features import head_on_features

    assert feature_probe(tiny_learner.train_dl, tiny_learner.device) is None  # images, not features
    with head_on_features(tiny_learner):
        features, targets = feature_probe(tiny_learner.train_dl, tiny_learner.device)
        again, _ = feature_probe(tiny_learner.train_dl, tiny_learner.device)
        dataset = tiny_learner.train_dl.dataset
    assert torch.equal(features, again) and len(features) == len(targets) == len(dataset)
    assert torch.equal(features.sort(0).values, dataset.features[:, 0].sort(0).values)  # the pictures' own view
