"""Admission: whether a request may join the queue now, decided at once and never blocking.

A request is queued whole or refused whole. It is refused with :class:`QueueFullError`
(HTTP 503 with a Retry-After) when

- **rows:** ``queued_rows + rows > max_queue_rows``; Retry-After is the batches needed
  to free the missing rows, ``ceil((queued_rows + rows - max_queue_rows) /
  max_batch_rows)`` (at least 1), times the mean batch compute time (``max_delay_s``
  before the first batch);
- **estimated wait** (only with ``max_wait_s`` set, and only while the worker has work):
  :meth:`Admission.estimated_wait` exceeds ``max_wait_s``; Retry-After is the excess.

The estimated wait of ``rows`` rows queued now is ``rest + (queued_rows + rows) *
row_s``: the rest of the batch in flight (``max(0, in_flight_rows * row_s - (now -
batch_started))``) plus every queued row and its own, at the measured compute seconds
per row (:class:`~service.batching.stats.ComputeTimes`). Shedding by time rather than by
rows alone keeps the queue as long as the worker can clear within the bound, whatever
the model's speed: under overload the excess gets 503 at once, and the admitted
requests are answered within about ``max_wait_s`` plus one batch.

A request with more rows than ``max_queue_rows`` can never be admitted:
:meth:`Admission.check_rows` refuses it with :class:`RequestTooLargeError` (HTTP 413).

Reads the batcher's queue and compute times with the batcher's lock held.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

from service.batching.errors import QueueFullError, RequestTooLargeError
from service.batching.queue import RequestQueue
from service.batching.stats import ComputeTimes
from service.batching.validate import is_finite_real, positive_int

__all__ = ["MIN_RETRY_AFTER_S", "Admission"]

MIN_RETRY_AFTER_S = 0.01


class Admission:
    """Admits rows into ``queue`` by ``max_queue_rows`` and, optionally, by ``max_wait_s`` (see the module)."""

    __slots__ = ("max_queue_rows", "max_wait_s", "_max_batch_rows", "_max_delay_s", "_queue", "_times", "_clock")

    def __init__(self, queue: RequestQueue[Any], times: ComputeTimes, clock: Callable[[], float], *,
                 max_queue_rows: int, max_wait_s: float | None, max_batch_rows: int, max_delay_s: float) -> None:
        self.max_queue_rows = positive_int("max_queue_rows", max_queue_rows)
        if self.max_queue_rows < max_batch_rows:
            raise ValueError(
                f"max_queue_rows ({max_queue_rows}) must be >= max_batch_rows ({max_batch_rows}), "
                "else a full batch could never be queued"
            )
        if max_wait_s is not None and (not is_finite_real(max_wait_s) or max_wait_s <= 0):
            raise ValueError(f"max_wait_s must be a finite number of seconds > 0 or None, got {max_wait_s!r}")
        self.max_wait_s = None if max_wait_s is None else float(max_wait_s)
        self._max_batch_rows = max_batch_rows
        self._max_delay_s = max_delay_s
        self._queue = queue
        self._times = times
        self._clock = clock

    def check_rows(self, rows: object) -> int:
        """``rows`` as an int if it is an int >= 1 that the queue could ever hold.

        Raises ValueError (not an int >= 1) or :class:`RequestTooLargeError` (``rows > max_queue_rows``).
        """
        if isinstance(rows, bool):
            raise ValueError(f"rows must be an int >= 1, got {rows!r}")
        try:
            n = operator.index(rows)  # type: ignore[call-overload]
        except TypeError:
            raise ValueError(f"rows must be an int >= 1, got {rows!r}") from None
        if n < 1:
            raise ValueError(f"rows must be an int >= 1, got {n}")
        if n > self.max_queue_rows:
            raise RequestTooLargeError(
                f"request has {n} rows but the queue holds at most max_queue_rows={self.max_queue_rows}; "
                "send fewer rows per request"
            )
        return n

    def estimated_wait(self, rows: int, now: float) -> float | None:
        """Seconds until ``rows`` rows queued at ``now`` have been computed; None before the first batch."""
        row_s = self._times.row_s
        if row_s is None:
            return None
        queue = self._queue
        in_flight = queue.in_flight_rows if queue.in_flight else 0
        rest = max(0.0, in_flight * row_s - (now - queue.batch_started)) if in_flight else 0.0
        return rest + (queue.rows + rows) * row_s

    def refusal(self, rows: int) -> QueueFullError | None:
        """The error refusing ``rows`` more rows now, or None when they fit (rows and wait bounds)."""
        queue = self._queue
        queued = queue.rows
        if queued + rows > self.max_queue_rows:
            return QueueFullError(
                f"queue full: {queued} of max_queue_rows={self.max_queue_rows} rows queued, "
                f"no room for {rows} more; retry later",
                retry_after_s=self._retry_after(rows),
                queued_rows=queued,
                max_queue_rows=self.max_queue_rows,
            )
        if self.max_wait_s is None:
            return None
        wait = self.estimated_wait(rows, self._clock())
        if wait is None or wait <= self.max_wait_s or not (queue.chunks or queue.in_flight):
            return None  # (an idle worker admits anything the rows bound allows: there is nothing to wait for)
        return QueueFullError(
            f"overloaded: estimated wait {wait:.2f} s exceeds max_wait_s={self.max_wait_s:g} "
            f"({queued} rows queued); retry later",
            retry_after_s=max(wait - self.max_wait_s, MIN_RETRY_AFTER_S),
            queued_rows=queued,
            max_queue_rows=self.max_queue_rows,
            estimated_wait_s=wait,
        )

    def _retry_after(self, rows: int) -> float:
        missing = self._queue.rows + rows - self.max_queue_rows
        batches = max(1, -(-missing // self._max_batch_rows))
        mean_s = self._times.mean_s
        per_batch = mean_s if mean_s is not None else self._max_delay_s
        return max(batches * per_batch, MIN_RETRY_AFTER_S)
