"""Training on several processes (torchrun, gloo on two CPU processes), gradient accumulation, and
the out-of-memory message.

The multi-process tests start real processes: ``python -m torch.distributed.run`` (torchrun) for
the runs, and two hand-launched ranks (the environment torchrun would set) for the lost-peer test,
where no torchrun agent is there to kill the survivor for us.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import make_class_folders
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from imgtune import ImgtuneError, Learner
from imgtune.data import shards
from imgtune.explain.interpret import Interpretation
from imgtune.train import distributed, schedule

# 3 colours x 8 images; a stratified 25% split leaves 18 training images: 9 per process, 3 steps of 3.
TRAIN = ["--arch", "test_efficientnet", "--size", "32", "--num-workers", "0", "--device", "cpu",
         "--valid-pct", "0.25", "--stratify", "--no-augment"]
FIXED = ["--freeze-epochs", "1", "--epochs", "2", "--lr", "1e-2"]
# One process with batch 6 against two with batch 3 (the same global batch, the same batches: the
# sampler deals one permutation out round-robin). Started from a weights file, BatchNorm keeps its
# statistics (bn_stats="frozen"), so what differs is dropout (each process draws its masks from the
# same seed, one process draws one mask for all 6 images) and the order of float sums. Measured:
# at most 0.3% apart over these 3 epochs. (With --weights none BatchNorm would normalise with the
# statistics of 3 images per process instead of 6: 10-15% apart.)
LOSS_TOLERANCE = 0.02
LOST_PEER_TIMEOUT = 5  # seconds, IMGTUNE_DIST_TIMEOUT for the lost-peer tests


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(tmp: Path, **extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", IMGTUNE_CACHE=str(tmp / "cache"), HF_HUB_OFFLINE="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", shards.DEBUG_SHARDS_ENV):
        env.pop(name, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def torchrun(nproc: int, args: list[str], *, cwd: Path, env: dict, module: bool = True, timeout: float = 300):
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", *(["-m", "imgtune"] if module else []), *args]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def random_weights(path: Path) -> str:
    """A randomly initialised tiny network saved as a weights file: both runs start from it."""
    from safetensors.torch import save_file

    from imgtune.models import create_model

    model = create_model("test_efficientnet", 3, weights="none")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def read_shards(directory: Path, world: int) -> list[list[dict]]:
    return [[json.loads(line) for line in (directory / f"rank{r}.jsonl").read_text().splitlines()]
            for r in range(world)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same training with two processes of batch 3 and with one of batch 6 (both under torchrun)."""
    root = tmp_path_factory.mktemp("ddp")
    data = make_class_folders(root / "colours")
    weights = random_weights(root / "init.safetensors")
    two = torchrun(2, ["train", str(data), *TRAIN, *FIXED, "--weights", weights, "--bs", "3", "--out", "two"],
                   cwd=root, env=child_env(root, IMGTUNE_DEBUG_SHARDS=root / "shards"))
    torchrun(1, ["train", str(data), *TRAIN, *FIXED, "--weights", weights, "--bs", "6", "--no-report", "--out", "one"],
             cwd=root, env=child_env(root))
    return root, two


def test_two_processes_train_disjoint_shards_that_cover_the_data(runs):
    root, _ = runs
    metrics = json.loads((root / "two" / "metrics.json").read_text())
    n_train = metrics["data"]["train"]
    ranks = read_shards(root / "shards", 2)
    assert [len(records) for records in ranks] == [3, 3]  # 1 frozen + 2 unfrozen epochs on each
    for epoch in range(3):
        first, second = (records[epoch] for records in ranks)
        assert first["epoch"] == second["epoch"] == epoch and first["world_size"] == 2
        assert len(first["indices"]) == len(second["indices"]) == n_train // 2
        assert not set(first["indices"]) & set(second["indices"])
        assert sorted(first["indices"] + second["indices"]) == list(range(n_train))
    orders = [tuple(records[e]["indices"]) for records in ranks for e in range(3)]
    assert len(set(orders)) == 6, "every epoch is shuffled anew (set_epoch)"


def test_reported_accuracy_is_a_single_process_evaluation_of_the_bundle(runs):
    root, _ = runs
    metrics = json.loads((root / "two" / "metrics.json").read_text())
    interp = Interpretation.from_run(root / "two")  # one process, the whole validation set from split.csv
    assert len(interp.targets) == metrics["data"]["valid"] == 6
    assert metrics["valid_accuracy"] == pytest.approx(interp.accuracy, abs=1e-6)  # float32 mean of 6
    # The mean loss moves if an image is counted twice (padding) or not at all, or judged by other weights.
    assert metrics["valid_loss"] == pytest.approx(float(interp.losses.mean()), rel=1e-5)


