"""The ordered worker pool: results in item order, bounded work in flight, per-thread scratch."""

from __future__ import annotations

import threading
import time

import pytest

from warpmerge.pool import OrderedPool


class Scratch:
    def __init__(self) -> None:
        self.owner = threading.get_ident()


def make_pool(threads: int, per_job: int = 3) -> OrderedPool:
    return OrderedPool(threads, per_job, Scratch, lambda: [])


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_results_come_back_in_item_order(threads):
    pool = make_pool(threads)

    def fn(scratch, holder, x):
        time.sleep(0.001 * (x % 3 == 0))  # late finishers must not overtake
        return x * x

    try:
        assert list(pool.map(fn, range(50))) == [x * x for x in range(50)]
        assert list(pool.map(fn, range(7))) == [x * x for x in range(7)]  # reusable
    finally:
        pool.close()


def test_each_thread_keeps_its_own_scratch():
    pool = make_pool(3, per_job=1)
    seen: list[tuple[int, int]] = []

    def fn(scratch, holder, x):
        seen.append((threading.get_ident(), scratch.owner))
        time.sleep(0.002)
        return x

    try:
        list(pool.map(fn, range(30)))
    finally:
        pool.close()
    assert all(thread == owner for thread, owner in seen)
    assert len(pool._scratch) == len({t for t, _ in seen}) > 1


def test_work_in_flight_is_bounded_and_holders_are_reused():
    """At most threads + 1 jobs are computed ahead; a holder is reused only once its result
    has been handed on."""
    threads, per_job = 2, 2
    pool = OrderedPool(threads, per_job, Scratch, lambda: [])
    computed: list[int] = []
    holders: set[int] = set()

    def fn(scratch, holder, x):
        holder.append(x)
        holders.add(id(holder))
        computed.append(x)
        return holder

    try:
        results = pool.map(fn, range(100))
        first = next(results)
        time.sleep(0.05)  # let the workers run as far ahead as they may
        assert len(computed) <= (threads + 1) * per_job
        assert first == [0]  # untouched while the caller holds it
        rest = [holder[-1] for holder in results]  # read before asking for the next
    finally:
        pool.close()
    assert rest == list(range(1, 100))
    assert len(holders) == (threads + 1) * per_job


@pytest.mark.parametrize("threads", [1, 2])
def test_an_error_comes_out_in_order_and_the_pool_stays_usable(threads):
    pool = make_pool(threads, per_job=2)

    def fn(scratch, holder, x):
        if x == 7:
            raise ValueError("seven")
        return x

    got = []
    try:
        with pytest.raises(ValueError, match="seven"):
            for x in pool.map(fn, range(20)):
                got.append(x)
        assert got == list(range(6))  # every job before the failing one (items 6 and 7)
        assert list(pool.map(lambda s, h, x: x, range(10))) == list(range(10))
        # stopping early gives every holder back too
        early = pool.map(lambda s, h, x: x, range(100))
        assert next(early) == 0
        early.close()
        assert list(pool.map(lambda s, h, x: x, range(10))) == list(range(10))
    finally:
        pool.close()
