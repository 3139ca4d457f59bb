"""One batch through compute: a failing request fails alone, results are checked and merged,
on_batch gets exact statistics."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from service.batching import (
    BatchInfo,
    Chunk,
    DynamicBatcher,
)
from tests.support.batching import (
    BAD,
    WAIT_S,
    FakeClock,
    Infos,
    RowSums,
    expected,
    in_thread,
    run,
    running,
    spawn,
)


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

        with caplog.at_level(logging.ERROR, logger="service.batching"):
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
