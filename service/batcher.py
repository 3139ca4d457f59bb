"""Dynamic batcher: moves work from the asyncio event loop to ONE compute worker thread.

The event loop never computes. A route awaits :meth:`DynamicBatcher.submit`; the batcher
queues the request's rows, a dedicated worker thread groups queued rows into batches and
calls ``compute(items)`` on them, and each result is handed back to its awaiting
coroutine on the loop that submitted it (``loop.call_soon_threadsafe``; the worker never
touches an asyncio future).

Semantics (DESIGN §3 and §4):

- **Rows, not requests.** Every request states how many rows (samples) it carries. A
  batch holds at most ``max_batch_rows`` rows. A request larger than that is split by
  the submitter's ``split(payload, start, stop)`` into chunks of at most
  ``max_batch_rows`` rows; chunks of one request may land in different batches and
  their results are put back together, in row order, by ``merge(results)``.
- **Dispatch when the worker is free (default, ``max_delay_s=0``).** A free worker
  takes a batch the moment anything is queued; a lone request never waits for
  company. Batches form from what queued while the worker was computing: when it
  finishes a batch it takes everything queued (up to ``max_batch_rows`` rows) at
  once, whatever the clock says (only the queue timeout consults it).
- **Optional delay from the oldest arrival (``max_delay_s > 0``).** A free worker
  takes a batch as soon as the queued rows reach ``max_batch_rows``, or once
  ``clock() >= oldest_arrival + max_delay_s``, where ``oldest_arrival`` is the arrival
  time of the oldest queued request, not the time the worker last looked at the queue
  or became free. This trades a lone client's latency for fuller batches.
- **FIFO.** A batch is the longest prefix of the queue that fits in
  ``max_batch_rows``; the worker never reorders or splits chunks.
- **Admission is atomic and never blocks.** A request is queued whole, or rejected at
  once with :class:`QueueFullError` (with a ``retry_after_s`` hint for a Retry-After
  header) when ``queued_rows + rows > max_queue_rows`` or, with ``max_wait_s`` set,
  when its estimated wait exceeds ``max_wait_s``. The estimate
  (:meth:`DynamicBatcher.estimated_wait_s`) is the rest of the batch in flight plus
  the queued rows ahead of it and its own rows, at the measured compute time per row
  (a rows-weighted moving average, so full batches under load dominate it). Shedding
  by time rather than by rows alone keeps the queue as long as the worker can clear
  within the bound, whatever the model's speed: under overload the excess gets 503 at
  once and the admitted requests are answered within about ``max_wait_s`` plus one
  batch, instead of all of them waiting for a long queue and timing out.
- **Queue timeout, counted to the end of the compute.** A request whose chunk, when the
  worker reaches it, has waited so long that it would finish after ``timeout_s`` (its
  wait plus the expected compute time of the batch being formed, counted as at most
  half the timeout) is not computed: it fails with :class:`QueueTimeoutError` and its
  queued chunks are dropped. The awaiting coroutine
  does not depend on the worker for this: a timer on its own loop fails it after
  ``timeout_s`` if any of its chunks is still queued, even while the worker is busy
  with a long batch. (A request whose chunks are all being computed is not timed out:
  the timeout bounds queueing, not compute.)
- **A failing request fails alone.** If ``compute`` raises for a batch of several
  items, every item is retried on its own; only the items that raise again fail, each
  with its own exception (original type), and their neighbours get their results.
- **Cancellation** of an awaiting coroutine (a client disconnect) drops its queued
  chunks and discards results still being computed for it.
- **Other work on the worker, between batches.** :meth:`run_between` runs a callable
  on the worker thread (the fit jobs' model passes, so that nothing else ever uses the
  model while a batch is computed) and blocks its caller, another thread, until it is
  done. Such a task runs when no request is queued, or, under sustained load, once it has
  waited ``background_wait_s``: then before the next batch, so it is never starved and
  delays requests by at most one task at a time.
- **Lifecycle.** :meth:`start` starts the thread. :meth:`stop` / :meth:`astop` stop
  accepting (``submit`` raises :class:`BatcherClosedError`), fail the queued requests
  with :class:`BatcherClosedError` (or, with ``drain=True``, compute them first
  without waiting for the batching delay), let the batch in flight finish, and join
  the thread.

This module does not import torch: ``compute`` is injected, so the batching logic is
tested with fakes. The service's compute function concatenates the items' numpy rows,
runs one model batch, and splits the results back per item.
"""

