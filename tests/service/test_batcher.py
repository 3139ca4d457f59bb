"""Tests of service.batcher.DynamicBatcher, without torch.

The fake compute sums rows of numpy arrays the way the service concatenates a batch,
runs one model call and splits it back. Payload rows are tagged: row i of request
``tag`` is ``[tag * 1000 + i, 1]``, so a chunk names its request and first row, and a
row's result ``tag * 1000 + i + 1`` is exact.

Determinism: the worker is controlled with threading.Events (a "blocker" request holds
compute until released) and an injected fake clock that only moves when a test moves
it (then ``batcher.wake()``), so batch compositions never depend on scheduling.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, TypeVar

import numpy as np
import pytest

from service.batcher import (
    BatcherClosedError,
    BatchInfo,
    Chunk,
    DynamicBatcher,
    QueueFullError,
    QueueTimeoutError,
    RequestTooLargeError,
)

WAIT_S = 5.0  # generous bound for waits that normally end in milliseconds
BLOCKER = 9  # compute blocks on requests with this tag until `release` is set
BAD = 13  # compute raises ValueError on requests with this tag

T = TypeVar("T")


def tagged(tag: int, n: int) -> np.ndarray:
    """Rows ``[tag * 1000 + i, 1]`` for i < n: row sum ``tag * 1000 + i + 1``."""
    x = np.ones((n, 2))
    x[:, 0] = tag * 1000 + np.arange(n)
    return x


def expected(tag: int, n: int) -> np.ndarray:
    return tag * 1000 + np.arange(n) + 1.0


def split(x: np.ndarray, start: int, stop: int) -> np.ndarray:
    return x[start:stop]


def merge(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts)


def describe(chunk: Chunk[np.ndarray]) -> tuple[int, int, int]:
    """(tag, first row, rows) of a chunk."""
    first = int(chunk.payload[0, 0])
    return first // 1000, first % 1000, chunk.rows


class FakeClock:
    """A clock that moves only when told to; counts its reads."""

    def __init__(self, t: float = 0.0) -> None:
        self._t = t
        self._cond = threading.Condition()
        self.reads = 0

    def __call__(self) -> float:
        with self._cond:
            self.reads += 1
            self._cond.notify_all()
            return self._t

    def set(self, t: float) -> None:
        with self._cond:
            self._t = t

    def advance(self, dt: float) -> None:
        with self._cond:
            self._t += dt

    def wait_reads(self, n: int) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.reads >= n, WAIT_S)


class RowSums:
    """Fake compute: per item, the row sums of its payload; records every call."""

    def __init__(self, clock: FakeClock | None = None, compute_s: float = 0.0) -> None:
        self.calls: list[list[tuple[int, int, int]]] = []
        self.threads: set[tuple[int, str]] = set()
        self.entered = threading.Event()  # a blocker request is being computed
        self.release = threading.Event()
        self._clock = clock
        self._compute_s = compute_s
        self._cond = threading.Condition()
        self._returned = 0

    def __call__(self, items: list[Chunk[np.ndarray]]) -> list[np.ndarray]:
        me = threading.current_thread()
        described = [describe(c) for c in items]
        with self._cond:
            self.threads.add((threading.get_ident(), me.name))
            self.calls.append(described)
        try:
            if any(tag == BLOCKER for tag, _, _ in described):
                self.entered.set()
                if not self.release.wait(WAIT_S):
                    raise RuntimeError("test never released the blocker")
            if self._clock is not None:
                self._clock.advance(self._compute_s)
            bad = [tag for tag, _, _ in described if tag == BAD]
            if bad:
                raise ValueError(f"bad rows from request {bad[0]}")
            x = np.concatenate([c.payload for c in items])  # one model batch
            sums = x.sum(axis=1)
            return np.split(sums, np.cumsum([c.rows for c in items])[:-1])
        finally:
            with self._cond:
                self._returned += 1
                self._cond.notify_all()

    def wait_calls(self, n: int) -> bool:
        """Block until ``n`` compute calls have returned (or raised)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._returned >= n, WAIT_S)


class Infos:
    """on_batch recorder."""

    def __init__(self) -> None:
        self.items: list[BatchInfo] = []
        self._cond = threading.Condition()

    def __call__(self, info: BatchInfo) -> None:
        with self._cond:
            self.items.append(info)
            self._cond.notify_all()

    def wait(self, n: int) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.items) >= n, WAIT_S)


@contextmanager
def running(compute: RowSums, **kwargs: Any) -> Iterator[DynamicBatcher[np.ndarray, np.ndarray]]:
    """A started batcher (defaults: rows cap 8, a delay and timeout the fake clock never reaches)."""
    settings: dict[str, Any] = dict(max_batch_rows=8, max_delay_s=1000.0, max_queue_rows=64, timeout_s=10_000.0)
    settings.update(kwargs)
    batcher: DynamicBatcher[np.ndarray, np.ndarray] = DynamicBatcher(compute, **settings)
    batcher.start()
    try:
        yield batcher
    finally:
        compute.release.set()
        assert batcher.stop(timeout=WAIT_S), "worker thread did not end"
        assert not batcher.running