def test_only_rank_zero_writes_and_reports(runs):
    root, result = runs
    assert sorted(p.name for p in root.iterdir()) == ["cache", "colours", "init.safetensors", "one", "shards", "two"]
    written = sorted(p.name for p in (root / "two").iterdir())
    assert written.count("model.safetensors") == written.count("report.html") == 1
    assert "lr_find.png" not in written  # --lr given
    assert result.stdout.count("validation accuracy") == 2  # the summary's line and the final one, once
    assert result.stdout.count("run saved to") == 1
    meta = json.loads((root / "two" / "model.json").read_text())
    assert meta["training"]["world_size"] == 2 and meta["training"]["bs"] == 3
    assert "batch 3 x 2 processes = 6" in (root / "two" / "summary.txt").read_text()
    from imgtune.deploy.predict import load_predictor

    predictor = load_predictor(root / "two")  # the plain module's weights: no "module." prefixes
    assert predictor.predict([next((root / "colours" / "red").iterdir())]).probs.shape == (1, 3)


def test_two_processes_match_one_with_the_same_global_batch(runs):
    root, _ = runs
    two = json.loads((root / "two" / "metrics.json").read_text())["history"]
    one = json.loads((root / "one" / "metrics.json").read_text())["history"]
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        for key in ("train_loss", "valid_loss"):
            assert a[key] == pytest.approx(b[key], rel=LOSS_TOLERANCE), (key, a, b)


LR_FIND_SCRIPT = textwrap.dedent("""
    import json, sys, torch, torch.distributed as dist
    from imgtune import Learner, load_data
    from imgtune.train import distributed
    device = distributed.setup("cpu")
    data = load_data(sys.argv[1], valid_pct=0.25, stratify=True, seed=0)
    learner = Learner.from_data(data, "test_efficientnet", weights="none", size=32, bs=3, num_workers=0,
                                progress=False, device=device, augment=False, accumulate=2)
    def weights():
        return torch.cat([t.detach().double().flatten() for t in learner.model.state_dict().values()])
    before = weights()
    result = learner.lr_find(num_steps=40)
    restored = bool(torch.equal(before, weights()))
    learner.unfreeze()
    learner.fit_one_cycle(1, 1e-2)
    after = weights()
    everyone = [torch.zeros_like(after) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, after)
    record = dict(lrs=result.lrs, losses=result.losses, restored=restored, steps=learner.step,
                  total_steps=learner.total_steps, same_weights=all(torch.equal(w, after) for w in everyone))
    with open(f"{sys.argv[2]}/rank{dist.get_rank()}.json", "w") as handle:
        json.dump(record, handle)
    distributed.teardown()
""")


def test_lr_find_and_accumulation_agree_across_processes(tmp_path):
    data = make_class_folders(tmp_path / "colours")
    script = tmp_path / "sweep.py"
    script.write_text(LR_FIND_SCRIPT)
    torchrun(2, [str(script), str(data), str(tmp_path)], cwd=tmp_path, env=child_env(tmp_path), module=False)
    first, second = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert first["losses"] == second["losses"], "every process sees the mean loss over all of them"
    assert first["lrs"] == second["lrs"] and len(first["lrs"]) >= 3
    assert first["restored"] and second["restored"], "lr_find restores the weights bit for bit"
    # 9 images per process in 3 batches of 3, 2 per step: 2 optimizer steps (the last of one batch).
    assert first["steps"] == first["total_steps"] == 2
    assert first["same_weights"] and second["same_weights"]


