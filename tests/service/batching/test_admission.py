"""Admission: by rows and by estimated wait, refused at once and atomically with a Retry-After;
through the batcher and with a given compute-time estimate."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from service.batching import (
    Chunk,
    DynamicBatcher,
    QueueFullError,
    RequestTooLargeError,
)
from service.batching.admission import MIN_RETRY_AFTER_S, Admission
from service.batching.queue import Request, RequestQueue
from service.batching.stats import ComputeTimes, new_counts
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


# ------------------------------------------------------------------- admission alone, with given compute times


class Now:
    """A settable clock for the units that read one."""

    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def admission_with(queued: list[int], *, in_flight_rows: int = 0, batch_started: float = 0.0,
                   row_s: float | None = None, mean_s: float | None = None, max_wait_s: float | None = None,
                   now: float = 0.0) -> Admission:
    """Admission over a queue of single-chunk requests of ``queued`` rows, given measured compute times."""
    queue: RequestQueue[str] = RequestQueue(new_counts())
    for rows in queued:
        queue.push(Request(None, None, 1, None), [("p", rows)], rows, 0.0)  # type: ignore[arg-type]
    if in_flight_rows:
        queue.in_flight = [Chunk("f", in_flight_rows, 0.0, Request(None, None, 1, None), 0)]  # type: ignore[arg-type]
        queue.in_flight_rows, queue.batch_started = in_flight_rows, batch_started
    times = ComputeTimes(4)
    times.row_s, times.mean_s = row_s, mean_s
    return Admission(queue, times, Now(now), max_queue_rows=8, max_wait_s=max_wait_s, max_batch_rows=4,
                     max_delay_s=0.25)


def test_admission_checks_rows() -> None:
    admission = admission_with([])
    assert admission.check_rows(np.int64(3)) == 3
    assert type(admission.check_rows(np.int64(3))) is int
    for bad in (0, -1, 1.5, True, "3", None):
        with pytest.raises(ValueError, match="rows must be an int >= 1"):
            admission.check_rows(bad)
    with pytest.raises(RequestTooLargeError, match="request has 9 rows but the queue holds at most max_queue_rows=8"):
        admission.check_rows(9)
    assert admission.check_rows(8) == 8


def test_admission_by_rows_and_its_retry_after() -> None:
    admission = admission_with([4, 3], mean_s=0.5)
    assert admission.refusal(1) is None  # 8 of 8
    full = admission.refusal(2)
    assert isinstance(full, QueueFullError)
    assert str(full) == "queue full: 7 of max_queue_rows=8 rows queued, no room for 2 more; retry later"
    assert (full.retry_after_s, full.queued_rows, full.max_queue_rows, full.estimated_wait_s) == (0.5, 7, 8, None)
    assert admission.refusal(8).retry_after_s == 1.0  # 7 rows missing: 2 batches of 4 at 0.5 s
    # before the first batch the batching delay stands in for the batch time; never below 10 ms
    assert admission_with([8]).refusal(4).retry_after_s == 0.25
    floor = Admission(RequestQueue(new_counts()), ComputeTimes(4), Now(), max_queue_rows=4, max_wait_s=None,
                      max_batch_rows=4, max_delay_s=0.0)
    floor._queue.rows = 4
    assert floor.refusal(1).retry_after_s == MIN_RETRY_AFTER_S


def test_admission_estimated_wait_counts_the_rest_of_the_batch_in_flight() -> None:
    assert admission_with([4]).estimated_wait(1, 0.0) is None  # nothing measured yet
    # 4 rows in flight since t=0.5 at 0.125 s per row: 0.25 s left at t=0.75; then 4 queued + 1 own
    admission = admission_with([4], in_flight_rows=4, batch_started=0.5, row_s=0.125)
    assert admission.estimated_wait(1, 0.75) == 0.25 + 5 * 0.125
    assert admission.estimated_wait(1, 2.0) == 5 * 0.125  # the batch in flight is overdue: nothing left of it
    assert admission_with([], row_s=0.125).estimated_wait(4, 9.0) == 0.5  # idle: its own rows


def test_admission_by_estimated_wait() -> None:
    admission = admission_with([4], in_flight_rows=4, batch_started=0.5, row_s=0.125, max_wait_s=0.9, now=0.75)
    assert admission.refusal(1) is None  # 0.875 s
    shed = admission.refusal(2)  # 1.0 s
    assert str(shed) == "overloaded: estimated wait 1.00 s exceeds max_wait_s=0.9 (4 rows queued); retry later"
    assert (shed.estimated_wait_s, shed.queued_rows, shed.max_queue_rows) == (1.0, 4, 8)
    assert shed.retry_after_s == pytest.approx(0.1, abs=1e-15)
    # an idle worker admits whatever the rows bound allows: 4 rows at 1 s each is 4 s, but nothing to wait for
    assert admission_with([], row_s=1.0, max_wait_s=0.9).refusal(4) is None
    assert admission_with([1], row_s=1.0, max_wait_s=0.9).refusal(4) is not None
    assert admission_with([1], row_s=1.0).refusal(4) is None  # no wait bound: rows alone


def test_admission_rejects_a_queue_smaller_than_a_batch() -> None:
    with pytest.raises(ValueError, match=r"max_queue_rows \(2\) must be >= max_batch_rows \(4\)"):
        Admission(RequestQueue(new_counts()), ComputeTimes(4), Now(), max_queue_rows=2, max_wait_s=None,
                  max_batch_rows=4, max_delay_s=0.0)
