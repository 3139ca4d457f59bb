"""The batching policy: rows not requests, dispatch when free or after the delay from the oldest
arrival, FIFO prefixes; through the batcher and on a hand-made queue."""

from __future__ import annotations

import asyncio
import math
from functools import partial
from typing import Any

import numpy as np
import pytest

from service.batching import (
    DynamicBatcher,
)
from service.batching.policy import BatchPolicy
from service.batching.queue import Request, RequestQueue
from service.batching.stats import new_counts
from tests.support.batching import (
    BLOCKER,
    WAIT_S,
    FakeClock,
    Infos,
    RowSums,
    expected,
    in_thread,
    merge,
    run,
    running,
    spawn,
    tagged,
)


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


# ----------------------------------------------------------------------------- the policy alone, on a hand-made queue


def queue_of(*requests: tuple[int, float]) -> RequestQueue[str]:
    """A queue holding one single-chunk request per ``(rows, arrival)``, payload ``"r<i>"``."""
    queue: RequestQueue[str] = RequestQueue(new_counts())
    for i, (rows, arrival) in enumerate(requests):
        queue.push(Request(None, None, 1, None), [(f"r{i}", rows)], rows, arrival)  # type: ignore[arg-type]
    return queue


def test_policy_cuts_a_request_into_pieces_of_at_most_max_batch_rows() -> None:
    policy: BatchPolicy[str] = BatchPolicy(queue_of(), max_batch_rows=4, max_delay_s=0.0)
    cuts: list[tuple[int, int]] = []

    def record(payload: str, start: int, stop: int) -> str:
        cuts.append((start, stop))
        return f"{payload}[{start}:{stop}]"

    assert policy.pieces("x", 10, record, merge) == [("x[0:4]", 4), ("x[4:8]", 4), ("x[8:10]", 2)]
    assert cuts == [(0, 4), (4, 8), (8, 10)]
    assert policy.pieces("y", 4, record, merge) == [("y", 4)]  # fits in one batch: never split
    assert policy.pieces("z", 1, None, None) == [("z", 1)]  # ... so split and merge are not needed
    assert cuts == [(0, 4), (4, 8), (8, 10)]
    for missing in (dict(split=record, merge=None), dict(split=None, merge=merge)):
        with pytest.raises(ValueError, match=r"a request of 5 rows exceeds max_batch_rows=4: pass split"):
            policy.pieces("w", 5, **missing)


def test_policy_due_is_now_without_delay_when_full_or_draining_else_oldest_arrival_plus_delay() -> None:
    assert BatchPolicy(queue_of((1, 5.0)), max_batch_rows=4, max_delay_s=0.0).due(False) == -math.inf
    delayed = queue_of((1, 2.0), (2, 2.5))
    policy = BatchPolicy(delayed, max_batch_rows=4, max_delay_s=1.0)
    assert policy.due(False) == 3.0  # the head's arrival + delay, not the newest's
    assert policy.due(True) == -math.inf  # draining: go now
    full = queue_of((1, 2.0), (3, 2.5))  # 4 rows: a full batch
    assert BatchPolicy(full, max_batch_rows=4, max_delay_s=1.0).due(False) == -math.inf


def test_policy_take_pops_the_longest_fifo_prefix_that_fits() -> None:
    queue = queue_of((2, 0.0), (1, 0.1), (3, 0.2), (1, 0.3))
    policy = BatchPolicy(queue, max_batch_rows=4, max_delay_s=0.0)
    batch = policy.take()
    assert [c.payload for c in batch] == ["r0", "r1"]  # + 3 rows of r2 would be 6: r3 (fits) is not taken past it
    assert (queue.rows, queue.in_flight, queue.in_flight_rows) == (4, batch, 3)
    assert [c._request.queued_chunks for c in batch] == [0, 0]
    assert [c.payload for c in queue.chunks] == ["r2", "r3"]
    assert [c.payload for c in policy.take()] == ["r2", "r3"]
    assert (queue.rows, queue.in_flight_rows, len(queue.chunks)) == (0, 4, 0)
    assert policy.take() == [] and queue.in_flight_rows == 0


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(max_batch_rows=0, max_delay_s=0.0), "max_batch_rows must be an int >= 1, got 0"),
    (dict(max_batch_rows=True, max_delay_s=0.0), "max_batch_rows must be an int >= 1, got True"),
    (dict(max_batch_rows=4, max_delay_s=float("inf")), "max_delay_s must be a finite number of seconds >= 0"),
    (dict(max_batch_rows=4, max_delay_s="0"), "max_delay_s must be a finite number of seconds >= 0"),
])
def test_policy_rejects_bad_settings(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BatchPolicy(queue_of(), **kwargs)
