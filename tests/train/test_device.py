"""Device and precision beside the loop: plain float32 off CUDA, the default device."""

import torch
from torch import nn

from imgtune.train.device import Precision, default_device


def test_off_cuda_precision_is_plain_float32():
    for mixed in (None, True, False):
        precision = Precision(torch.device("cpu"), mixed)
        assert precision.dtype is None and precision.scaler is None
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    weight = model.weight.detach().clone()
    with precision.autocast():
        loss = model(torch.ones(1, 3)).sum()
    assert loss.dtype == torch.float32
    precision.backward(loss)
    assert torch.equal(model.weight.grad, torch.ones(2, 3))
    precision.unscale(opt)  # nothing to unscale
    precision.step(opt)
    assert torch.equal(model.weight, weight - 1.0)


def test_the_default_device_is_the_fastest_present():
    device = default_device()
    if torch.cuda.is_available():
        assert device.type == "cuda"
    elif torch.backends.mps.is_available():
        assert device.type == "mps"
    else:
        assert device == torch.device("cpu")
