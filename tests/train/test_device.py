"""Device and precision beside the loop: plain float32 off CUDA, the default device."""

import pytest
import torch
from torch import nn

from imgtune.errors import ImgtuneError
from imgtune.train.device import (
    Precision,
    adamw,
    choose_precision,
    configure_cuda,
    default_batch_size,
    default_device,
    grad_scaler,
    native_bf16,
    to_device,
)


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


# --- the precision a CUDA GPU gets (its compute capability mocked: no GPU needed) ---------------------

CUDA = torch.device("cuda")


def on_a_gpu_of(monkeypatch, capability):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


@pytest.mark.filterwarnings("ignore:.*CUDA is not available")  # the scaler's own warning on this machine
def test_a_gpu_below_ampere_gets_float16_with_a_grad_scaler(monkeypatch):
    on_a_gpu_of(monkeypatch, (7, 0))  # V100; a T4 is 7.5
    precision = Precision(CUDA)
    assert (precision.name, precision.dtype) == ("fp16", torch.float16)
    assert isinstance(precision.scaler, torch.amp.GradScaler)
    assert choose_precision(CUDA) == "fp16" and not native_bf16(CUDA)


@pytest.mark.parametrize("capability", [(8, 0), (8, 6), (9, 0)])
def test_ampere_and_later_get_bfloat16_without_a_scaler(monkeypatch, capability):
    on_a_gpu_of(monkeypatch, capability)
    # torch's own check says yes on a V100 too (emulated bf16): it must not be what decides.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: pytest.fail("asked is_bf16_supported"))
    precision = Precision(CUDA)
    assert (precision.name, precision.dtype, precision.scaler) == ("bf16", torch.bfloat16, None)


@pytest.mark.filterwarnings("ignore:.*CUDA is not available")
def test_a_precision_asked_for_is_kept_on_cuda_and_fp32_turns_autocast_off(monkeypatch):
    on_a_gpu_of(monkeypatch, (9, 0))
    assert Precision(CUDA, precision="fp16").scaler is not None
    assert Precision(CUDA, precision="bf16").name == "bf16"
    fp32 = Precision(CUDA, precision="fp32")
    assert (fp32.dtype, fp32.scaler) == (None, None)
    assert Precision(CUDA, mixed=False, precision="bf16").name == "fp32"  # the older spelling of fp32 wins


def test_off_cuda_the_precision_is_fp32_and_mixed_precision_asked_for_is_an_error():
    for device in ("cpu", "mps"):
        assert choose_precision(device) == choose_precision(device, "fp32") == "fp32"
        for name in ("bf16", "fp16"):
            with pytest.raises(ImgtuneError, match=f"`precision={name}` needs a CUDA GPU"):
                choose_precision(device, name)
    with pytest.raises(ImgtuneError, match="must be one of auto, bf16, fp16, fp32"):
        choose_precision("cpu", "half")


@pytest.mark.filterwarnings("ignore:.*CUDA is not available")
@pytest.mark.filterwarnings("ignore:.*is deprecated")
def test_torch_before_2_3_gets_the_cuda_grad_scaler(monkeypatch):
    monkeypatch.delattr(torch.amp, "GradScaler")  # torch 2.1-2.2 have only torch.cuda.amp.GradScaler
    assert type(grad_scaler()).__module__.startswith("torch.")
    assert isinstance(grad_scaler(), torch.cuda.amp.GradScaler)


# --- the CUDA speed settings, the optimizer, the default batch ---------------------------------------


def test_the_cuda_settings_turn_on_autotuning_and_tf32_unless_fp32_is_asked_for():
    saved = torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.benchmark = False
        torch.set_float32_matmul_precision("highest")
        configure_cuda("fp32")
        assert torch.backends.cudnn.benchmark and torch.get_float32_matmul_precision() == "highest"
        configure_cuda("bf16")
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cudnn.benchmark = saved[0]
        torch.set_float32_matmul_precision(saved[1])
        torch.backends.cudnn.allow_tf32 = saved[2]


def test_a_cpu_learner_leaves_the_cuda_settings_alone():
    from imgtune import Learner

    before = torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision()
    Learner(nn.Linear(3, 2), None, None, classes="ab", device="cpu", channels_last=False)
    assert (torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision()) == before


def test_adamw_is_fused_on_cuda_and_plain_on_the_cpu():
    groups = [{"params": list(nn.Linear(3, 2).parameters())}]
    assert adamw(groups, device=CUDA, lr=1e-3).defaults["fused"] is True
    assert not adamw(groups, device=torch.device("cpu"), lr=1e-3).defaults["fused"]


def test_the_default_batch_is_32_off_cuda_and_grows_with_the_free_gpu_memory(monkeypatch):
    assert default_batch_size("cpu") == default_batch_size("mps") == 32
    gib = 2**30
    for free, expected in [(139 * gib, 128), (40 * gib, 128), (22 * gib, 64), (15 * gib, 32), (2 * gib, 32)]:
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, free=free: (free, 141 * gib))
        assert default_batch_size(CUDA) == expected, free / gib
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (40 * gib, 80 * gib))
    assert default_batch_size(CUDA, size=448) == 32  # four times the pixels per image
    assert default_batch_size(CUDA, train_images=600) == 64  # still 8 steps an epoch (600 // 64 = 9)
    assert default_batch_size(CUDA, train_images=100) == 32  # never below the lesson's batch


def test_uint8_batches_are_normalised_on_their_way_to_the_device():
    from imgtune.data.loaders import DeviceNormalize

    pictures = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    normalize = DeviceNormalize((0.5, 0.4, 0.3), (0.2, 0.3, 0.4))
    moved = to_device(pictures, torch.device("cpu"), torch.channels_last, normalize)
    assert moved.dtype == torch.float32 and moved.is_contiguous(memory_format=torch.channels_last)
    expected = (pictures.float() / 255 - torch.tensor([0.5, 0.4, 0.3])[:, None, None]) / torch.tensor([0.2, 0.3, 0.4])[:, None, None]
    torch.testing.assert_close(moved, expected)
    floats = torch.randn(2, 3, 4, 4)
    assert torch.equal(to_device(floats, torch.device("cpu"), torch.contiguous_format, normalize), floats)
