"""The micro-batcher driven directly: each caller gets its own output, batches stay within their bounds
(size and wait) and wait only for items on their way, a failing or cancelled item affects only itself,
and closing drains the queue."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from imgtune.serve.batcher import MicroBatcher


class Recorder:
    """A ``predict_batch`` that records the batches it gets; with ``hold``, its first call waits for a release."""

    def __init__(self, hold: bool = False):
        self.batches: list[list] = []
        self.entered, self.release = threading.Event(), threading.Event()
        if not hold:
            self.release.set()

    def __call__(self, items: list) -> list:
        self.batches.append(list(items))
        self.entered.set()
        assert self.release.wait(20), "never released"
        if any(item == "bad" for item in items):
            raise ValueError("a bad item")
        return [f"out-{item}" for item in items]


@pytest.fixture
def make():
    made = []

    def make_batcher(predict, **options):
        made.append(MicroBatcher(predict, **options))
        return made[-1]

    yield make_batcher
    for batcher in made:
        batcher.close()


def test_each_caller_gets_its_own_output_under_concurrency(make):
    recorder = Recorder()
    batcher = make(recorder, max_batch=8, max_wait=0.05)
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: batcher.run(lambda: i, deadline=time.monotonic() + 20), range(48)))
    assert [output for output, _ in results] == [f"out-{i}" for i in range(48)]
    assert sum(len(batch) for batch in recorder.batches) == 48
    assert max(size for _, size in results) > 1, "16 threads at once never shared a batch"
    assert all(size == len(next(b for b in recorder.batches if i in b)) for i, (_, size) in enumerate(results))


def test_a_lone_item_runs_at_once(make):
    """Nothing else on its way: a lone item does not wait for company (max_wait is 30 s here)."""
    batcher = make(Recorder(), max_batch=8, max_wait=30)
    started = time.monotonic()
    assert batcher.run(lambda: "one", deadline=time.monotonic() + 20) == ("out-one", 1)
    assert time.monotonic() - started < 15


def test_an_item_waits_for_one_on_its_way_at_most_max_wait(make):
    """The wait is the bound: an item waits for one still being prepared that long (0.3 s), then runs alone."""
    recorder, preparing, finish = Recorder(), threading.Event(), threading.Event()
    batcher = make(recorder, max_batch=8, max_wait=0.3)

    def slow_prepare():
        preparing.set()
        assert finish.wait(20)
        return "slow"

    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(batcher.run, slow_prepare, deadline=time.monotonic() + 20)
        assert preparing.wait(20)
        started = time.monotonic()
        assert batcher.run(lambda: "quick", deadline=time.monotonic() + 20) == ("out-quick", 1)
        waited = time.monotonic() - started
        finish.set()
        assert slow.result(20) == ("out-slow", 1)
    assert 0.29 <= waited < 10
    assert recorder.batches == [["quick"], ["slow"]]


def test_an_item_waits_for_one_on_its_way_and_they_share_a_batch(make):
    recorder, preparing, finish = Recorder(), threading.Event(), threading.Event()
    batcher = make(recorder, max_batch=8, max_wait=30)

    def prepare():
        preparing.set()
        assert finish.wait(20)
        return "second"

    with ThreadPoolExecutor(1) as pool:
        second = pool.submit(batcher.run, prepare, deadline=time.monotonic() + 20)
        assert preparing.wait(20)
        threading.Timer(0.2, finish.set).start()
        assert batcher.run(lambda: "first", deadline=time.monotonic() + 20) == ("out-first", 2)
        assert second.result(20) == ("out-second", 2)
    assert recorder.batches == [["first", "second"]]


def test_a_failed_preparation_is_raised_and_not_waited_for(make):
    batcher = make(Recorder(), max_batch=8, max_wait=30)

    def undecodable():
        raise OSError("cannot decode")

    with pytest.raises(OSError, match="cannot decode"):
        batcher.run(undecodable)
    started = time.monotonic()
    assert batcher.run(lambda: "next", deadline=time.monotonic() + 20) == ("out-next", 1)
    assert time.monotonic() - started < 15, "the batch waited for the item whose preparation failed"


def test_a_full_batch_runs_without_waiting_out_the_wait(make):
    """Five items on their way, at most four a batch: the first four go when the fourth is queued,
    although the fifth is still coming and max_wait is 60 s."""
    recorder, ready, finish = Recorder(), threading.Barrier(5), threading.Event()
    batcher = make(recorder, max_batch=4, max_wait=60)

    def prepare(i):
        ready.wait(20)  # all five are counted as coming before any is queued
        if i == 4:
            assert finish.wait(30)
        return i

    started = time.monotonic()
    with ThreadPoolExecutor(5) as pool:
        futures = [pool.submit(batcher.run, lambda i=i: prepare(i), deadline=time.monotonic() + 30) for i in range(5)]
        results = [future.result(30) for future in futures[:4]]
        waited = time.monotonic() - started
        finish.set()
        assert futures[4].result(30) == ("out-4", 1)
    assert waited < 30, "the batch waited for max_wait although it was full"
    assert sorted(recorder.batches[0]) == [0, 1, 2, 3] and {size for _, size in results} == {4}


def test_batches_never_exceed_max_batch(make):
    """While one batch runs, 21 items queue up: they leave in batches of at most 4, in order."""
    recorder = Recorder(hold=True)
    batcher = make(recorder, max_batch=4, max_wait=0.0)
    first = batcher.submit("first")
    assert recorder.entered.wait(20)
    queued = [batcher.submit(i) for i in range(21)]
    recorder.release.set()
    assert [future.result(20)[0] for future in queued] == [f"out-{i}" for i in range(21)]
    assert first.result(20) == ("out-first", 1)
    assert [len(batch) for batch in recorder.batches] == [1, 4, 4, 4, 4, 4, 1]
    assert [item for batch in recorder.batches[1:] for item in batch] == list(range(21))


def test_a_failing_item_fails_only_its_own_caller(make):
    recorder = Recorder(hold=True)
    batcher = make(recorder, max_batch=4, max_wait=60)
    batcher.submit("first")
    assert recorder.entered.wait(20)
    futures = [batcher.submit(item) for item in ("a", "bad", "c", "d")]  # queued behind it: one batch
    recorder.release.set()
    assert futures[0].result(20) == ("out-a", 1)  # run again alone after the batch failed
    with pytest.raises(ValueError, match="a bad item"):
        futures[1].result(20)
    assert [future.result(20)[0] for future in futures[2:]] == ["out-c", "out-d"]
    assert recorder.batches == [["first"], ["a", "bad", "c", "d"], ["a"], ["bad"], ["c"], ["d"]]
    again = [batcher.submit(item) for item in "efgh"]  # the thread carries on
    assert [future.result(20)[0] for future in again] == [f"out-{item}" for item in "efgh"]


def test_a_wrong_number_of_outputs_is_an_error_for_each_item(make):
    batcher = make(lambda items: [], max_batch=2, max_wait=60)
    futures = [batcher.submit(i) for i in range(2)]
    for future in futures:
        with pytest.raises(ValueError, match="0 outputs for 1 items"):  # the pair's failure, then each alone
            future.result(20)
    assert batcher.batch_sizes == {1: 2}


def test_a_caller_that_gives_up_leaves_the_queue_and_the_rest_go_on(make):
    """A timed-out item still queued never reaches the model; the batch it would have joined runs without it."""
    recorder = Recorder(hold=True)
    batcher = make(recorder, max_batch=8, max_wait=0.0)
    first = batcher.submit("first")
    assert recorder.entered.wait(20)
    others = [batcher.submit(i) for i in range(3)]
    with pytest.raises(TimeoutError):
        batcher.run(lambda: "gave-up", deadline=time.monotonic() + 0.05)
    others[1].cancel()
    recorder.release.set()
    assert first.result(20)[0] == "out-first"
    assert [others[0].result(20), others[2].result(20)] == [("out-0", 2), ("out-2", 2)]
    assert others[1].cancelled()
    assert recorder.batches == [["first"], [0, 2]]


def test_an_item_past_its_deadline_is_left_out_of_the_batch(make):
    recorder = Recorder(hold=True)
    batcher = make(recorder, max_batch=8, max_wait=0.0)
    batcher.submit("first")
    assert recorder.entered.wait(20)
    late = batcher.submit("late", deadline=time.monotonic() + 0.05)
    on_time = batcher.submit("on-time", deadline=time.monotonic() + 30)
    time.sleep(0.1)
    recorder.release.set()
    assert on_time.result(20) == ("out-on-time", 1)
    assert late.cancelled() and recorder.batches == [["first"], ["on-time"]]


def test_a_caller_whose_batch_is_running_when_it_gives_up_waits_for_it(make):
    """Its picture is in use until the batch ends, so its worker (and the slot it holds) ends only then."""
    recorder = Recorder(hold=True)
    batcher = make(recorder, max_batch=8, max_wait=0.0)
    threading.Timer(0.5, recorder.release.set).start()
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        batcher.run(lambda: "slow", deadline=time.monotonic() + 0.05)
    assert recorder.release.is_set() and time.monotonic() - started >= 0.45
    assert recorder.batches == [["slow"]]


def test_close_runs_what_is_queued_then_refuses_more():
    recorder = Recorder(hold=True)
    batcher = MicroBatcher(recorder, max_batch=2, max_wait=60)
    futures = [batcher.submit(i) for i in range(3)]
    assert recorder.entered.wait(20)
    recorder.release.set()
    batcher.close()  # the third would otherwise wait 60 s for company
    assert [future.result(0)[0] for future in futures] == ["out-0", "out-1", "out-2"]
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(3)


def test_bounds_are_checked():
    for options in (dict(max_batch=0), dict(max_wait=-1)):
        with pytest.raises(ValueError):
            MicroBatcher(lambda items: items, **options)
