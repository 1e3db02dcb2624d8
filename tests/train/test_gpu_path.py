"""The GPU path, checked on the CPU: what the CUDA-only code does that a CPU can still show (the GPU's own
numbers are bench/gpu.py's to measure).

SyncBatchNorm keeps timm's fused activations, an out-of-memory error in backward gets advice that fits,
the training loop reads no loss back per step, the lr finder reads its losses in windows without
changing its curve and leaves CUDA alone on the CPU, uint8 batches normalised on the device train as
the float ones do, and ``compile_model`` compiles the training module once.
"""

from __future__ import annotations

import copy
import math
import weakref

import pytest
import timm
import torch
from conftest import TINY
from torch import nn

from imgtune import Learner
from imgtune.data.loaders import DeviceNormalize
from imgtune.errors import ImgtuneError
from imgtune.train import distributed, lr_find
from imgtune.train.features import HeadOnFeatures

# --- SyncBatchNorm -----------------------------------------------------------------------------------


def test_sync_batchnorm_keeps_the_activation_of_timm_s_batchnorm_act_layers():
    """EfficientNet-Lite's BatchNormAct2d runs BatchNorm, then ReLU6: the conversion must keep the ReLU6.

    SyncBatchNorm in eval mode runs on the CPU (it syncs only in training, where it needs GPUs), so the
    eval-mode outputs before and after can be compared here; the training-mode sync is bench/gpu.py's.
    """
    from timm.layers import BatchNormAct2d, SyncBatchNormAct

    torch.manual_seed(0)
    model = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=3).eval()
    for module in model.modules():  # statistics of their own, so that the BatchNorm layers do something
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(images)
    plain = [m for m in model.modules() if isinstance(m, BatchNormAct2d)]
    params = {name: p for name, p in model.named_parameters()}

    converted = distributed.convert_sync_batchnorm(copy.deepcopy(model)).eval()

    synced = [m for m in converted.modules() if isinstance(m, SyncBatchNormAct)]
    assert len(synced) == len(plain) > 0
    assert not any(isinstance(m, BatchNormAct2d) and not isinstance(m, SyncBatchNormAct) for m in converted.modules())
    for before, after in zip(plain, synced):
        assert type(after.act) is type(before.act) and type(after.drop) is type(before.drop)
    assert sum(isinstance(m.act, nn.ReLU6) for m in synced) > len(synced) // 2  # the others: projections
    assert converted.state_dict().keys() == model.state_dict().keys()
    with torch.no_grad():
        assert torch.equal(converted(images), expected)
        # PyTorch's own converter makes plain SyncBatchNorm layers: no ReLU6, other outputs.
        torchs = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)).eval()
        assert not torch.allclose(torchs(images), expected, atol=1e-3)
    same = distributed.convert_sync_batchnorm(model)  # in place: the parameters the layer groups hold
    assert all(p is params[name] for name, p in same.named_parameters())


# --- out of memory in backward -----------------------------------------------------------------------


class FakeGPU:
    """A memory of ``capacity`` units: a forward pass of n images holds n units until its graph is
    freed, and its backward needs n more; beyond the capacity, torch.cuda.OutOfMemoryError."""

    capacity = 20
    held: weakref.WeakSet

    class Block:
        def __init__(self, n: int):
            self.n = n

    @classmethod
    def in_use(cls) -> int:
        return sum(block.n for block in cls.held)

    @classmethod
    def allocate(cls, n: int) -> None:
        if cls.in_use() + n > cls.capacity:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory: {n} more, {cls.in_use()} in use")


class HungryActivations(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        FakeGPU.allocate(len(x))
        ctx.block = FakeGPU.Block(len(x))  # freed with the graph
        FakeGPU.held.add(ctx.block)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        FakeGPU.allocate(len(grad))  # the gradients of the activations
        return grad


class Hungry(nn.Module):
    def forward(self, x):
        return HungryActivations.apply(x)


def test_out_of_memory_in_backward_advises_a_batch_that_fits_once_the_failed_step_is_freed():
    """16 images: forward holds 16 units, backward needs 16 more (32 > 20). A batch of 8 fits (8 + 8),
    but only if the failed step's 16 units are freed before halves are tried: held, 8 fails too
    (16 + 8 > 20) and the advice would name a batch of 2."""
    FakeGPU.held = weakref.WeakSet()
    torch.manual_seed(0)
    learner = Learner(nn.Sequential(nn.Linear(5, 5), Hungry(), nn.Linear(5, 3)), None, None, classes="abc",
                      device="cpu", channels_last=False)
    generator = torch.Generator().manual_seed(0)
    xb, yb = torch.randn(16, 5, generator=generator), torch.randint(0, 3, (16,), generator=generator)
    weights = copy.deepcopy(learner.model.state_dict())

    with pytest.raises(ImgtuneError) as error:
        learner.train_step(iter([(xb, yb)]), 1, [1e-2])

    message = str(error.value)
    assert "a batch of 8 fits: rerun with `bs=8` `accumulate=2` (the same effective batch of 16)" in message
    assert "\n" not in message
    assert FakeGPU.in_use() == 0  # nothing of the failed step or the trials is left
    after = learner.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in weights.items())  # the trials never stepped
    assert all(p.grad is None for p in learner.model.parameters())
    learner.train_step(iter([(xb[:8], yb[:8])]), 1, [1e-2])  # and the advised batch really runs


