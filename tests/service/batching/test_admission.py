"""Admission: by rows and by estimated wait, refused at once and atomically with a Retry-After;
through the batcher and with a given compute-time estimate."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from service.batching import (
    DynamicBatcher,
    QueueFullError,
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