def run(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run with an overall bound, so that a broken batcher fails a test instead of hanging it."""
    return asyncio.run(asyncio.wait_for(main, 2 * WAIT_S))


async def in_thread(wait: Callable[[], bool]) -> None:
    """Await a blocking wait (Event.wait, Condition.wait_for) without blocking the loop."""
    assert await asyncio.to_thread(wait), "timed out waiting for the worker"


def spawn(batcher: DynamicBatcher[np.ndarray, np.ndarray], tag: int, n: int) -> asyncio.Task[np.ndarray]:
    return asyncio.ensure_future(batcher.submit(tagged(tag, n), n, split=split, merge=merge))


# ----------------------------------------------------------------------------- batching


def test_batches_are_capped_by_rows_not_requests() -> None:
    clock = FakeClock()
    compute = RowSums()
    with running(compute, clock=clock, max_batch_rows=8) as batcher:

        async def main() -> None:
            tasks = [spawn(batcher, tag, 4) for tag in (1, 2, 3)]
            await asyncio.sleep(0)  # all three queued, in order
            await in_thread(lambda: compute.wait_calls(1))
            # 8 rows went at once; the 4 left wait for the delay, which has not elapsed
            assert compute.calls == [[(1, 0, 4), (2, 0, 4)]]
            assert batcher.queued_rows == 4
            clock.advance(1000.0)
            batcher.wake()
            results = await asyncio.gather(*tasks)
            for tag, result in zip((1, 2, 3), results, strict=True):
                np.testing.assert_array_equal(result, expected(tag, 4))

        run(main())
    assert compute.calls == [[(1, 0, 4), (2, 0, 4)], [(3, 0, 4)]]
    counters = batcher.counters
    assert (counters.batches, counters.batch_rows, counters.batch_items) == (2, 12, 3)
    assert (counters.submitted, counters.completed) == (3, 3)


def test_delay_counts_from_the_oldest_arrival() -> None:
    clock = FakeClock()
    compute = RowSums()
    infos = Infos()
    with running(compute, clock=clock, max_delay_s=1.0, on_batch=infos) as batcher:

        async def main() -> None:
            a = spawn(batcher, 1, 2)  # arrives at t=0
            await asyncio.sleep(0)
            clock.set(0.6)
            b = spawn(batcher, 2, 2)  # arrives at t=0.6
            await asyncio.sleep(0)
            assert batcher.queued_rows == 4
            clock.set(0.99)
            reads = clock.reads
            batcher.wake()
            await in_thread(lambda: clock.wait_reads(reads + 1))  # the worker saw t=0.99 ...
            assert compute.calls == []  # ... which is before 0 + 1.0: no batch
            # due at the oldest arrival + delay = 1.0, not at 0.6 + 1.0 nor a poll + 1.0
            clock.set(1.0)
            batcher.wake()
            np.testing.assert_array_equal(await a, expected(1, 2))
            np.testing.assert_array_equal(await b, expected(2, 2))
            await in_thread(lambda: infos.wait(1))

        run(main())
    assert compute.calls == [[(1, 0, 2), (2, 0, 2)]]
    assert infos.items[0].queue_wait_s == pytest.approx((1.0, 0.4), abs=1e-12)


def test_zero_delay_computes_a_lone_request_at_once() -> None:
    compute = RowSums()
    with running(compute, clock=FakeClock(), max_delay_s=0.0, timeout_s=1.0) as batcher:

        async def main() -> np.ndarray:
            return await batcher.submit(tagged(4, 3), 3)

        np.testing.assert_array_equal(run(main()), expected(4, 3))
    assert compute.calls == [[(4, 0, 3)]]


def test_default_dispatches_a_lone_request_without_waiting() -> None:
    # The fake clock never moves: under any delay > 0 this request would never be due.
    clock = FakeClock(7.0)
    compute = RowSums()
    infos = Infos()
    batcher: DynamicBatcher[np.ndarray, np.ndarray] = DynamicBatcher(
        compute, max_batch_rows=8, max_queue_rows=64, timeout_s=10_000.0, clock=clock, on_batch=infos
    )
    assert batcher.max_delay_s == 0.0  # the default: no batching delay
    batcher.start()

    async def main() -> np.ndarray:
        result = await batcher.submit(tagged(4, 3), 3)
        await in_thread(lambda: infos.wait(1))
        return result

    try:
        np.testing.assert_array_equal(run(main()), expected(4, 3))
    finally:
        assert batcher.stop(timeout=WAIT_S)
    # the batch held only that request, and it started at its arrival time
    assert compute.calls == [[(4, 0, 3)]]
    assert infos.items[0].queue_wait_s == (0.0,)


def test_service_default_delay_is_zero() -> None:
    from service.settings import Settings

    assert Settings(_env_file=None).batching.max_delay_ms == 0


def test_requests_queued_while_the_worker_is_busy_form_the_next_batches_in_fifo_order() -> None:
    clock = FakeClock()  # never moves: no batch below may wait for a delay
    compute = RowSums()
    infos = Infos()
    with running(compute, clock=clock, max_batch_rows=8, max_delay_s=0.0, on_batch=infos) as batcher:

        async def main() -> None:
            blocker = spawn(batcher, BLOCKER, 4)  # a lone request: goes at once
            await in_thread(lambda: compute.entered.wait(WAIT_S))
            sizes = [(1, 3), (2, 2), (3, 4), (4, 1), (5, 10)]
            tasks = [spawn(batcher, tag, n) for tag, n in sizes]
            await asyncio.sleep(0)  # all queued, in order, while the worker computes
            assert batcher.queued_rows == 20
            assert compute.calls == [[(BLOCKER, 0, 4)]]
            compute.release.set()
            np.testing.assert_array_equal(await blocker, expected(BLOCKER, 4))
            for task, (tag, n) in zip(tasks, sizes, strict=True):
                np.testing.assert_array_equal(await task, expected(tag, n))
            await in_thread(lambda: infos.wait(5))
            # free again: the next lone request goes alone, at once
            np.testing.assert_array_equal(await spawn(batcher, 6, 2), expected(6, 2))

        run(main())
    # each batch is the longest FIFO prefix of the queue that fits in 8 rows
    assert compute.calls == [
        [(BLOCKER, 0, 4)],
        [(1, 0, 3), (2, 0, 2)],  # + 4 rows of request 3 would be 9
        [(3, 0, 4), (4, 0, 1)],  # + the first 8-row chunk of request 5 would be 13
        [(5, 0, 8)],
        [(5, 8, 2)],
        [(6, 0, 2)],
    ]
    assert [info.rows for info in infos.items[:5]] == [4, 5, 5, 8, 2]
    assert all(wait == 0.0 for info in infos.items for wait in info.queue_wait_s)


def test_configured_delay_counts_from_the_oldest_arrival_even_after_a_busy_worker() -> None:
    clock = FakeClock()
    compute = RowSums()
    infos = Infos()
    with running(compute, clock=clock, max_batch_rows=8, max_delay_s=1.0, on_batch=infos) as batcher:

        async def main() -> None:
            blocker = spawn(batcher, BLOCKER, 8)  # a full batch goes without waiting for the delay
            await in_thread(lambda: compute.entered.wait(WAIT_S))
            clock.set(0.2)
            a = spawn(batcher, 1, 2)  # arrives at t=0.2 while the worker is busy
            await asyncio.sleep(0)
            clock.set(0.7)
            b = spawn(batcher, 2, 2)  # arrives at t=0.7
            await asyncio.sleep(0)
            clock.set(0.9)
            compute.release.set()  # the worker is free at t=0.9, but nothing is due before 0.2 + 1.0
            np.testing.assert_array_equal(await blocker, expected(BLOCKER, 8))
            await in_thread(lambda: infos.wait(1))  # the worker's next clock read is its batching check
            for t in (0.9, 1.19):
                clock.set(t)
                reads = clock.reads
                batcher.wake()
                await in_thread(partial(clock.wait_reads, reads + 1))
                assert compute.calls == [[(BLOCKER, 0, 8)]]
                assert batcher.queued_rows == 4
            clock.set(1.2)
            batcher.wake()
            np.testing.assert_array_equal(await a, expected(1, 2))
            np.testing.assert_array_equal(await b, expected(2, 2))
            await in_thread(lambda: infos.wait(2))

        run(main())
    assert compute.calls == [[(BLOCKER, 0, 8)], [(1, 0, 2), (2, 0, 2)]]
    assert infos.items[1].queue_wait_s == pytest.approx((1.0, 0.5), abs=1e-12)


def test_large_request_is_split_across_batches_and_reassembled_in_order() -> None:
    clock = FakeClock()
    compute = RowSums()
    with running(compute, clock=clock, max_batch_rows=4) as batcher:

        async def main() -> list[np.ndarray]:
            return await asyncio.gather(spawn(batcher, 1, 10), spawn(batcher, 2, 2))

        big, small = run(main())
    # chunks of at most 4 rows; the last chunk of request 1 shares a batch with request 2
    assert compute.calls == [[(1, 0, 4)], [(1, 4, 4)], [(1, 8, 2), (2, 0, 2)]]
    np.testing.assert_array_equal(big, expected(1, 10))
    np.testing.assert_array_equal(small, expected(2, 2))


def test_many_concurrent_requests_get_their_own_results_in_fifo_batches() -> None:
    rng = np.random.default_rng(0)
    sizes = [int(n) for n in rng.integers(1, 21, size=30)]
    compute = RowSums()
    # real clock, tiny delay: compositions depend on timing, the invariants must not
    with running(compute, max_batch_rows=8, max_delay_s=0.002, max_queue_rows=1000, timeout_s=60.0) as batcher:

        async def main() -> list[np.ndarray]:
            return await asyncio.gather(*(spawn(batcher, tag, n) for tag, n in enumerate(sizes, start=100)))

        results = run(main())
    for tag, (n, result) in enumerate(zip(sizes, results, strict=True), start=100):
        np.testing.assert_array_equal(result, expected(tag, n))
    assert all(sum(rows for _, _, rows in call) <= 8 for call in compute.calls)
    chunks = [chunk for call in compute.calls for chunk in call]
    fifo = [(tag, s, min(8, n - s)) for tag, n in enumerate(sizes, start=100) for s in range(0, n, 8)]
    assert chunks == fifo


def test_compute_runs_on_one_worker_thread_not_the_event_loop() -> None:
    compute = RowSums()
    with running(compute, max_delay_s=0.0, timeout_s=60.0, name="test-worker") as batcher:

        async def main() -> int:
            await asyncio.gather(*(batcher.submit(tagged(t, 1), 1) for t in range(5)))
            return threading.get_ident()

        loop_thread = run(main())
    assert len(compute.threads) == 1
    ((ident, name),) = compute.threads
    assert ident != loop_thread
    assert name == "test-worker"


# ----------------------------------------------------------------------------- admission


def test_full_queue_rejects_at_once_and_atomically() -> None:
    clock = FakeClock()
    compute = RowSums(clock, compute_s=0.5)
    with running(compute, clock=clock, max_batch_rows=4, max_queue_rows=8) as batcher:

        async def main() -> None:
            await batcher.submit(tagged(1, 4), 4)  # one batch of compute_s = 0.5
            blocker = spawn(batcher, BLOCKER, 4)
            await in_thread(lambda: compute.entered.wait(WAIT_S))
            queued = [spawn(batcher, 2, 4), spawn(batcher, 3, 3)]
            await asyncio.sleep(0)
            assert batcher.queued_rows == 7
            # 2 rows do not fit in the 1 left: nothing of it is queued; compute is still blocked
            with pytest.raises(QueueFullError) as info:
                await batcher.submit(tagged(4, 2), 2)
            assert not compute.release.is_set()
            assert batcher.queued_rows == 7
            assert info.value.retry_after_s == pytest.approx(0.5)  # 1 batch to free, mean compute 0.5 s
            assert (info.value.queued_rows, info.value.max_queue_rows) == (7, 8)
            # 8 rows missing = 2 batches of 4
            with pytest.raises(QueueFullError) as info:
                await batcher.submit(tagged(5, 8), 8, split=split, merge=merge)
            assert info.value.retry_after_s == pytest.approx(1.0)
            fits = spawn(batcher, 6, 1)
            await asyncio.sleep(0)
            assert batcher.queued_rows == 8
            compute.release.set()
            clock.advance(1000.0)
            batcher.wake()
            np.testing.assert_array_equal(await blocker, expected(BLOCKER, 4))
            for task, (tag, n) in zip([*queued, fits], [(2, 4), (3, 3), (6, 1)], strict=True):
                np.testing.assert_array_equal(await task, expected(tag, n))

        run(main())
    seen = {tag for call in compute.calls for tag, _, _ in call}
    assert seen == {1, BLOCKER, 2, 3, 6}
    assert batcher.counters.rejected == 2
    assert batcher.counters.submitted == 5


def test_submit_validates_its_arguments() -> None:
    compute = RowSums()
    batcher: DynamicBatcher[np.ndarray, np.ndarray] = DynamicBatcher(
        compute, max_batch_rows=4, max_delay_s=0.0, max_queue_rows=8, timeout_s=1.0
    )

    async def main() -> None:
        with pytest.raises(BatcherClosedError, match="start"):
            await batcher.submit(tagged(1, 1), 1)
        batcher.start()
        for rows in (0, -1, 1.5, True, "3"):
            with pytest.raises(ValueError, match="rows must be an int"):
                await batcher.submit(tagged(1, 1), rows)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="split"):
            await batcher.submit(tagged(1, 5), 5)
        with pytest.raises(ValueError, match="merge"):
            await batcher.submit(tagged(1, 5), 5, split=split)
        with pytest.raises(RequestTooLargeError, match="max_queue_rows=8"):
            await batcher.submit(tagged(1, 9), 9, split=split, merge=merge)
        assert batcher.queued_rows == 0
        np.testing.assert_array_equal(await batcher.submit(tagged(2, np.int64(3)), np.int64(3)), expected(2, 3))

    try:
        run(main())
    finally:
        assert batcher.stop(timeout=WAIT_S)
    assert compute.calls == [[(2, 0, 3)]]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(max_batch_rows=0), "max_batch_rows must be an int >= 1"),
        (dict(max_batch_rows=2.0), "max_batch_rows must be an int >= 1"),
        (dict(max_queue_rows=0), "max_queue_rows must be an int >= 1"),
        (dict(max_queue_rows=4), r"max_queue_rows \(4\) must be >= max_batch_rows \(8\)"),
        (dict(max_delay_s=-0.1), "max_delay_s must be a finite number"),
        (dict(max_delay_s=float("nan")), "max_delay_s must be a finite number"),
        (dict(timeout_s=0), "timeout_s must be a finite number"),
        (dict(timeout_s=float("inf")), "timeout_s must be a finite number"),
        (dict(timeout_s=0.5, max_delay_s=0.5), "timeout_s .* must be greater than max_delay_s"),
        (dict(compute=None), "compute must be callable"),
        (dict(on_batch=3), "on_batch must be callable"),
        (dict(clock=1.0), "clock must be a callable"),
        (dict(name=""), "name must be a non-empty string"),
    ],
)
def test_constructor_rejects_bad_settings(kwargs: dict[str, Any], message: str) -> None:
    settings: dict[str, Any] = dict(
        compute=RowSums(), max_batch_rows=8, max_delay_s=0.01, max_queue_rows=64, timeout_s=1.0
    )
    settings.update(kwargs)
    compute = settings.pop("compute")
    with pytest.raises(ValueError, match=message):
        DynamicBatcher(compute, **settings)


# ----------------------------------------------------------------------------- timeouts


def test_request_that_waited_too_long_is_never_computed() -> None:
    clock = FakeClock()
    compute = RowSums()
    with running(compute, clock=clock, max_batch_rows=4, max_delay_s=0.0, timeout_s=5.0) as batcher:

        async def main() -> None:
            blocker = spawn(batcher, BLOCKER, 4)
            await in_thread(lambda: compute.entered.wait(WAIT_S))
            late = spawn(batcher, 2, 6)  # two chunks, both queued at t=0
            await asyncio.sleep(0)
            clock.set(5.5)  # the worker is still busy: late has waited 5.5 s of its 5 s
            fresh = spawn(batcher, 3, 1)
            await asyncio.sleep(0)
            compute.release.set()  # the blocker took 5.5 s for 4 rows: 1.375 s per row
            np.testing.assert_array_equal(await blocker, expected(BLOCKER, 4))
            with pytest.raises(QueueTimeoutError, match="timeout_s=5.0"):
                await late
            # fresh: no wait yet, 1.375 s of compute expected: well within its 5 s
            np.testing.assert_array_equal(await fresh, expected(3, 1))

        run(main())
    assert compute.calls == [[(BLOCKER, 0, 4)], [(3, 0, 1)]]
    assert batcher.counters.timed_out == 1
    assert batcher.queued_rows == 0


def test_request_that_could_not_finish_in_time_is_not_computed() -> None:
    """The timeout bounds arrival to the end of compute: a wait plus the expected compute
    of the batch beyond ``timeout_s`` is a 504 now, not a late answer."""
    clock = FakeClock()
    compute = RowSums(clock, compute_s=1.0)
    with running(compute, clock=clock, max_batch_rows=4, max_delay_s=0.0, timeout_s=5.0) as batcher:

        async def main() -> None:
            await batcher.submit(tagged(1, 4), 4)  # t=0..1: 0.25 s per row measured
            assert batcher.row_compute_s == pytest.approx(0.25)
            blocker = spawn(batcher, BLOCKER, 4)  # t=1
            await in_thread(lambda: compute.entered.wait(WAIT_S))
            a = spawn(batcher, 2, 4)  # t=1
            await asyncio.sleep(0)
            clock.set(4.5)
            b = spawn(batcher, 3, 2)  # t=4.5
            await asyncio.sleep(0)
            compute.release.set()  # the blocker ends at 5.5: 1.125 s per row, averaged to 0.425
            await blocker
            # at 5.5 a has waited 4.5 s of its 5; its batch (4 of the 6 queued rows) is expected to
            # take 1.7 s, ending at 7.2 > 6: not computed. b (waited 1 s, 0.85 s expected) is.
            with pytest.raises(QueueTimeoutError):
                await a
            np.testing.assert_array_equal(await b, expected(3, 2))

        run(main())
    assert compute.calls == [[(1, 0, 4)], [(BLOCKER, 0, 4)], [(3, 0, 2)]]
    assert batcher.counters.timed_out == 1


def test_one_slow_batch_does_not_time_out_fresh_requests() -> None:
    """The expected compute counts for at most half the timeout: after a batch slower than the
    whole timeout, a fresh request is still computed (else nothing would ever run again)."""
    clock = FakeClock()
    compute = RowSums(clock, compute_s=3.0)
    with running(compute, clock=clock, max_batch_rows=4, max_delay_s=0.0, timeout_s=1.0) as batcher:

        async def main() -> None:
            np.testing.assert_array_equal(await batcher.submit(tagged(1, 1), 1), expected(1, 1))
            assert batcher.row_compute_s == 3.0  # 3 s per row, three times the timeout
            np.testing.assert_array_equal(await batcher.submit(tagged(2, 1), 1), expected(2, 1))

        run(main())
    assert batcher.counters.timed_out == 0


def test_wait_bound_sheds_by_estimated_time() -> None:
    clock = FakeClock()
    compute = RowSums(clock, compute_s=0.5)
    with running(compute, clock=clock, max_batch_rows=4, max_delay_s=0.0, max_wait_s=0.9) as batcher:

        async def main() -> None:
            assert batcher.estimated_wait_s(1) is None  # nothing measured: only the rows bound applies
            await batcher.submit(tagged(1, 4), 4)  # 0.125 s per row
            assert batcher.estimated_wait_s(4) == 0.5  # idle worker: its own rows
            blocker = spawn(batcher, BLOCKER, 4)  # taken at t=0.5, 0.5 s expected
            await in_thread(lambda: compute.entered.wait(WAIT_S))
            clock.advance(0.25)
            assert batcher.estimated_wait_s(1) == 0.25 + 0.125
            queued = spawn(batcher, 2, 4)  # 0.25 + 0.5 = 0.75 s: admitted
            await asyncio.sleep(0)
            assert batcher.queued_rows == 4
            assert batcher.admits(1)  # 0.875 s
            assert not batcher.admits(2)  # 1.0 s
            with pytest.raises(QueueFullError, match=r"estimated wait 1\.00 s exceeds max_wait_s=0\.9") as info:
                await batcher.submit(tagged(3, 2), 2)
            assert info.value.estimated_wait_s == 1.0
            assert info.value.retry_after_s == pytest.approx(0.1)
            assert batcher.queued_rows == 4  # nothing of it was queued
            assert batcher.counters.rejected == 1
            compute.release.set()
            np.testing.assert_array_equal(await blocker, expected(BLOCKER, 4))
            np.testing.assert_array_equal(await queued, expected(2, 4))

        run(main())
    assert compute.calls == [[(1, 0, 4)], [(BLOCKER, 0, 4)], [(2, 0, 4)]]
    assert batcher.counters.completed == 3


def test_wait_bound_validation() -> None:
    for bad in (0, -1.0, float("inf"), float("nan"), True, "1"):
        with pytest.raises(ValueError, match="max_wait_s must be a finite number"):
            DynamicBatcher(RowSums(), max_batch_rows=4, max_queue_rows=8, timeout_s=1.0, max_wait_s=bad)


def test_awaiter_times_out_while_the_worker_is_busy() -> None:
    compute = RowSums()
    # real clock: the loop-side timer fires after timeout_s even though compute is blocked
    with running(compute, max_batch_rows=4, max_delay_s=0.0, timeout_s=0.2) as batcher:

        async def main() -> None:
            blocker = spawn(batcher, BLOCKER, 4)
            await in_thread(lambda: compute.entered.wait(WAIT_S))
            t0 = time.monotonic()
            with pytest.raises(QueueTimeoutError):
                await batcher.submit(tagged(2, 6), 6, split=split, merge=merge)
            waited = time.monotonic() - t0
            assert not compute.release.is_set()
            assert 0.15 <= waited < WAIT_S
            assert batcher.queued_rows == 0  # its chunks were dropped
            compute.release.set()
            # the blocker was being computed, not queued: it is not timed out
            np.testing.assert_array_equal(await blocker, expected(BLOCKER, 4))

        run(main())
    assert compute.calls == [[(BLOCKER, 0, 4)]]
    assert (batcher.counters.timed_out, batcher.counters.completed) == (1, 1)


# ----------------------------------------------------------------------------- failures


def test_a_failing_item_fails_alone() -> None:
    clock = FakeClock()
    compute = RowSums()
    infos = Infos()
    with running(compute, clock=clock, max_batch_rows=6, on_batch=infos) as batcher:

        async def main() -> list[Any]:
            tasks = [spawn(batcher, 1, 2), spawn(batcher, BAD, 2), spawn(batcher, 3, 2)]
            results = await asyncio.gather(*tasks, return_exceptions=True)
            await in_thread(lambda: infos.wait(1))
            return results

        good1, bad, good3 = run(main())
    np.testing.assert_array_equal(good1, expected(1, 2))
    np.testing.assert_array_equal(good3, expected(3, 2))
    assert type(bad) is ValueError
    assert str(bad) == "bad rows from request 13"
    # the batch call failed, then each item was retried on its own
    assert compute.calls == [[(1, 0, 2), (BAD, 0, 2), (3, 0, 2)], [(1, 0, 2)], [(BAD, 0, 2)], [(3, 0, 2)]]
    (info,) = infos.items
    assert (info.rows, info.n_items, info.n_requests, info.n_failed, info.retried) == (6, 3, 3, 1, True)
    counters = batcher.counters
    assert (counters.completed, counters.failed, counters.batches) == (2, 1, 1)


def test_a_failing_chunk_fails_its_whole_request_only() -> None:
    def compute_fn(items: list[Chunk[tuple[str, int]]]) -> list[str]:
        if any(name == "x" and start == 2 for name, start in (c.payload for c in items)):
            raise KeyError("chunk x@2")
        return [f"{name}@{start}" for name, start in (c.payload for c in items)]

    batcher: DynamicBatcher[tuple[str, int], str] = DynamicBatcher(
        compute_fn, max_batch_rows=2, max_delay_s=0.0, max_queue_rows=16, timeout_s=60.0
    )
    batcher.start()

    async def main() -> list[Any]:
        def split_named(name: str) -> Callable[[tuple[str, int], int, int], tuple[str, int]]:
            return lambda payload, start, stop: (name, start)

        return await asyncio.gather(
            batcher.submit(("x", 0), 5, split=split_named("x"), merge="+".join),
            batcher.submit(("y", 0), 5, split=split_named("y"), merge="+".join),
            return_exceptions=True,
        )

    try:
        x, y = run(main())
    finally:
        assert batcher.stop(timeout=WAIT_S)
    assert type(x) is KeyError
    assert y == "y@0+y@2+y@4"


def test_wrong_number_of_results_fails_the_request() -> None:
    batcher: DynamicBatcher[int, int] = DynamicBatcher(
        lambda items: [], max_batch_rows=2, max_delay_s=0.0, max_queue_rows=4, timeout_s=1.0
    )
    batcher.start()
    try:
        with pytest.raises(RuntimeError, match="one result per item"):
            run(batcher.submit(7, 1))
    finally:
        assert batcher.stop(timeout=WAIT_S)


def test_on_batch_gets_exact_stats_and_its_errors_do_not_stop_the_worker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    compute = RowSums(clock, compute_s=0.25)
    infos = Infos()

    def on_batch(info: BatchInfo) -> None:
        infos(info)
        raise RuntimeError("metrics backend down")

    with running(compute, clock=clock, max_batch_rows=8, on_batch=on_batch) as batcher:

        async def main() -> None:
            a = spawn(batcher, 1, 3)  # t=0
            await asyncio.sleep(0)
            clock.set(2.0)
            b = spawn(batcher, 2, 16)  # t=2: two chunks of 8 rows
            await asyncio.gather(a, b)
            await in_thread(lambda: infos.wait(2))

        with caplog.at_level(logging.ERROR, logger="service.batcher"):
            run(main())
    # at t=2, 19 rows queued: 3 + 8 rows do not fit in 8, so [1] goes alone, then [2@0], then [2@8]
    assert compute.calls == [[(1, 0, 3)], [(2, 0, 8)], [(2, 8, 8)]]
    assert infos.items[0] == BatchInfo(
        rows=3, n_items=1, n_requests=1, queue_wait_s=(2.0,), compute_s=0.25, n_failed=0, retried=False
    )
    assert infos.items[1].queue_wait_s == (0.25,)  # started at t=2.25, arrived at t=2
    assert infos.items[1].rows == 8
    assert len(infos.items) == 3
    assert "on_batch callback raised" in caplog.text
    assert batcher.mean_compute_s == pytest.approx(0.25)


# ----------------------------------------------------------------------------- cancellation


def test_cancelled_requests_break_nothing() -> None:
    clock = FakeClock()
    compute = RowSums()
    errors: list[dict[str, Any]] = []
    with running(compute, clock=clock, max_batch_rows=4) as batcher:

        async def main() -> None:
            asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
            in_flight = spawn(batcher, BLOCKER, 4)
            await in_thread(lambda: compute.entered.wait(WAIT_S))
            queued = spawn(batcher, 2, 6)
            keeper = spawn(batcher, 3, 2)
            await asyncio.sleep(0)
            assert batcher.queued_rows == 8
            queued.cancel()  # a client disconnect while queued: its chunks leave the queue
            in_flight.cancel()  # ... and while its batch is being computed
            for task in (queued, in_flight):
                with pytest.raises(asyncio.CancelledError):
                    await task
            assert batcher.queued_rows == 2
            compute.release.set()
            clock.advance(1000.0)
            batcher.wake()
            np.testing.assert_array_equal(await keeper, expected(3, 2))
            await in_thread(lambda: compute.wait_calls(2))
            await asyncio.sleep(0.01)  # let any late callback of the cancelled ones run

        run(main())
    assert errors == []
    assert compute.calls == [[(BLOCKER, 0, 4)], [(3, 0, 2)]]
    counters = batcher.counters
    assert (counters.cancelled, counters.completed) == (2, 1)


# ----------------------------------------------------------------------------- lifecycle


def test_stop_fails_queued_requests_lets_the_batch_in_flight_finish_and_joins() -> None:
    compute = RowSums()
    batcher: DynamicBatcher[np.ndarray, np.ndarray] = DynamicBatcher(
        compute,
        max_batch_rows=4,
        max_delay_s=1000.0,
        max_queue_rows=64,
        timeout_s=10_000.0,
        clock=FakeClock(),
    )
    batcher.start()
    assert batcher.running

    async def main() -> None:
        in_flight = spawn(batcher, BLOCKER, 4)
        await in_thread(lambda: compute.entered.wait(WAIT_S))
        queued = [spawn(batcher, 2, 6), spawn(batcher, 3, 1)]
        await asyncio.sleep(0)
        stopping = asyncio.ensure_future(batcher.astop(timeout=WAIT_S))
        await asyncio.sleep(0)  # astop has stopped accepting before its first await
        assert not batcher.accepting
        with pytest.raises(BatcherClosedError):
            await batcher.submit(tagged(4, 1), 1)
        for task in queued:
            with pytest.raises(BatcherClosedError):
                await task
        assert batcher.queued_rows == 0
        assert not stopping.done()  # still joining: the batch in flight is blocked
        compute.release.set()
        np.testing.assert_array_equal(await in_flight, expected(BLOCKER, 4))
        assert await stopping is True

    try:
        run(main())
    finally:
        compute.release.set()
        batcher.stop(timeout=WAIT_S)
    assert not batcher.running
    assert compute.calls == [[(BLOCKER, 0, 4)]]
    assert (batcher.counters.closed, batcher.counters.completed) == (2, 1)
    assert batcher.stop() is True  # idempotent
    with pytest.raises(RuntimeError, match="started once"):
        batcher.start()


def test_stop_with_drain_computes_the_queue_without_waiting_for_the_delay() -> None:
    compute = RowSums()
    batcher: DynamicBatcher[np.ndarray, np.ndarray] = DynamicBatcher(
        compute,
        max_batch_rows=4,
        max_delay_s=1000.0,
        max_queue_rows=64,
        timeout_s=10_000.0,
        clock=FakeClock(),
    )
    batcher.start()

    async def main() -> list[np.ndarray]:
        tasks = [spawn(batcher, 1, 2), spawn(batcher, 2, 1)]
        await asyncio.sleep(0)
        assert batcher.queued_rows == 3  # below the cap; the fake clock never reaches the delay
        assert await batcher.astop(drain=True, timeout=WAIT_S)
        return await asyncio.gather(*tasks)

    try:
        first, second = run(main())
    finally:
        batcher.stop(timeout=WAIT_S)
    np.testing.assert_array_equal(first, expected(1, 2))
    np.testing.assert_array_equal(second, expected(2, 1))
    assert compute.calls == [[(1, 0, 2), (2, 0, 1)]]
    assert not batcher.running


# ----------------------------------------------------------------------------- other work on the worker


def test_run_between_runs_on_the_worker_when_no_request_is_queued() -> None:
    compute = RowSums()
    with running(compute, max_batch_rows=4, max_delay_s=0.0) as batcher:
        assert batcher.run_between(lambda: threading.current_thread().name) == "gga-worker"
        with pytest.raises(KeyError, match="boom"):  # its error reaches the caller, the worker lives on
            batcher.run_between(lambda: {}["boom"])

        async def main() -> np.ndarray:
            return await batcher.submit(tagged(1, 2), 2)

        np.testing.assert_array_equal(run(main()), expected(1, 2))
    # before start and on the worker itself it runs at once, inline
    idle = DynamicBatcher(RowSums(), max_batch_rows=4, max_queue_rows=8, timeout_s=1.0)
    assert idle.run_between(lambda: threading.current_thread().name) == threading.current_thread().name


@pytest.mark.parametrize(("queued", "waited", "computed_before"), [
    ((2, 3), 0.5, 3),  # waited less than background_wait_s: after the queued requests (the blocker, 2 and 3)
    ((2,), 1.0, 1),  # waited its 1 s: before the queued request, right after the blocker
])
def test_run_between_waits_behind_queued_requests_at_most_background_wait(queued, waited, computed_before) -> None:
    """Under load a task goes after the queued requests unless it has waited background_wait_s."""
    clock = FakeClock()
    compute = RowSums()
    with running(compute, clock=clock, max_batch_rows=4, max_delay_s=0.0, background_wait_s=1.0) as batcher:
        seen: list[int] = []

        async def main() -> None:
            blocker = spawn(batcher, BLOCKER, 4)
            await in_thread(lambda: compute.entered.wait(WAIT_S))
            requests = [spawn(batcher, tag, 4) for tag in queued]
            await asyncio.sleep(0)
            task = asyncio.ensure_future(asyncio.to_thread(
                batcher.run_between, lambda: seen.append(len(compute.calls))))
            while not batcher._tasks:  # queued behind the requests, at t=0
                await asyncio.sleep(0.001)
            clock.set(waited)
            compute.release.set()
            await asyncio.gather(blocker, *requests, task)

        run(main())
        assert seen == [computed_before]  # compute calls done when the task ran
    assert compute.calls == [[(BLOCKER, 0, 4)], *[[(tag, 0, 4)] for tag in queued]]


def test_run_between_fails_when_the_batcher_stops() -> None:
    compute = RowSums()
    batcher: DynamicBatcher[np.ndarray, np.ndarray] = DynamicBatcher(
        compute, max_batch_rows=4, max_queue_rows=8, timeout_s=10.0)
    batcher.start()
    errors: list[BaseException] = []

    async def main() -> None:
        blocker = spawn(batcher, BLOCKER, 4)
        await in_thread(lambda: compute.entered.wait(WAIT_S))
        queued = spawn(batcher, 2, 1)
        await asyncio.sleep(0)

        def waiting_task() -> None:
            try:
                batcher.run_between(lambda: None)
            except BatcherClosedError as exc:
                errors.append(exc)

        t = threading.Thread(target=waiting_task)
        t.start()
        while not batcher._tasks:
            await asyncio.sleep(0.001)
        stopping = asyncio.ensure_future(batcher.astop(drain=True, timeout=WAIT_S))
        await in_thread(lambda: (t.join(WAIT_S), not t.is_alive())[1])  # failed at once, not drained
        compute.release.set()
        await blocker
        np.testing.assert_array_equal(await queued, expected(2, 1))  # requests are drained
        assert await stopping

    run(main())
    assert [str(e) for e in errors] == ["batcher stopped before the task ran"]
    with pytest.raises(BatcherClosedError):
        batcher.run_between(lambda: None)