# --- no host sync per step ---------------------------------------------------------------------------


class Reads:
    """Counts the reads of a tensor's value into Python (each a wait for the GPU there)."""

    def __init__(self, monkeypatch):
        self.count = 0
        for name in ("item", "tolist", "__float__"):
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, original=original):
                self.count += 1
                return original(tensor, *args)

            monkeypatch.setattr(torch.Tensor, name, counted)


def test_an_epoch_reads_its_losses_back_once_not_after_every_step(monkeypatch):
    """A read of a loss (``.item()``) waits for the GPU to finish the step, so the CPU cannot queue the
    next: the epoch keeps its losses on the device and reads their sum once, at its end. (SGD, plain
    tensors: AdamW and the augmentation read values of their own on the CPU.)"""
    from torch.utils.data import DataLoader, TensorDataset

    def reads_in_an_epoch(images: int) -> int:
        torch.manual_seed(0)
        data = TensorDataset(torch.randn(images, 5), torch.randint(0, 3, (images,)))
        learner = Learner(nn.Linear(5, 3), DataLoader(data, batch_size=2), None, classes="abc", device="cpu",
                          channels_last=False, accumulate=2)
        learner.opt = torch.optim.SGD(learner.model.parameters(), lr=0.1)
        with monkeypatch.context() as patch:
            reads = Reads(patch)
            mean_loss = learner._train_epoch(lambda progress: ([1e-2], None))
        assert math.isfinite(mean_loss)
        assert isinstance(learner._loss, torch.Tensor) and math.isfinite(learner.loss)  # read when asked for
        return reads.count

    # 5 steps or 20: the same reads (the epoch's sum, and the CPU loader's seed for the epoch)
    assert reads_in_an_epoch(20) == reads_in_an_epoch(80) <= 2


def test_the_training_step_returns_float_losses_unless_asked_for_tensors():
    torch.manual_seed(0)
    learner = Learner(nn.Linear(5, 3), None, None, classes="abc", device="cpu", channels_last=False)
    xb, yb = torch.randn(4, 5), torch.tensor([0, 1, 2, 0])
    ((as_float, n),) = learner.train_step(iter([(xb, yb)]), 1, [0.0])
    ((as_tensor, _),) = learner.train_step(iter([(xb, yb)]), 1, [0.0], on_device=True)
    assert isinstance(as_float, float) and n == 4
    assert isinstance(as_tensor, torch.Tensor) and as_tensor.dim() == 0 and not as_tensor.requires_grad
    assert as_tensor.item() == as_float  # a rate of 0 leaves the weights: the same loss


class Steps:
    """Counts the steps a learner takes."""

    def __init__(self):
        self.count = 0

    def after_batch(self, learner):
        self.count += 1


@pytest.mark.parametrize("feature_cache", [True, False])
def test_the_lr_finder_reading_its_losses_in_windows_gives_the_same_curve(tiny_data, monkeypatch, feature_cache):
    """On one CUDA GPU the sweep reads its losses every lr_find.SYNC_EVERY steps; here a window of 7 is
    forced on the CPU: the rates, losses and suggestion equal a read after every step, and the steps
    it took past the divergence are undone with the rest."""
    def sweep(every):
        monkeypatch.setattr(lr_find, "_read_every", lambda device: every)
        steps = Steps()
        learner = Learner.from_data(tiny_data, **TINY, feature_cache=feature_cache, callbacks=[steps])
        before = copy.deepcopy(learner.model.state_dict())
        found = learner.lr_find(end_lr=1e5, num_steps=40)
        after = learner.model.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before.items())
        return found, steps.count

    (every_step, taken), (windowed, windowed_taken) = sweep(1), sweep(7)
    assert taken == len(every_step.lrs) < 40  # it diverged
    assert windowed_taken == min(40, math.ceil(taken / 7) * 7)  # to the end of the window it diverged in
    assert (windowed.lrs, windowed.losses, windowed.suggestion) == (every_step.lrs, every_step.losses,
                                                                     every_step.suggestion)


