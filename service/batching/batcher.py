"""DynamicBatcher: the public face of the batching units, composed around one lock.

The event loop never computes. :meth:`DynamicBatcher.submit` checks a request (admission),
cuts it into chunks and queues it (queue, policy); the worker thread (loop) times out what
waited too long (deadlines), runs ``run_between`` tasks between batches (interleave), takes
batches by the policy, computes them and delivers each result to its awaiting coroutine
(execute). The units share state under the batcher's one ``threading.Condition``; their
lock-held methods are called only from here, the worker loop and the runner.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from service.batching.admission import Admission
from service.batching.deadlines import Deadlines
from service.batching.errors import BatcherClosedError
from service.batching.execute import BatchRunner
from service.batching.interleave import Interleaver
from service.batching.loop import NEW, RUNNING, WorkerLoop
from service.batching.policy import BatchPolicy
from service.batching.queue import Chunk, Request, RequestQueue
from service.batching.stats import BatcherCounters, BatchInfo, ComputeTimes, new_counts

__all__ = ["DynamicBatcher"]

T = TypeVar("T")  # result of a run_between task
P = TypeVar("P")  # payload type: whatever the submitter queues (e.g. an array of rows)
R = TypeVar("R")  # result type: whatever compute returns per item


class DynamicBatcher(Generic[P, R]):
    """Batch rows from many coroutines into calls of ``compute`` on one worker thread.

    Args (each unit's module states the semantics):
        compute: ``compute(items: list[Chunk[P]]) -> Sequence[R]``, called on the worker thread with
            one batch; one result per item, in order (:mod:`~service.batching.execute`).
        max_batch_rows, max_delay_s: the batching policy (:mod:`~service.batching.policy`); the default
            delay 0 dispatches as soon as the worker is free.
        max_queue_rows, max_wait_s: admission (:mod:`~service.batching.admission`); ``max_queue_rows >=
            max_batch_rows``; ``max_wait_s=None``: rows alone bound the queue.
        timeout_s: arrival to the end of compute (:mod:`~service.batching.deadlines`); > ``max_delay_s``.
        on_batch: optional ``on_batch(BatchInfo)``, on the worker thread after each batch (metrics).
        clock: monotonic seconds (inject a fake one in tests and call :meth:`wake` after moving it).
        name: the worker thread's name.
        background_wait_s: longest wait of a :meth:`run_between` task behind queued requests
            (:mod:`~service.batching.interleave`).
    """

    def __init__(
        self,
        compute: Callable[[list[Chunk[P]]], Sequence[R]],
        *,
        max_batch_rows: int,
        max_delay_s: float = 0.0,
        max_queue_rows: int,
        timeout_s: float,
        max_wait_s: float | None = None,
        on_batch: Callable[[BatchInfo], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        name: str = "gga-worker",
        background_wait_s: float = 0.5,
    ) -> None:
        if not callable(compute):
            raise ValueError("compute must be callable: compute(items: list[Chunk]) -> list[result]")
        if on_batch is not None and not callable(on_batch):
            raise ValueError("on_batch must be callable (on_batch(info: BatchInfo)) or None")
        if not callable(clock):
            raise ValueError("clock must be a callable returning monotonic seconds, e.g. time.monotonic")
        self._cond = threading.Condition()
        self._clock = clock
        self._counts = new_counts()
        self._queue: RequestQueue[P] = RequestQueue(self._counts)
        self._policy = BatchPolicy(self._queue, max_batch_rows=max_batch_rows, max_delay_s=max_delay_s)
        mbr, delay = self._policy.max_batch_rows, self._policy.max_delay_s
        self._times = ComputeTimes(mbr)
        self._admission = Admission(self._queue, self._times, clock, max_queue_rows=max_queue_rows,
                                    max_wait_s=max_wait_s, max_batch_rows=mbr, max_delay_s=delay)
        self._deadlines = Deadlines(self._queue, self._times, clock, timeout_s=timeout_s, max_delay_s=delay,
                                    max_batch_rows=mbr)
        self._timeout_s = self._deadlines.timeout_s
        self._interleave = Interleaver(clock, background_wait_s=background_wait_s)
        runner: BatchRunner[P, R] = BatchRunner(compute, on_batch, lock=self._cond, queue=self._queue,
                                                times=self._times, clock=clock)
        self._worker = WorkerLoop(name=name, lock=self._cond, clock=clock, queue=self._queue, policy=self._policy,
                                  deadlines=self._deadlines, interleave=self._interleave, runner=runner)

    @property
    def max_delay_s(self) -> float:
        return self._policy.max_delay_s

    @property
    def max_queue_rows(self) -> int:
        return self._admission.max_queue_rows

    @property
    def queued_rows(self) -> int:
        """Rows waiting in the queue (not yet taken by the worker): the pending-rows gauge."""
        with self._cond:
            return self._queue.rows

    @property
    def running(self) -> bool:
        """Whether the worker thread is alive."""
        thread = self._worker.thread
        return thread is not None and thread.is_alive()

    @property
    def accepting(self) -> bool:
        """Whether ``submit`` accepts requests (started and not stopping)."""
        with self._cond:
            return self._worker.state == RUNNING

    @property
    def counters(self) -> BatcherCounters:
        """A snapshot of the monotonic counters."""
        with self._cond:
            return BatcherCounters(**self._counts)

    @property
    def mean_compute_s(self) -> float | None:
        """Exponentially weighted mean of recent batch compute times; None before the first batch."""
        with self._cond:
            return self._times.mean_s

    @property
    def row_compute_s(self) -> float | None:
        """Moving average of compute seconds per row (a batch weighs by its rows); None before the first batch."""
        with self._cond:
            return self._times.row_s

    def estimated_wait_s(self, rows: int = 1) -> float | None:
        """Seconds until a request of ``rows`` rows queued now would be computed (see admission); None before
        the first batch."""
        with self._cond:
            return self._admission.estimated_wait(rows, self._clock())

    def admits(self, rows: int = 1) -> bool:
        """Whether a request of ``rows`` rows would be admitted now (for a check before reading a body)."""
        with self._cond:
            return self._admission.refusal(rows) is None

    def start(self) -> None:
        """Start the worker thread. A batcher starts once; after stop, build a new one."""
        self._worker.start()

    def stop(self, *, drain: bool = False, timeout: float | None = None) -> bool:
        """Stop accepting, settle the queue, and join the worker thread (blocking); idempotent.

        ``drain=False`` fails the queued requests with :class:`BatcherClosedError`;
        ``drain=True`` computes them first, without the batching delay (their timeout still
        applies). The batch in flight always finishes. ``timeout`` bounds the join; returns
        whether the thread has ended. From async code use :meth:`astop`.
        """
        self._worker.begin_stop(drain)
        return self._worker.join(timeout)

    def close(self, *, drain: bool = False) -> None:
        """:meth:`stop` without the join: never blocks. A later close/stop without drain fails what is still queued."""
        self._worker.begin_stop(drain)

    async def astop(self, *, drain: bool = False, timeout: float | None = None) -> bool:
        """:meth:`stop` for the event loop: stops accepting at once, joins in a helper thread."""
        self._worker.begin_stop(drain)
        return await asyncio.to_thread(self._worker.join, timeout)

    def wake(self) -> None:
        """Make the worker re-evaluate its batching conditions now (after moving an injected fake clock)."""
        with self._cond:
            self._cond.notify_all()

    def run_between(self, fn: Callable[[], T]) -> T:
        """Run ``fn()`` on the worker thread between batches; its result, or its error raised.

        Blocks the calling thread (a fit job's, never the event loop) until done; on the
        worker thread itself or before :meth:`start` it runs ``fn`` at once. When it runs:
        :mod:`~service.batching.interleave`. Raises :class:`BatcherClosedError` when the
        batcher is stopping or stopped, also for a task still waiting when it stops.
        """
        worker = self._worker
        with self._cond:
            inline = worker.state == NEW or threading.current_thread() is worker.thread
            if not inline:
                if worker.state != RUNNING:
                    raise BatcherClosedError(worker.closed_message())
                task = self._interleave.add(fn)
                self._cond.notify_all()
        if inline:
            return fn()
        return task.wait()

    async def submit(
        self,
        payload: P,
        rows: int,
        *,
        split: Callable[[P, int, int], P] | None = None,
        merge: Callable[[list[R]], R] | None = None,
    ) -> R:
        """Queue ``rows`` rows of ``payload`` and return their result; call on the event loop.

        Up to ``max_batch_rows`` rows are one item and get what ``compute`` returned for it;
        more are cut into chunks ``split(payload, start, stop)`` and get ``merge([chunk
        results in row order])``.

        Raises: ValueError (``rows`` not an int >= 1, or ``split``/``merge`` missing when
        needed); RequestTooLargeError (``rows > max_queue_rows``); BatcherClosedError (not
        started, stopping or stopped); QueueFullError (no room now, nothing queued);
        QueueTimeoutError (waited too long); whatever ``compute`` or ``merge`` raised for it.
        """
        rows = self._admission.check_rows(rows)
        pieces = self._policy.pieces(payload, rows, split, merge)  # (errors in the order: rows, split, closed)
        worker = self._worker
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        req = Request(loop, future, len(pieces), merge)
        with self._cond:
            if worker.state != RUNNING:
                raise BatcherClosedError(worker.closed_message())
            refusal = self._admission.refusal(rows)
            if refusal is not None:
                self._counts["rejected"] += 1
                raise refusal
            self._queue.push(req, pieces, rows, self._clock())
            self._cond.notify_all()

        deadline = loop.call_later(self._timeout_s, self._on_deadline, req)
        try:
            return await future
        except asyncio.CancelledError:
            with self._cond:
                if not req.done:
                    self._queue.finish(req, None, "cancelled")
            raise
        finally:
            deadline.cancel()

    def _on_deadline(self, req: Request) -> None:
        """Loop-side timer, ``timeout_s`` after submit: fail the request if part of it is still queued."""
        with self._cond:
            self._deadlines.expire_queued(req)
