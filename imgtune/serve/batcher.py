"""Micro-batching: requests that arrive within a few milliseconds of each other share one model call.

A network classifies a batch of images in much less time than the same images one by one (one
pass over the weights, wider matrix products), so under concurrent load the web demo gathers the
images of the requests in flight and runs them together. :class:`MicroBatcher` holds the queue:

- a worker calls :meth:`MicroBatcher.run` with a function that prepares its picture (decodes the
  upload); while that runs the batcher counts the picture as coming; then it is queued and the
  worker blocks until its row of the batch's output comes back (or its timeout passes);
- one batching thread waits for the first picture, then for more while others are still coming,
  up to ``max_wait`` seconds (counted from that first picture's arrival) and ``max_batch``
  pictures, and calls ``predict_batch`` once on what is queued. A picture with nothing coming
  behind it (a lone request) is not kept waiting at all; pictures queued while a batch runs have
  used up their ``max_wait`` by the time it ends, so the next batch starts at once.

Why a thread with a condition and not an asyncio queue with a batching task: the uploads are
decoded in worker threads (the event loop only receives and answers requests), and the model call
blocks, so a batching task would hop to the event loop and back into a thread for every batch; a
thread that owns the model calls keeps the event loop free of any of that work.

Failures stay with their own request: a picture whose deadline has passed when its batch is formed
is left out (its request has been answered 504; it never reaches the model), a worker that gives up
takes its picture out of the queue, a picture already in a running batch is simply ignored, and
when ``predict_batch`` raises for a batch, each picture of it is run alone, so only the one that fails
gets the exception. The batching thread never stops on an exception.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from concurrent.futures import CancelledError, Future
from typing import Any, Callable, Sequence

#: Default bounds: at most this many pictures in one model call, gathered for at most this many seconds.
MAX_BATCH = 16
MAX_WAIT = 0.010


class MicroBatcher:
    """Gathers items submitted from several threads into batches for one function call each.

    Args:
        predict_batch: called with a list of items (in the order they came); returns one output per
            item, in the same order (a sequence or an array whose rows are the outputs).
        max_batch: the most items in one call.
        max_wait: seconds the first item of a batch waits for others that are coming to join it.
        name: the batching thread's name.

    >>> batcher = MicroBatcher(lambda xs: [x * 2 for x in xs], max_batch=8, max_wait=0.005)
    >>> batcher.run(lambda: 21)
    (42, 1)
    >>> batcher.close()
    """

    def __init__(self, predict_batch: Callable[[list], Sequence], *, max_batch: int = MAX_BATCH,
                 max_wait: float = MAX_WAIT, name: str = "imgtune-batcher"):
        if max_batch < 1 or max_wait < 0:
            raise ValueError(f"max_batch must be at least 1 and max_wait at least 0, not {max_batch}, {max_wait}")
        self.predict_batch, self.max_batch, self.max_wait = predict_batch, max_batch, max_wait
        #: How many batches of each size were run (the batching thread's record; read it when idle).
        self.batch_sizes: Counter[int] = Counter()
        self._queue: deque[tuple[Future, Any, float, float | None]] = deque()  # future, item, arrival, deadline
        self._condition = threading.Condition()
        self._closed = False
        self._coming = 0  # items being prepared in run(), not queued yet
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        """How many items wait for a batch now."""
        with self._condition:
            return len(self._queue)

    def submit(self, item, *, deadline: float | None = None) -> Future:
        """Queue ``item`` for the next batch.

        Args:
            item: what ``predict_batch`` receives in its list.
            deadline: a ``time.monotonic()`` time after which the item is not worth running: a batch
                formed later leaves it out and cancels its future.

        Returns:
            A future whose result is ``(output, batch_size)``: the item's output and how many items
            its batch held. Cancel it to take the item out of the queue before its batch runs.

        Raises:
            RuntimeError: the batcher was closed.
        """
        future: Future = Future()
        with self._condition:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._queue.append((future, item, time.monotonic(), deadline))
            self._condition.notify()
        return future

    def run(self, prepare: Callable[[], Any], *, deadline: float | None = None) -> tuple[Any, int]:
        """Prepare an item in this thread, submit it and wait for its output: what a worker calls.

        While ``prepare`` runs, a batch about to start waits for this item (up to ``max_wait``).

        Args:
            prepare: returns the item, what ``predict_batch`` receives in its list; what it raises
                is raised here, and the item is no longer waited for.
            deadline: the ``time.monotonic()`` time to wait until at most; ``None``: as long as it takes.

        Returns:
            ``(output, batch_size)``, as :meth:`submit`'s future gives.

        Raises:
            TimeoutError: no output by ``deadline``; the item left the queue unless its batch was
                already running, in which case this waits for that batch to end (the item's memory
                is in use until then).
            Exception: whatever ``predict_batch`` raised for this item alone.
        """
        with self._condition:
            self._coming += 1
        try:
            item = prepare()
        finally:
            with self._condition:
                self._coming -= 1
                self._condition.notify()
        future = self.submit(item, deadline=deadline)
        try:
            return future.result(None if deadline is None else max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            if not future.cancel():
                future.result()  # its batch is running; the caller has given up, but the work is not over
            raise
        except CancelledError:  # left out of a batch formed after its deadline
            raise TimeoutError("the deadline passed before the item's batch") from None

    def close(self) -> None:
        """Run what is queued without waiting, then stop the batching thread; later submits fail."""
        with self._condition:
            self._closed = True
            self._condition.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def _serve(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            now, live = time.monotonic(), []
            for future, item, deadline in batch:
                if deadline is not None and now >= deadline:
                    future.cancel()  # its request has been answered already: the model never sees it
                if future.set_running_or_notify_cancel():  # False: cancelled, by this or by its worker
                    live.append((future, item))
            if live:
                self._run_batch(live)

    def _next_batch(self) -> list[tuple[Future, Any, float | None]] | None:
        """Wait for the first item, then while more are coming: ``max_wait`` from its arrival at most."""
        with self._condition:
            while not self._queue and not self._closed:
                self._condition.wait()
            if not self._queue:
                return None  # closed and drained
            deadline = self._queue[0][2] + self.max_wait
            while len(self._queue) < self.max_batch and self._coming and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._condition.wait(remaining)
            taken = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
        return [(future, item, deadline) for future, item, _, deadline in taken]

    def _run_batch(self, live: list[tuple[Future, Any]]) -> None:
        try:
            outputs = self.predict_batch([item for _, item in live])
            if len(outputs) != len(live):
                raise ValueError(f"predict_batch returned {len(outputs)} outputs for {len(live)} items")
        except Exception as error:
            if len(live) == 1:
                live[0][0].set_exception(error)
                self.batch_sizes[1] += 1
            else:  # which item failed is not known: each alone, so that only that one fails
                for one in live:
                    self._run_batch([one])
            return
        self.batch_sizes[len(live)] += 1
        for (future, _), output in zip(live, outputs):
            future.set_result((output, len(live)))