def test_the_lr_finder_s_snapshot_does_not_start_cuda(monkeypatch):
    """On a GPU machine ``imgtune lr-find --device cpu`` must not create a CUDA context (seconds, and
    memory on a GPU others may use): the snapshot asks for CUDA's generator state only if CUDA runs."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine, CUDA not started
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("CUDA was started"))
    model = nn.Linear(2, 2)
    with lr_find.restored_afterwards(model, torch.optim.SGD(model.parameters(), lr=0.1)):
        pass


# --- uint8 batches normalised on the device ----------------------------------------------------------


def test_uint8_batches_normalised_on_the_device_train_and_predict_as_the_float_ones(tiny_data):
    """The CUDA loaders send uint8 pictures (normalised on the GPU); on the CPU the same pipeline must
    give exactly the float loaders' tensors, so the same training and the same predictions."""
    def learner(device_loaders):
        kw = dict(size=32, bs=6, num_workers=0, seed=3, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
        train_dl, valid_dl = tiny_data.loaders(**kw, device="cuda" if device_loaders else None)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
        normalize = DeviceNormalize(kw["mean"], kw["std"]) if device_loaders else None
        return Learner(model, train_dl, valid_dl, classes=tiny_data.classes, device="cpu", normalize=normalize)

    floats, uint8 = learner(False), learner(True)
    assert next(iter(uint8.valid_dl))[0].dtype == torch.uint8 and uint8.valid_dl.pin_memory
    assert not uint8.valid_dl.persistent_workers
    for one in (floats, uint8):
        torch.manual_seed(1)  # the augmentation draws from torch's generator
        one.fit_one_cycle(2, 1e-2)
    assert [h["train_loss"] for h in uint8.history] == [h["train_loss"] for h in floats.history]
    for a, b in zip(uint8.get_preds(), floats.get_preds()):
        assert torch.equal(a, b)


# --- torch.compile -----------------------------------------------------------------------------------


def test_compile_model_compiles_the_training_module_once_and_not_the_head_on_features(tiny_data, monkeypatch):
    compiled = []

    def fake_compile(module, **options):
        compiled.append(module)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    learner = Learner.from_data(tiny_data, **TINY, compile_model=True)
    learner.fit_one_cycle(1, 1e-2, phase="frozen")  # on cached features: the head is not compiled
    assert compiled == []
    learner.unfreeze()
    learner.fit_one_cycle(2, 1e-3)
    assert compiled == [learner.model]
    plain = Learner.from_data(tiny_data, **TINY, feature_cache=False)
    plain.fit_one_cycle(1, 1e-2)
    assert compiled == [learner.model]  # off by default
    assert not isinstance(learner.model, HeadOnFeatures)


# --- the command line --------------------------------------------------------------------------------


def test_the_precision_choices_of_the_command_line_are_the_library_s():
    from imgtune.cli.options import PRECISIONS
    from imgtune.train.device import PRECISIONS as LIBRARY

    assert PRECISIONS == LIBRARY


def test_device_auto_is_cuda_when_present_else_the_cpu(monkeypatch):
    from imgtune.cli.options import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"
    assert resolve_device("cpu") == "cpu" and resolve_device("mps") == "mps"


def test_the_gpu_options_are_on_the_commands():
    from click.testing import CliRunner

    from imgtune.cli import cli

    runner = CliRunner()
    for command, options in [("train", ["--precision", "--compile", "--bs"]), ("lr-find", ["--precision"]),
                             ("predict", ["--device"]), ("serve", ["--device"]), ("interpret", ["--device"]),
                             ("clean", ["--device"])]:
        result = runner.invoke(cli, [command, "--help"])
        assert result.exit_code == 0, result.output
        for option in options:
            assert option in result.output, (command, option)
    assert "[default: auto]" in runner.invoke(cli, ["predict", "--help"]).output
    result = runner.invoke(cli, ["train", "--precision", "half"])
    assert result.exit_code == 2 and "'half' is not one of" in result.output
    with pytest.raises(ImgtuneError, match="needs a CUDA GPU"):
        Learner(nn.Linear(2, 2), None, None, classes="ab", device="cpu", precision="bf16")
