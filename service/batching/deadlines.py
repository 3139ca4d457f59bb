"""Deadlines: a request's ``timeout_s`` bounds its queueing, counted to the end of its compute.

A request fails with :class:`QueueTimeoutError` (HTTP 504) and is never computed when

- **the worker reaches it too late** (:meth:`Deadlines.expire_head`, before each batch
  is formed): ``now + horizon - arrival > timeout_s``, where ``horizon = min(
  min(queued_rows, max_batch_rows) * row_s, timeout_s / 2)`` is the expected compute of
  the batch about to be taken. The horizon counts for at most half the timeout: an
  estimate inflated by one slow batch must not time out fresh requests (then no batch
  would ever run again to correct it). The queue is in arrival order, so only its head
  can be the oldest expired chunk; heads are expired until one is in time.
- **its own timer fires** (:meth:`Deadlines.expire_queued`, from a ``loop.call_later``
  on the submitter's event loop, ``timeout_s`` after arrival) while any of its chunks is
  still queued, even while the worker is busy with a long batch. A request whose chunks
  are all being computed is not timed out: the timeout bounds queueing, not compute.

Works on the batcher's queue with the batcher's lock held.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from service.batching.errors import QueueTimeoutError
from service.batching.queue import Request, RequestQueue
from service.batching.stats import ComputeTimes
from service.batching.validate import is_finite_real

__all__ = ["Deadlines"]


class Deadlines:
    """Times out requests of ``queue`` after ``timeout_s`` (see the module)."""

    __slots__ = ("timeout_s", "_max_batch_rows", "_queue", "_times", "_clock")

    def __init__(self, queue: RequestQueue[Any], times: ComputeTimes, clock: Callable[[], float], *,
                 timeout_s: float, max_delay_s: float, max_batch_rows: int) -> None:
        if not is_finite_real(timeout_s) or timeout_s <= 0:
            raise ValueError(f"timeout_s must be a finite number of seconds > 0, got {timeout_s!r}")
        if timeout_s <= max_delay_s:
            raise ValueError(
                f"timeout_s ({timeout_s}) must be greater than max_delay_s ({max_delay_s}), "
                "else a request that waits the full batching delay times out"
            )
        self.timeout_s = float(timeout_s)
        self._max_batch_rows = max_batch_rows
        self._queue = queue
        self._times = times
        self._clock = clock

    def error(self, waited: float) -> QueueTimeoutError:
        """The error of a request that waited ``waited`` seconds."""
        return QueueTimeoutError(
            f"request waited {waited:.3f} s in the queue and could not be computed within "
            f"timeout_s={self.timeout_s}; the service is overloaded, retry later"
        )

    def expire_head(self, now: float) -> None:
        """Time out the queue's head requests that could no longer finish within ``timeout_s`` of arrival."""
        queue = self._queue
        row_s = self._times.row_s or 0.0
        timeout_s = self.timeout_s
        while queue.chunks:
            horizon = min(min(queue.rows, self._max_batch_rows) * row_s, timeout_s / 2)
            if now + horizon - queue.chunks[0].arrival <= timeout_s:
                break
            req = queue.chunks[0]._request
            queue.finish(req, self.error(now - req.arrival), "timed_out")

    def expire_queued(self, req: Request) -> None:
        """The timer's action: time ``req`` out if it has not ended and part of it is still queued."""
        if req.done or req.queued_chunks == 0:
            return
        waited = self._clock() - req.arrival
        self._queue.finish(req, self.error(waited), "timed_out")
