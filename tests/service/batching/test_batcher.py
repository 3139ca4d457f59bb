"""The DynamicBatcher facade: its constructor's validation, submit's argument checks, cancellation."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from service.batching import (
    BatcherClosedError,
    DynamicBatcher,
    RequestTooLargeError,
)
from tests.support.batching import (
    BLOCKER,
    WAIT_S,
    FakeClock,
    RowSums,
    expected,
    in_thread,
    merge,
    run,
    running,
    spawn,
    split,
    tagged,
)


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
