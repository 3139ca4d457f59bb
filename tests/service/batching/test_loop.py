"""The worker thread: compute on it alone, stop with and without drain, start once."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import numpy as np
import pytest

from service.batching import (
    BatcherClosedError,
    DynamicBatcher,
)
from tests.support.batching import (
    BLOCKER,
    WAIT_S,
    FakeClock,
    RowSums,
    expected,
    in_thread,
    run,
    running,
    spawn,
    tagged,
)


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


class Crash(BaseException):
    """Not an Exception: escapes compute's per-item handling and ends the worker thread."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_crashed_worker_fails_its_batch_the_queue_and_later_calls(caplog: pytest.LogCaptureFixture) -> None:
    entered, release = threading.Event(), threading.Event()

    def compute(items: list[Any]) -> list[Any]:
        entered.set()
        release.wait(WAIT_S)
        raise Crash("worker killed")

    batcher: DynamicBatcher[np.ndarray, np.ndarray] = DynamicBatcher(
        compute, max_batch_rows=4, max_queue_rows=8, timeout_s=60.0)
    batcher.start()

    async def main() -> None:
        in_flight = asyncio.ensure_future(batcher.submit(tagged(1, 4), 4))
        await in_thread(lambda: entered.wait(WAIT_S))
        queued = asyncio.ensure_future(batcher.submit(tagged(2, 1), 1))
        await asyncio.sleep(0)
        release.set()
        with pytest.raises(BatcherClosedError, match="^batch worker stopped$"):
            await in_flight
        with pytest.raises(BatcherClosedError, match="^batcher stopped before the request was computed$"):
            await queued

    with caplog.at_level(logging.ERROR, logger="service.batching"):
        run(main())
    assert batcher.stop(timeout=WAIT_S)
    assert not batcher.running and not batcher.accepting
    assert "batch worker 'gga-worker' crashed" in caplog.text
    counters = batcher.counters
    assert (counters.submitted, counters.closed, counters.completed, counters.batches) == (2, 2, 0, 0)
    with pytest.raises(BatcherClosedError, match="stopping or stopped"):
        batcher.run_between(lambda: None)