from __future__ import annotations

import asyncio
import logging
import math
import operator
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Generic, TypeVar

__all__ = [
    "BatchInfo",
    "BatcherClosedError",
    "BatcherCounters",
    "BatcherError",
    "Chunk",
    "DynamicBatcher",
    "QueueFullError",
    "QueueTimeoutError",
    "RequestTooLargeError",
]

log = logging.getLogger(__name__)

T = TypeVar("T")  # result of a run_between task
P = TypeVar("P")  # payload type: whatever the submitter queues (e.g. an array of rows)
R = TypeVar("R")  # result type: whatever compute returns per item

_EWMA_ALPHA = 0.2  # weight of the newest batch in the compute-time average
# (the per-row average gives a batch of r rows the weight _EWMA_ALPHA * r / max_batch_rows)
_MIN_RETRY_AFTER_S = 0.01


# ----------------------------------------------------------------------------- errors


class BatcherError(Exception):
    """Base class of the errors raised by :class:`DynamicBatcher`."""


class QueueFullError(BatcherError):
    """The queue has no room for the request's rows; it was not queued (HTTP 503).

    ``retry_after_s`` is a heuristic estimate of the seconds until the request would be
    admitted: the batches needed to free the missing rows times the recent mean batch
    compute time (``max_delay_s`` before the first batch), or, when the wait bound
    refused it, the estimated wait beyond ``max_wait_s``; at least 10 ms.
    ``estimated_wait_s`` is the wait the request would have had (None when unknown).
    """

    def __init__(self, message: str, *, retry_after_s: float, queued_rows: int, max_queue_rows: int,
                 estimated_wait_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.queued_rows = queued_rows
        self.max_queue_rows = max_queue_rows
        self.estimated_wait_s = estimated_wait_s


class QueueTimeoutError(BatcherError, TimeoutError):
    """The request waited in the queue too long to finish within ``timeout_s`` and was not computed (HTTP 504)."""


class BatcherClosedError(BatcherError):
    """The batcher is not running (not started yet, stopping or stopped)."""


class RequestTooLargeError(BatcherError, ValueError):
    """The request has more rows than the whole queue may hold, so it can never be admitted (HTTP 413)."""


# ----------------------------------------------------------------------------- data


class _Request:
    """One submitted request; its mutable fields are guarded by the batcher's lock."""

    __slots__ = (
        "loop",
        "future",
        "rows",
        "n_chunks",
        "merge",
        "arrival",
        "results",
        "remaining",
        "queued_chunks",
        "done",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[Any],
        rows: int,
        n_chunks: int,
        merge: Callable[[list[Any]], Any] | None,
    ) -> None:
        self.loop = loop
        self.future = future
        self.rows = rows
        self.n_chunks = n_chunks
        self.merge = merge
        self.arrival = 0.0
        self.results: list[Any] = [None] * n_chunks
        self.remaining = n_chunks  # chunks without a result yet
        self.queued_chunks = 0  # chunks still in the queue (not taken by the worker)
        self.done = False  # a result or an exception has been decided


class _Task:
    """A :meth:`DynamicBatcher.run_between` call waiting for, or running on, the worker thread."""

    __slots__ = ("fn", "queued_at", "done", "result", "error")

    def __init__(self, fn: Callable[[], Any], queued_at: float) -> None:
        self.fn, self.queued_at = fn, queued_at
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None

    def finish(self, result: Any, error: BaseException | None) -> None:
        self.result, self.error = result, error
        self.done.set()


@dataclass(frozen=True, eq=False)
class Chunk(Generic[P]):
    """One item of a batch: a request, or a piece of one, of at most ``max_batch_rows`` rows.

    ``compute`` reads ``payload`` and ``rows``; ``start`` is the chunk's first row within
    its request and ``arrival`` the request's arrival time on the batcher's clock.
    """

    payload: P
    rows: int
    start: int
    arrival: float
    _request: _Request = field(repr=False)
    _index: int = field(repr=False)


@dataclass(frozen=True)
class BatchInfo:
    """Statistics of one computed batch, passed to ``on_batch`` on the worker thread.

    - ``rows``: rows in the batch (sum of the items' rows).
    - ``n_items``: chunks in the batch; ``n_requests``: distinct requests among them.
    - ``queue_wait_s``: per item, seconds from its request's arrival to the batch start.
    - ``compute_s``: seconds spent in ``compute``, individual retries included.
    - ``n_failed``: items whose compute raised (after the individual retry, if any).
    - ``retried``: whether the batch call raised and the items were retried one by one.
    """

    rows: int
    n_items: int
    n_requests: int
    queue_wait_s: tuple[float, ...]
    compute_s: float
    n_failed: int
    retried: bool


@dataclass(frozen=True)
class BatcherCounters:
    """Monotonic counters since construction (a snapshot; see :attr:`DynamicBatcher.counters`).

    Every submitted request ends in exactly one of completed, failed, timed_out,
    cancelled or closed; rejected requests (queue full) are not counted as submitted.
    """

    submitted: int = 0
    completed: int = 0
    failed: int = 0  # compute (or merge) raised for the request
    timed_out: int = 0
    cancelled: int = 0
    closed: int = 0  # failed with BatcherClosedError by stop()
    rejected: int = 0  # QueueFullError
    batches: int = 0
    batch_rows: int = 0
    batch_items: int = 0


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    """Resolve ``future``; runs on its loop. A cancelled (done) future is left alone."""
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


_NEW, _RUNNING, _CLOSING, _CLOSED = "new", "running", "closing", "closed"


# ----------------------------------------------------------------------------- batcher


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
        self._max_batch_rows = _positive_int("max_batch_rows", max_batch_rows)
        self._max_queue_rows = _positive_int("max_queue_rows", max_queue_rows)
        if self._max_queue_rows < self._max_batch_rows:
            raise ValueError(
                f"max_queue_rows ({max_queue_rows}) must be >= max_batch_rows ({max_batch_rows}), "
                "else a full batch could never be queued"
            )
        if not _is_real(max_delay_s) or not math.isfinite(max_delay_s) or max_delay_s < 0:
            raise ValueError(f"max_delay_s must be a finite number of seconds >= 0, got {max_delay_s!r}")
        if not _is_real(timeout_s) or not math.isfinite(timeout_s) or timeout_s <= 0:
            raise ValueError(f"timeout_s must be a finite number of seconds > 0, got {timeout_s!r}")
        if timeout_s <= max_delay_s:
            raise ValueError(
                f"timeout_s ({timeout_s}) must be greater than max_delay_s ({max_delay_s}), "
                "else a request that waits the full batching delay times out"
            )
        if max_wait_s is not None and (not _is_real(max_wait_s) or not math.isfinite(max_wait_s)
                                       or max_wait_s <= 0):
            raise ValueError(f"max_wait_s must be a finite number of seconds > 0 or None, got {max_wait_s!r}")
        if not isinstance(name, str) or not name:
            raise ValueError("name must be a non-empty string (the worker thread's name)")
        if not _is_real(background_wait_s) or not math.isfinite(background_wait_s) or background_wait_s < 0:
            raise ValueError(f"background_wait_s must be a finite number of seconds >= 0, got {background_wait_s!r}")

        self._compute = compute
        self._on_batch = on_batch
        self._clock = clock
        self._name = name
        self._max_delay_s = float(max_delay_s)
        self._timeout_s = float(timeout_s)
        self._max_wait_s = None if max_wait_s is None else float(max_wait_s)
        self._background_wait_s = float(background_wait_s)
        self._tasks: deque[_Task] = deque()

        self._cond = threading.Condition()
        self._queue: deque[Chunk[P]] = deque()
        self._queued_rows = 0
        self._in_flight: list[Chunk[P]] = []
        self._in_flight_rows = 0
        self._state = _NEW
        self._drain = False
        self._thread: threading.Thread | None = None
        self._ewma_compute_s: float | None = None
        self._ewma_row_s: float | None = None  # compute seconds per row, rows-weighted
        self._batch_started = 0.0  # clock() when the batch in flight was taken
        self._counts: dict[str, int] = {f.name: 0 for f in fields(BatcherCounters)}

    # ------------------------------------------------------------------ properties

    @property
    def max_batch_rows(self) -> int:
        return self._max_batch_rows

    @property
    def max_delay_s(self) -> float:
        return self._max_delay_s

    @property
    def max_wait_s(self) -> float | None:
        return self._max_wait_s

    @property
    def max_queue_rows(self) -> int:
        return self._max_queue_rows

    @property
    def timeout_s(self) -> float:
        return self._timeout_s

    @property
    def queued_rows(self) -> int:
        """Rows waiting in the queue (not yet taken by the worker): the pending-rows gauge."""
        with self._cond:
            return self._queued_rows

    @property
    def queued_items(self) -> int:
        """Chunks waiting in the queue."""
        with self._cond:
            return len(self._queue)

    @property
    def running(self) -> bool:
        """Whether the worker thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def accepting(self) -> bool:
        """Whether ``submit`` accepts requests (started and not stopping)."""
        with self._cond:
            return self._state == _RUNNING

    @property
    def counters(self) -> BatcherCounters:
        """A snapshot of the monotonic counters."""
        with self._cond:
            return BatcherCounters(**self._counts)

    @property
    def mean_compute_s(self) -> float | None:
        """Exponentially weighted mean of recent batch compute times; None before the first batch."""
        with self._cond:
            return self._ewma_compute_s

    @property
    def row_compute_s(self) -> float | None:
        """Moving average of compute seconds per row (a batch weighs by its rows); None before the first batch."""
        with self._cond:
            return self._ewma_row_s

    def estimated_wait_s(self, rows: int = 1) -> float | None:
        """Estimated seconds from now until a request of ``rows`` rows queued now has been computed.

        The rest of the batch in flight, then every queued row and the request's own, at
        :attr:`row_compute_s`. None before the first batch (nothing measured yet).
        """
        with self._cond:
            return self._estimated_wait_locked(rows, self._clock())

    def admits(self, rows: int = 1) -> bool:
        """Whether a request of ``rows`` rows would be admitted now (for a check before reading a body)."""
        with self._cond:
            return self._refusal_locked(rows) is None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the worker thread. A batcher starts once; after stop, build a new one."""
        with self._cond:
            if self._state != _NEW:
                raise RuntimeError(f"batcher already {self._state}; a DynamicBatcher can be started once")
            self._state = _RUNNING
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()

    def stop(self, *, drain: bool = False, timeout: float | None = None) -> bool:
        """Stop accepting, settle the queue, and join the worker thread (blocking).

        With ``drain=False`` the queued requests fail with :class:`BatcherClosedError`;
        with ``drain=True`` they are computed first, without waiting for the batching
        delay (their queue timeout still applies). The batch in flight always finishes
        and its results are delivered. ``timeout`` bounds the join; returns whether the
        thread has ended. Idempotent. From async code prefer :meth:`astop`, which joins
        without blocking the event loop.
        """
        self._begin_stop(drain)
        return self._join(timeout)

    def close(self, *, drain: bool = False) -> None:
        """Stop accepting now, without waiting: :meth:`stop` without the join.

        ``drain=True`` keeps computing the queued requests (without the batching delay); a
        later ``close()`` (or ``stop()``) escalates and fails those still queued with
        :class:`BatcherClosedError`. Never blocks: safe on the event loop.
        """
        self._begin_stop(drain)

    async def astop(self, *, drain: bool = False, timeout: float | None = None) -> bool:
        """:meth:`stop` for the event loop: stops accepting at once, joins in a helper thread."""
        self._begin_stop(drain)
        return await asyncio.to_thread(self._join, timeout)

    def wake(self) -> None:
        """Make the worker re-evaluate its batching conditions now.

        Never needed with a real clock; call it after moving an injected fake clock.
        """
        with self._cond:
            self._cond.notify_all()

    def _begin_stop(self, drain: bool) -> None:
        with self._cond:
            if self._state == _NEW:
                self._state = _CLOSED
                return
            if self._state == _RUNNING:
                self._state = _CLOSING
                self._drain = drain
                self._fail_tasks_locked()  # (fit jobs stop with the service; only requests are drained)
            if self._state == _CLOSING and not drain:
                # also escalates an earlier stop(drain=True)
                self._drain = False
                self._fail_queued_locked()
            self._cond.notify_all()

    def _join(self, timeout: float | None) -> bool:
        thread = self._thread
        if thread is None:
            return True
        if thread is threading.current_thread():
            return False  # stop() called from compute/on_batch: cannot join itself
        thread.join(timeout)
        return not thread.is_alive()

    # ------------------------------------------------------------------ other work on the worker

    def run_between(self, fn: Callable[[], T]) -> T:
        """Run ``fn()`` on the worker thread between batches and return its result (or raise its error).

        Blocks the calling thread until done: call it from a thread of its own (a fit job),
        never from the event loop. Called on the worker thread itself (from ``compute``),
        or before :meth:`start`, it runs ``fn`` at once. Raises
        :class:`BatcherClosedError` when the batcher is stopping or stopped, also for a
        task still waiting when it stops.
        """
        with self._cond:
            inline = self._state == _NEW or threading.current_thread() is self._thread
            if not inline:
                if self._state != _RUNNING:
                    raise BatcherClosedError(self._closed_message())
                task = _Task(fn, self._clock())
                self._tasks.append(task)
                self._cond.notify_all()
        if inline:
            return fn()
        task.done.wait()
        if task.error is not None:
            raise task.error
        return task.result

    def _run_task(self, task: _Task) -> None:
        try:
            result = task.fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, whatever it is
            task.finish(None, exc)
        else:
            task.finish(result, None)

    def _fail_tasks_locked(self) -> None:
        while self._tasks:
            self._tasks.popleft().finish(None, BatcherClosedError("batcher stopped before the task ran"))

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
        if isinstance(rows, bool):
            raise ValueError(f"rows must be an int >= 1, got {rows!r}")
        try:
            rows = operator.index(rows)
        except TypeError:
            raise ValueError(f"rows must be an int >= 1, got {rows!r}") from None
        if rows < 1:
            raise ValueError(f"rows must be an int >= 1, got {rows}")
        if rows > self._max_queue_rows:
            raise RequestTooLargeError(
                f"request has {rows} rows but the queue holds at most max_queue_rows={self._max_queue_rows}; "
                "send fewer rows per request"
            )
        mbr = self._max_batch_rows
        n_chunks = -(-rows // mbr)
        if n_chunks > 1 and (split is None or merge is None):
            raise ValueError(
                f"a request of {rows} rows exceeds max_batch_rows={mbr}: pass split(payload, start, stop) "
                "and merge(results) so it can be chunked"
            )
        if not self.accepting:
            raise BatcherClosedError(self._closed_message())
        if n_chunks == 1 or split is None:  # (split is None only when n_chunks == 1)
            pieces = [(payload, 0, rows)]
        else:
            bounds = [(s, min(s + mbr, rows)) for s in range(0, rows, mbr)]
            pieces = [(split(payload, s, e), s, e) for s, e in bounds]

        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        req = _Request(loop, future, rows, n_chunks, merge)

        with self._cond:
            if self._state != _RUNNING:
                raise BatcherClosedError(self._closed_message())
            refusal = self._refusal_locked(rows)
            if refusal is not None:
                self._counts["rejected"] += 1
                raise refusal
            now = self._clock()
            req.arrival = now
            for index, (piece, start, stop) in enumerate(pieces):
                self._queue.append(Chunk(piece, stop - start, start, now, req, index))
            req.queued_chunks = n_chunks
            self._queued_rows += rows
            self._counts["submitted"] += 1
            self._cond.notify_all()

        deadline = loop.call_later(self._timeout_s, self._on_deadline, req)
        try:
            return await future
        except asyncio.CancelledError:
            with self._cond:
                if not req.done:
                    self._finish_locked(req, None, "cancelled")
            raise
        finally:
            deadline.cancel()

    def _on_deadline(self, req: _Request) -> None:
        """Loop-side timeout: fail the request if part of it is still queued after ``timeout_s``."""
        with self._cond:
            if req.done or req.queued_chunks == 0:
                return
            waited = self._clock() - req.arrival
            self._finish_locked(req, self._timeout_error(waited), "timed_out")

    # ------------------------------------------------------------------ worker thread

    def _run(self) -> None:
        try:
            while (work := self._next_batch()) is not None:
                if isinstance(work, _Task):
                    self._run_task(work)
                else:
                    self._process(work)
        except BaseException:
            log.exception("batch worker %r crashed; failing its requests", self._name)
            raise
        finally:
            with self._cond:
                self._state = _CLOSED
                for chunk in self._in_flight:
                    if not chunk._request.done:
                        stopped = BatcherClosedError("batch worker stopped")
                        self._finish_locked(chunk._request, stopped, "closed")
                self._in_flight = []
                self._fail_queued_locked()
                self._fail_tasks_locked()

    def _next_batch(self) -> list[Chunk[P]] | _Task | None:
        """Block until a batch (or a run_between task) is due and take it; None when the worker should exit."""
        with self._cond:
            while True:
                if self._state != _RUNNING and not (self._state == _CLOSING and self._drain):
                    return None
                now = self._clock()
                self._expire_head_locked(now)
                if self._tasks and self._state == _RUNNING and (
                        not self._queue or now - self._tasks[0].queued_at >= self._background_wait_s):
                    return self._tasks.popleft()
                if not self._queue:
                    if self._state != _RUNNING:
                        return None  # drained
                    self._cond.wait()
                    continue
                if self._state != _RUNNING or self._max_delay_s == 0 or self._queued_rows >= self._max_batch_rows:
                    return self._take_batch_locked()  # draining, no delay, or a full batch: go now
                due = self._queue[0].arrival + self._max_delay_s
                if now >= due:
                    return self._take_batch_locked()
                if self._tasks:
                    due = min(due, self._tasks[0].queued_at + self._background_wait_s)
                self._cond.wait(due - now)

    def _expire_head_locked(self, now: float) -> None:
        # The queue is in arrival order, so only its head can be the oldest expired chunk.
        # A chunk expires when it could not be computed within its timeout any more: its
        # wait so far plus the expected compute of the next batch (what would be taken now).
        # The expected compute counts for at most half the timeout: an estimate inflated by
        # one slow batch must not time out fresh requests (then no batch would ever run again
        # to correct it).
        row_s = self._ewma_row_s or 0.0
        while self._queue:
            horizon = min(min(self._queued_rows, self._max_batch_rows) * row_s, self._timeout_s / 2)
            if now + horizon - self._queue[0].arrival <= self._timeout_s:
                break
            req = self._queue[0]._request
            self._finish_locked(req, self._timeout_error(now - req.arrival), "timed_out")

    def _take_batch_locked(self) -> list[Chunk[P]]:
        batch: list[Chunk[P]] = []
        rows = 0
        while self._queue and rows + self._queue[0].rows <= self._max_batch_rows:
            chunk = self._queue.popleft()
            chunk._request.queued_chunks -= 1
            rows += chunk.rows
            batch.append(chunk)
        self._queued_rows -= rows
        self._in_flight, self._in_flight_rows = batch, rows
        self._batch_started = self._clock()
        return batch

    def _process(self, batch: list[Chunk[P]]) -> None:
        with self._cond:
            items = [c for c in batch if not c._request.done]  # skip requests cancelled meanwhile
        if not items:
            with self._cond:
                self._in_flight = []
            return
        start = self._clock()
        retried = False
        outcomes: list[tuple[Any, BaseException | None]]
        try:
            outcomes = [(r, None) for r in self._call_compute(items)]
        except Exception as exc:
            if len(items) == 1:
                outcomes = [(None, exc)]
            else:
                retried = True
                outcomes = []
                for chunk in items:
                    with self._cond:
                        live = not chunk._request.done
                    if not live:
                        outcomes.append((None, None))
                        continue
                    try:
                        outcomes.append((self._call_compute([chunk])[0], None))
                    except Exception as item_exc:
                        outcomes.append((None, item_exc))
        compute_s = self._clock() - start
        # metrics first: a client that sees its response must also see its batch counted
        if self._on_batch is not None:
            info = BatchInfo(
                rows=sum(c.rows for c in items),
                n_items=len(items),
                n_requests=len({id(c._request) for c in items}),
                queue_wait_s=tuple(start - c.arrival for c in items),
                compute_s=compute_s,
                n_failed=sum(1 for _, exc in outcomes if exc is not None),
                retried=retried,
            )
            try:
                self._on_batch(info)
            except Exception:
                log.exception("on_batch callback raised; ignored")

        finished: list[_Request] = []
        with self._cond:
            self._in_flight = []
            rows = sum(c.rows for c in items)
            self._counts["batches"] += 1
            self._counts["batch_rows"] += rows
            self._counts["batch_items"] += len(items)
            self._ewma_compute_s = (
                compute_s
                if self._ewma_compute_s is None
                else (1 - _EWMA_ALPHA) * self._ewma_compute_s + _EWMA_ALPHA * compute_s
            )
            per_row = compute_s / rows
            weight = _EWMA_ALPHA * min(1.0, rows / self._max_batch_rows)
            self._ewma_row_s = (
                per_row if self._ewma_row_s is None else (1 - weight) * self._ewma_row_s + weight * per_row
            )
            for chunk, (result, exc) in zip(items, outcomes, strict=True):
                req = chunk._request
                if req.done:
                    continue
                if exc is not None:
                    self._finish_locked(req, exc, "failed")
                    continue
                req.results[chunk._index] = result
                req.remaining -= 1
                if req.remaining == 0:
                    req.done = True
                    finished.append(req)

        for req in finished:  # merge outside the lock: it is user code
            results, req.results = req.results, []
            try:
                value = results[0] if req.n_chunks == 1 else req.merge(results)  # type: ignore[misc]
            except Exception as exc:
                self._deliver(req, None, exc)
                kind = "failed"
            else:
                self._deliver(req, value, None)
                kind = "completed"
            with self._cond:
                self._counts[kind] += 1

    def _call_compute(self, items: list[Chunk[P]]) -> list[R]:
        results = list(self._compute(items))
        if len(results) != len(items):
            raise RuntimeError(
                f"compute returned {len(results)} results for {len(items)} items; "
                "it must return exactly one result per item, in order"
            )
        return results

    # ------------------------------------------------------------------ helpers (lock held)

    def _finish_locked(self, req: _Request, exc: BaseException | None, kind: str) -> None:
        """End ``req`` with ``exc``: drop its queued chunks, count it under ``kind``, deliver.

        For ``kind == "cancelled"`` nothing is delivered (its awaiter is gone).
        """
        req.done = True
        req.results = []
        if req.queued_chunks:
            kept: deque[Chunk[P]] = deque()
            for chunk in self._queue:
                if chunk._request is req:
                    self._queued_rows -= chunk.rows
                else:
                    kept.append(chunk)
            self._queue = kept
            req.queued_chunks = 0
        self._counts[kind] += 1
        if kind != "cancelled":
            self._deliver(req, None, exc)

    def _fail_queued_locked(self) -> None:
        while self._queue:
            req = self._queue[0]._request
            closed = BatcherClosedError("batcher stopped before the request was computed")
            self._finish_locked(req, closed, "closed")

    def _estimated_wait_locked(self, rows: int, now: float) -> float | None:
        row_s = self._ewma_row_s
        if row_s is None:
            return None
        in_flight = self._in_flight_rows if self._in_flight else 0
        rest = max(0.0, in_flight * row_s - (now - self._batch_started)) if in_flight else 0.0
        return rest + (self._queued_rows + rows) * row_s

    def _refusal_locked(self, rows: int) -> QueueFullError | None:
        """The error refusing ``rows`` more rows now, or None when they fit (rows and wait bounds)."""
        if self._queued_rows + rows > self._max_queue_rows:
            return QueueFullError(
                f"queue full: {self._queued_rows} of max_queue_rows={self._max_queue_rows} rows queued, "
                f"no room for {rows} more; retry later",
                retry_after_s=self._retry_after_locked(rows),
                queued_rows=self._queued_rows,
                max_queue_rows=self._max_queue_rows,
            )
        if self._max_wait_s is None:
            return None
        wait = self._estimated_wait_locked(rows, self._clock())
        if wait is None or wait <= self._max_wait_s or not (self._queue or self._in_flight):
            return None  # (an idle worker admits anything the rows bound allows: there is nothing to wait for)
        return QueueFullError(
            f"overloaded: estimated wait {wait:.2f} s exceeds max_wait_s={self._max_wait_s:g} "
            f"({self._queued_rows} rows queued); retry later",
            retry_after_s=max(wait - self._max_wait_s, _MIN_RETRY_AFTER_S),
            queued_rows=self._queued_rows,
            max_queue_rows=self._max_queue_rows,
            estimated_wait_s=wait,
        )

    def _retry_after_locked(self, rows: int) -> float:
        missing = self._queued_rows + rows - self._max_queue_rows
        batches = max(1, -(-missing // self._max_batch_rows))
        per_batch = self._ewma_compute_s if self._ewma_compute_s is not None else self._max_delay_s
        return max(batches * per_batch, _MIN_RETRY_AFTER_S)

    def _timeout_error(self, waited: float) -> QueueTimeoutError:
        return QueueTimeoutError(
            f"request waited {waited:.3f} s in the queue and could not be computed within "
            f"timeout_s={self._timeout_s}; the service is overloaded, retry later"
        )

    def _closed_message(self) -> str:
        if self._state == _NEW:
            return "batcher not started: call start() first"
        return "batcher is stopping or stopped; not accepting requests"

    @staticmethod
    def _deliver(req: _Request, result: Any, exc: BaseException | None) -> None:
        """Hand the outcome to the request's loop; never touches the future from this thread."""
        try:
            req.loop.call_soon_threadsafe(_settle, req.future, result, exc)
        except RuntimeError:
            pass  # the loop is closed: nobody awaits this request any more


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value
