"""An ordered worker pool: a function over a stream of items, results back in item order.

Items go to the workers `per_job` at a time, because handing work between threads costs more
than computing one item. Each worker thread owns a scratch object, made once on first use and
reused for every item it computes, so its buffers stay in that core's cache. Each job in flight
owns a slot of result holders (one per item); a result's holder is reused only after the
caller has asked for the next result, so the caller may read it until then. At most
`threads + 1` jobs are in flight: one result being consumed while `threads` compute, which
also bounds memory.

Which thread computes an item never changes its result, as long as `fn` depends only on its
arguments: that is what keeps the merge bit-identical under any thread count.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from typing import Generic, TypeVar

Item = TypeVar("Item")
Scratch = TypeVar("Scratch")
Holder = TypeVar("Holder")
Result = TypeVar("Result")


class OrderedPool(Generic[Scratch, Holder]):
    """`threads` workers (none: the caller's thread computes) with per-thread scratch."""

    def __init__(self, threads: int, per_job: int, make_scratch: Callable[[], Scratch],
                 make_holder: Callable[[], Holder],
                 init_thread: Callable[[], None] | None = None) -> None:
        self.per_job = per_job
        self.in_flight = threads + 1
        self._make_scratch = make_scratch
        self._executor = None
        if threads > 1:
            self._executor = ThreadPoolExecutor(threads, initializer=init_thread)
        self._slots: queue.Queue[list[Holder]] = queue.Queue()
        for _ in range(self.in_flight):
            self._slots.put([make_holder() for _ in range(per_job)])
        self._scratch: dict[int, Scratch] = {}  # by thread; each thread adds only its own key

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)

    def scratch(self) -> Scratch:
        """The calling thread's own scratch."""
        key = threading.get_ident()
        mine = self._scratch.get(key)
        if mine is None:
            mine = self._scratch[key] = self._make_scratch()
        return mine

    def map(self, fn: Callable[[Scratch, Holder, Item], Result],
            items: Iterable[Item], per_job: int | None = None) -> Iterator[Result]:
        """fn(scratch, holder, item) for every item, results yielded in item order.

        `per_job` (at most the pool's) makes jobs smaller, so that a short stream of items
        still keeps every worker busy.

        When an item raises, the results of the jobs before its job are yielded, then the
        exception is raised here; the jobs after it are cancelled or waited for (no worker may
        outlive the holders it writes into) and the exception is raised here, in order.
        """
        pending: deque[tuple[list[Holder], Future]] = deque()
        items = iter(items)
        per_job = min(per_job or self.per_job, self.per_job)

        def job(slot: list[Holder], batch: list[Item]) -> list[Result]:
            scratch = self.scratch()
            return [fn(scratch, holder, item) for holder, item in zip(slot, batch, strict=False)]

        def fill() -> None:
            while len(pending) < self.in_flight:
                batch = list(islice(items, per_job))
                if not batch:
                    return
                slot = self._slots.get()
                if self._executor is None:
                    fut: Future = Future()
                    try:
                        fut.set_result(job(slot, batch))
                    except BaseException as exc:  # raised in order, like the executor's
                        fut.set_exception(exc)
                else:
                    fut = self._executor.submit(job, slot, batch)
                pending.append((slot, fut))

        fill()
        try:
            while pending:
                slot, fut = pending[0]
                results = fut.result()
                pending.popleft()
                try:
                    yield from results
                finally:  # also when the caller stops early: the holders go back
                    self._slots.put(slot)
                fill()
        finally:  # an error, or the caller stopped: wait out the jobs still in flight
            for _, other in pending:
                other.cancel()
            for other_slot, other in pending:
                if not other.cancelled():
                    other.exception()
                self._slots.put(other_slot)