@pytest.mark.parametrize("how", ["killed", "stopped"])
def test_a_lost_process_stops_the_other_with_a_clear_error(tmp_path, how):
    """Rank 1 is killed (its sockets close) or stopped (it simply never answers, as a hung machine):
    rank 0 must exit with one readable line, within the collective timeout, not wait forever."""
    data = make_class_folders(tmp_path / "colours")
    port = free_port()
    shards = tmp_path / "shards"
    command = [sys.executable, "-m", "imgtune", "train", str(data), *TRAIN, "--weights", "none", "--bs", "3",
               "--freeze-epochs", "0", "--epochs", "400", "--lr", "1e-3", "--no-report", "--out", str(tmp_path / "run")]
    procs = []
    for rank in range(2):
        env = child_env(tmp_path, RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=port, IMGTUNE_DIST_TIMEOUT=LOST_PEER_TIMEOUT, IMGTUNE_DEBUG_SHARDS=shards)
        procs.append(subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    survivor, victim = procs
    try:
        deadline = time.monotonic() + 120
        record = shards / "rank1.jsonl"
        while not (record.is_file() and len(record.read_text().splitlines()) >= 2):  # training is under way
            assert time.monotonic() < deadline and survivor.poll() is None and victim.poll() is None, \
                survivor.stderr.read() if survivor.poll() is not None else "training did not start"
            time.sleep(0.05)
        victim.send_signal(signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        lost = time.monotonic()
        _, stderr = survivor.communicate(timeout=LOST_PEER_TIMEOUT + 60)
        waited = time.monotonic() - lost
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
    assert survivor.returncode == 1, stderr
    assert waited < LOST_PEER_TIMEOUT + 30, stderr
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("imgtune: error:")]
    assert len(errors) == 1, stderr
    assert errors[0].startswith("imgtune: error: process 0 of 2 lost contact with the others: "), stderr
    if how == "stopped":
        assert f"no answer within {LOST_PEER_TIMEOUT} s (IMGTUNE_DIST_TIMEOUT)" in errors[0], stderr
    else:
        assert "another process died" in errors[0], stderr


# --- the helpers, in one process ------------------------------------------------------------------------

def test_training_shards_are_disjoint_reshuffled_and_padded_to_equal_steps():
    dataset = list(range(11))
    samplers = [shards.shard_samplers(dataset, 5, rank, 2, seed=3)[0] for rank in range(2)]
    orders = []
    for epoch in range(2):
        for sampler in samplers:
            shards.set_epoch(DataLoader(dataset, sampler=sampler), epoch)
        parts = [list(sampler) for sampler in samplers]
        assert [len(s) for s in parts] == [6, 6]  # 11 images: one repeated so both take 6
        assert set(parts[0] + parts[1]) == set(dataset)
        orders.append(parts[0])
    assert orders[0] != orders[1]


def test_validation_shards_hold_every_item_exactly_once():
    for total in (5, 6, 7):
        parts = [shards.ShardSampler(total, rank, 3) for rank in range(3)]
        assert sorted(i for part in parts for i in part) == list(range(total))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_too_few_images_for_the_processes():
    with pytest.raises(ImgtuneError, match="4 processes need at least 4"):
        shards.shard_samplers(list(range(10)), 3, 0, 4, seed=0)


def test_outside_torchrun_everything_is_one_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert not distributed.launched()
    assert distributed.setup("cpu") == "cpu" and not distributed.is_initialized()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.sum_across([1.5, 2]) == [1.5, 2.0] and distributed.mean_across(3.0) == 3.0
    values = torch.arange(4.0)
    loader = DataLoader(values, sampler=shards.ShardSampler(4, 0, 1))
    assert distributed.gather_by_index(loader, values)[0] is values
    assert distributed.lost_peer_message(RuntimeError("gloo: Connection reset by peer")) is None


def test_lost_peer_messages_are_one_line_and_only_for_communication(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "30")
    reset = RuntimeError("[../gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:31945: Connection reset by peer."
                         " This is typically caused by a remote worker hanging.\nmore")
    message = distributed.lost_peer_message(reset)
    assert message.startswith("process 1 of 2 lost contact with the others: another process died")
    assert "\n" not in message and "pair.cc" not in message and "Connection reset by peer" in message
    timed_out = RuntimeError("[unbound_buffer.cc:78] Timed out waiting 30000ms for recv operation to complete")
    assert "no answer within 30 s (IMGTUNE_DIST_TIMEOUT)" in distributed.lost_peer_message(timed_out)
    assert distributed.lost_peer_message(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    closed = RuntimeError("Application timeout caused pair closure")  # gloo, when a stopped peer never answers
    assert "no answer within 30 s (IMGTUNE_DIST_TIMEOUT)" in distributed.lost_peer_message(closed)


def test_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    assert distributed.timeout_seconds() == distributed.DEFAULT_TIMEOUT
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "12.5")
    assert distributed.timeout_seconds() == 12.5
    for bad in ("soon", "0", "-3"):
        monkeypatch.setenv(distributed.TIMEOUT_ENV, bad)
        with pytest.raises(ImgtuneError, match="IMGTUNE_DIST_TIMEOUT"):
            distributed.timeout_seconds()


def test_sync_bn_is_refused_off_the_gpu(tiny_data):
    from conftest import TINY

    with pytest.raises(ImgtuneError, match="`sync_bn=True` needs CUDA"):
        Learner.from_data(tiny_data, **TINY, sync_bn=True)


# --- the DDP wrapper -----------------------------------------------------------------------------------

def test_the_ddp_wrapper_is_built_once_per_set_of_trainable_parameters(tmp_path):
    import torch.distributed as dist

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    parallel = distributed.DataParallel(torch.device("cpu"))
    assert parallel.module(model) is model  # no process group: the model itself
    assert isinstance(parallel.no_sync(model, sync=False), contextlib.nullcontext)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = parallel.module(model)
        assert isinstance(wrapped, nn.parallel.DistributedDataParallel) and wrapped.module is model
        assert parallel.module(model) is wrapped
        model[0].requires_grad_(False)  # freezing changes what DDP must average: a new wrapper
        rewrapped = parallel.module(model)
        assert rewrapped is not wrapped and parallel.module(model) is rewrapped
        assert isinstance(parallel.no_sync(rewrapped, sync=True), contextlib.nullcontext)
        assert not isinstance(parallel.no_sync(rewrapped, sync=False), contextlib.nullcontext)
    finally:
        dist.destroy_process_group()


# --- gradient accumulation, single process -------------------------------------------------------------

def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3))


