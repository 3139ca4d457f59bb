"""Deadlines: the request timeout counts to the end of compute, the expected compute is capped at
half the timeout, and the loop-side timer fails queued requests while the worker is busy."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from service.batching import (
    QueueTimeoutError,
)
from service.batching.deadlines import Deadlines
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


# ----------------------------------------------------------------------------- deadlines alone, on a hand-made queue


class Now:
    """A settable clock for the units that read one."""

    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def deadlines_over(loop: asyncio.AbstractEventLoop, requests: list[tuple[int, float]], *, row_s: float | None,
                   timeout_s: float, now: float = 0.0) -> tuple[Deadlines, RequestQueue[str], list[Request]]:
    """Deadlines over a queue of single-chunk requests ``(rows, arrival)`` whose futures live on ``loop``."""
    queue: RequestQueue[str] = RequestQueue(new_counts())
    reqs = []
    for rows, arrival in requests:
        req = Request(loop, loop.create_future(), 1, None)
        queue.push(req, [("p", rows)], rows, arrival)
        reqs.append(req)
    times = ComputeTimes(4)
    times.row_s = row_s
    return Deadlines(queue, times, Now(now), timeout_s=timeout_s, max_delay_s=0.0, max_batch_rows=4), queue, reqs


def outcome(loop: asyncio.AbstractEventLoop, req: Request) -> BaseException | None:
    """The exception delivered to ``req`` (None: none delivered yet), after the loop ran its callbacks."""
    loop.run_until_complete(asyncio.sleep(0))
    return req.future.exception() if req.future.done() else None


def test_expire_head_counts_the_expected_compute_of_the_next_batch() -> None:
    loop = asyncio.new_event_loop()
    try:
        # at 4.5, 6 rows queued at 0.25 s per row: the next batch (4 rows) is expected to take 1 s
        deadlines, queue, (first, second) = deadlines_over(loop, [(4, 0.0), (2, 1.0)], row_s=0.25, timeout_s=5.0)
        deadlines.expire_head(4.5)  # first: 4.5 + 1 - 0 > 5: expired; second: 4.5 + 0.5 - 1 <= 5: kept
        assert [c._request for c in queue.chunks] == [second]
        assert (queue.rows, queue.counts["timed_out"]) == (2, 1)
        error = outcome(loop, first)
        assert type(error) is QueueTimeoutError
        assert str(error) == ("request waited 4.500 s in the queue and could not be computed within timeout_s=5.0; "
                              "the service is overloaded, retry later")
        assert outcome(loop, second) is None
    finally:
        loop.close()


def test_expire_head_caps_the_expected_compute_at_half_the_timeout() -> None:
    loop = asyncio.new_event_loop()
    try:
        # 10 s per row would make any request late; counted as at most 0.5 s of the 1 s timeout
        deadlines, queue, (req,) = deadlines_over(loop, [(1, 0.0)], row_s=10.0, timeout_s=1.0)
        deadlines.expire_head(0.5)
        assert queue.rows == 1 and not req.done
        deadlines.expire_head(0.5 + 2**-10)
        assert queue.rows == 0 and req.done
        # nothing measured yet: no expected compute, only the wait counts
        deadlines, queue, (req,) = deadlines_over(loop, [(4, 0.0)], row_s=None, timeout_s=1.0)
        deadlines.expire_head(1.0)
        assert not req.done
    finally:
        loop.close()


def test_the_timer_fails_a_request_only_while_part_of_it_is_queued() -> None:
    loop = asyncio.new_event_loop()
    try:
        deadlines, queue, (taken, queued) = deadlines_over(loop, [(4, 0.0), (1, 0.25)], row_s=None, timeout_s=1.0,
                                                           now=1.25)
        queue.chunks.popleft()  # taken by the worker, as the policy takes it
        queue.rows -= 4
        taken.queued_chunks = 0  # being computed: the timeout bounds queueing, not compute
        deadlines.expire_queued(taken)
        assert not taken.done
        deadlines.expire_queued(queued)
        assert str(outcome(loop, queued)).startswith("request waited 1.000 s in the queue")
        assert (queue.rows, queue.counts["timed_out"]) == (0, 1)
        deadlines.expire_queued(queued)  # already ended: nothing more
        assert queue.counts["timed_out"] == 1
    finally:
        loop.close()


@pytest.mark.parametrize(("timeout_s", "max_delay_s", "message"), [
    (0.0, 0.0, "timeout_s must be a finite number of seconds > 0, got 0.0"),
    (float("nan"), 0.0, "timeout_s must be a finite number of seconds > 0"),
    (0.2, 0.2, r"timeout_s \(0.2\) must be greater than max_delay_s \(0.2\)"),
])
def test_deadlines_reject_bad_settings(timeout_s: float, max_delay_s: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Deadlines(RequestQueue(new_counts()), ComputeTimes(4), Now(), timeout_s=timeout_s, max_delay_s=max_delay_s,
                  max_batch_rows=4)
