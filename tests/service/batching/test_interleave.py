"""run_between: other work on the worker thread, between batches, never starved."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from service.batching import (
    BatcherClosedError,
    DynamicBatcher,
)
from service.batching.interleave import Interleaver
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
            while not batcher._interleave.tasks:  # queued behind the requests, at t=0
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
        while not batcher._interleave.tasks:
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


# ----------------------------------------------------------------------------- the interleaver alone


class Now:
    """A settable clock for the units that read one."""

    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_a_task_goes_when_no_request_is_queued_or_once_it_waited_background_wait() -> None:
    now = Now(2.0)
    interleave = Interleaver(now, background_wait_s=0.5)
    assert interleave.pop_due(2.0, requests_queued=False) is None  # no task
    assert interleave.wake_by(7.0) == 7.0
    first = interleave.add(lambda: "first")
    now.t = 2.25
    second = interleave.add(lambda: "second")
    assert (first.queued_at, second.queued_at) == (2.0, 2.25)
    assert interleave.wake_by(7.0) == 2.5  # the oldest task stops yielding at 2.0 + 0.5
    assert interleave.wake_by(2.125) == 2.125
    assert interleave.pop_due(2.499, requests_queued=True) is None  # yields to the queued requests
    assert interleave.pop_due(2.5, requests_queued=True) is first  # waited its 0.5 s: goes first
    assert interleave.pop_due(2.3, requests_queued=False) is second  # nothing queued: goes at once
    assert not interleave.tasks


def test_run_hands_the_result_or_any_error_to_the_waiting_caller() -> None:
    interleave = Interleaver(Now(), background_wait_s=0.0)
    ok = interleave.add(lambda: 42)

    def interrupted() -> None:
        raise KeyboardInterrupt("stop")  # not an Exception: still the caller's to handle

    bad = interleave.add(interrupted)
    for task in (ok, bad):
        Interleaver.run(task)
    assert ok.wait() == 42
    with pytest.raises(KeyboardInterrupt, match="stop"):
        bad.wait()


def test_fail_all_fails_every_waiting_task() -> None:
    interleave = Interleaver(Now(), background_wait_s=0.0)
    tasks = [interleave.add(lambda: None) for _ in range(2)]
    interleave.fail_all()
    assert not interleave.tasks
    for task in tasks:
        with pytest.raises(BatcherClosedError, match="batcher stopped before the task ran"):
            task.wait()


@pytest.mark.parametrize("bad", [-0.1, float("inf"), None, True])
def test_interleaver_rejects_a_bad_background_wait(bad: object) -> None:
    with pytest.raises(ValueError, match="background_wait_s must be a finite number of seconds >= 0"):
        Interleaver(Now(), background_wait_s=bad)  # type: ignore[arg-type]
