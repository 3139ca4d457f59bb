"""DynamicBatcher: the public face of the batching units; composes them around one lock.

The event loop never computes. A route awaits :meth:`DynamicBatcher.submit`; the request
is checked by :mod:`~service.batching.admission`, cut into chunks and queued
(:mod:`~service.batching.queue`, :mod:`~service.batching.policy`); the worker thread
(:mod:`~service.batching.loop`) forms batches by the policy, times out what waited too
long (:mod:`~service.batching.deadlines`), runs ``run_between`` tasks between batches
(:mod:`~service.batching.interleave`), computes each batch and delivers its results to
the awaiting coroutines (:mod:`~service.batching.execute`).

Every unit works on shared state under the batcher's one ``threading.Condition``; the
units' methods that need it held are called only from here, the worker loop and the
runner. This module does not import torch: ``compute`` is injected.
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

    Args:
        compute: ``compute(items: list[Chunk[P]]) -> Sequence[R]``, called on the worker
            thread with one batch (at most ``max_batch_rows`` rows in total); returns one
            result per item, in the items' order.
        max_batch_rows: most rows in one batch (and in one chunk of a split request).
        max_delay_s: longest time the oldest queued request waits for a batch to fill,
            counted from its arrival. The default 0 dispatches as soon as the worker is
            free: batches hold what queued while the previous batch was computed.
        max_queue_rows: most rows queued (not yet taken by the worker); beyond it
            ``submit`` raises :class:`QueueFullError`. At least ``max_batch_rows``.
        timeout_s: longest time from a request's arrival to the end of its compute; a
            request that would exceed it (its wait plus the expected compute time of the
            batch) is not computed. More than ``max_delay_s``, else a lone request would
            always time out.
        max_wait_s: admission bound on the estimated queue wait (None: rows alone,
            ``max_queue_rows``, bound the queue). Before the first batch nothing is
            known and only ``max_queue_rows`` applies.
        on_batch: optional ``on_batch(BatchInfo)``, called on the worker thread after
            each computed batch (for metrics); its exceptions are logged and ignored.
        clock: monotonic clock in seconds used for arrival, delay, timeout and compute
            times (inject a fake one in tests and call :meth:`wake` after moving it).
        name: name of the worker thread.
        background_wait_s: longest time a :meth:`run_between` task waits behind queued
            requests before it goes first.
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

    # ------------------------------------------------------------------ settings

    @property
    def max_batch_rows(self) -> int:
        return self._policy.max_batch_rows

    @property
    def max_delay_s(self) -> float:
        return self._policy.max_delay_s

    @property
    def max_wait_s(self) -> float | None:
        return self._admission.max_wait_s

    @property
    def max_queue_rows(self) -> int:
        return self._admission.max_queue_rows

    @property
    def timeout_s(self) -> float:
        return self._timeout_s

    # ------------------------------------------------------------------ state

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
        """Estimated seconds from now until a request of ``rows`` rows queued now has been computed.

        The rest of the batch in flight, then every queued row and the request's own, at
        :attr:`row_compute_s`. None before the first batch (nothing measured yet).
        """
        with self._cond:
            return self._admission.estimated_wait(rows, self._clock())

    def admits(self, rows: int = 1) -> bool:
        """Whether a request of ``rows`` rows would be admitted now (for a check before reading a body)."""
        with self._cond:
            return self._admission.refusal(rows) is None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the worker thread. A batcher starts once; after stop, build a new one."""
        self._worker.start()

    def stop(self, *, drain: bool = False, timeout: float | None = None) -> bool:
        """Stop accepting, settle the queue, and join the worker thread (blocking).

        With ``drain=False`` the queued requests fail with :class:`BatcherClosedError`;
        with ``drain=True`` they are computed first, without waiting for the batching
        delay (their queue timeout still applies). The batch in flight always finishes
        and its results are delivered. ``timeout`` bounds the join; returns whether the
        thread has ended. Idempotent. From async code prefer :meth:`astop`, which joins
        without blocking the event loop.
        """
        self._worker.begin_stop(drain)
        return self._worker.join(timeout)

    def close(self, *, drain: bool = False) -> None:
        """Stop accepting now, without waiting: :meth:`stop` without the join.

        ``drain=True`` keeps computing the queued requests (without the batching delay); a
        later ``close()`` (or ``stop()``) escalates and fails those still queued with
        :class:`BatcherClosedError`. Never blocks: safe on the event loop.
        """
        self._worker.begin_stop(drain)

    async def astop(self, *, drain: bool = False, timeout: float | None = None) -> bool:
        """:meth:`stop` for the event loop: stops accepting at once, joins in a helper thread."""
        self._worker.begin_stop(drain)
        return await asyncio.to_thread(self._worker.join, timeout)

    def wake(self) -> None:
        """Make the worker re-evaluate its batching conditions now.

        Never needed with a real clock; call it after moving an injected fake clock.
        """
        with self._cond:
            self._cond.notify_all()

    # ------------------------------------------------------------------ other work on the worker

    def run_between(self, fn: Callable[[], T]) -> T:
        """Run ``fn()`` on the worker thread between batches and return its result (or raise its error).

        Blocks the calling thread until done: call it from a thread of its own (a fit job),
        never from the event loop. Called on the worker thread itself (from ``compute``),
        or before :meth:`start`, it runs ``fn`` at once. Raises
        :class:`BatcherClosedError` when the batcher is stopping or stopped, also for a
        task still waiting when it stops. When it runs: see :mod:`~service.batching.interleave`.
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

    # ------------------------------------------------------------------ submit (event loop)

    async def submit(
        self,
        payload: P,
        rows: int,
        *,
        split: Callable[[P, int, int], P] | None = None,
        merge: Callable[[list[R]], R] | None = None,
    ) -> R:
        """Queue ``rows`` rows of ``payload`` and return their result; call on the event loop.

        A request of at most ``max_batch_rows`` rows is one item; its result is what
        ``compute`` returned for it (``split``/``merge`` are not called). A larger one is
        split into chunks ``split(payload, start, stop)`` of ``max_batch_rows`` rows (the
        last may be shorter), and its result is ``merge([chunk results in row order])``.

        Raises:
            ValueError: ``rows`` is not an int >= 1, or the request needs splitting and
                ``split``/``merge`` were not given.
            RequestTooLargeError: ``rows > max_queue_rows`` (it could never be queued).
            BatcherClosedError: not started, stopping or stopped, or stopped while queued.
            QueueFullError: no room for ``rows`` rows now; raised at once, nothing queued.
            QueueTimeoutError: waited more than ``timeout_s`` in the queue.
            Exception: whatever ``compute`` (or ``merge``) raised for this request.
        """
        rows = self._admission.check_rows(rows)
        n_chunks = self._policy.chunk_count(rows, split, merge)
        if not self.accepting:
            raise BatcherClosedError(self._worker.closed_message())
        pieces = self._policy.pieces(payload, rows, n_chunks, split)

        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        req = Request(loop, future, n_chunks, merge)

        with self._cond:
            if self._worker.state != RUNNING:
                raise BatcherClosedError(self._worker.closed_message())
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