def small_learner(bs: int, accumulate: int, n: int = 8, model: nn.Module | None = None, callbacks=()) -> Learner:
    generator = torch.Generator().manual_seed(1)
    images, labels = torch.randn(n, 3, 8, 8, generator=generator), torch.randint(0, 3, (n,), generator=generator)
    dataset = TensorDataset(images, labels)
    loader = DataLoader(dataset, batch_size=bs, shuffle=False)
    # BatchNorm in eval (bn_stats frozen) and no dropout: a batch of 8 and two of 4 compute the same.
    return Learner(model or small_net(), loader, loader, classes=["a", "b", "c"], device="cpu", channels_last=False,
                   bn_stats="frozen", accumulate=accumulate, callbacks=callbacks)


def test_accumulating_two_batches_of_4_equals_one_batch_of_8():
    whole, halves = small_learner(bs=8, accumulate=1), small_learner(bs=4, accumulate=2)
    for learner in (whole, halves):
        learner.fit_one_cycle(1, 1e-2)
        assert learner.step == learner.total_steps == 1
    for (name, a), b in zip(whole.model.named_parameters(), halves.model.parameters()):
        assert a.grad is not None, name
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=name)
    assert whole.history[0]["train_loss"] == pytest.approx(halves.history[0]["train_loss"], rel=1e-6)
    untouched = small_learner(bs=8, accumulate=1)
    assert not torch.equal(untouched.model[0].weight, whole.model[0].weight)


class StepCounter:
    def __init__(self):
        self.calls, self.lrs = [], []

    def after_batch(self, learner):
        self.calls.append((learner.step, learner.total_steps))
        self.lrs.append(learner.opt.param_groups[0]["lr"])


def test_the_schedule_counts_optimizer_steps_not_micro_batches():
    counter = StepCounter()
    learner = small_learner(bs=2, accumulate=2, n=10, callbacks=[counter])  # 5 batches: steps of 2, 2 and 1
    assert learner.steps_per_epoch == 3
    learner.fit_one_cycle(2, 1e-2, pct_start=0.25)
    assert counter.calls == [(step, 6) for step in range(1, 7)]
    # The last of 6 optimizer steps runs at progress 5/6 (with micro-batches counted it would be 9/10).
    assert counter.lrs[-1] == pytest.approx(schedule.one_cycle_lr(5 / 6, 1e-2, pct_start=0.25), rel=1e-9)


def test_accumulate_must_be_positive():
    with pytest.raises(ImgtuneError, match="`accumulate`"):
        small_learner(bs=4, accumulate=0)


# --- out of memory -------------------------------------------------------------------------------------

class OutOfMemoryAbove(nn.Module):
    """A model whose forward fails as CUDA does when a batch has more than ``limit`` images."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.net = limit, small_net()

    def forward(self, x):
        if len(x) > self.limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(x)} GiB")
        return self.net(x)


def test_out_of_memory_names_a_batch_that_fits():
    learner = small_learner(bs=8, accumulate=1, model=OutOfMemoryAbove(limit=3))
    before = {k: v.clone() for k, v in learner.model.state_dict().items()}
    with pytest.raises(ImgtuneError) as error:
        learner.fit_one_cycle(1, 1e-2)
    message = str(error.value)
    assert "\n" not in message and "out of memory on cpu" in message and "batch of 8 images of 8 px" in message
    assert "a batch of 2 fits: rerun with `bs=2` `accumulate=4` (the same effective batch of 8)" in message
    for key, value in learner.model.state_dict().items():
        assert torch.equal(value, before[key]), key
    with pytest.raises(ImgtuneError, match="`bs=2` `accumulate=4`"):
        learner.lr_find(num_steps=5)
    for key, value in learner.model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_out_of_memory_with_nothing_that_fits():
    learner = small_learner(bs=4, accumulate=2, model=OutOfMemoryAbove(limit=0))
    with pytest.raises(ImgtuneError, match="even one image does not fit; use a smaller `size` or `arch`"):
        learner.fit_one_cycle(1, 1e-2)

