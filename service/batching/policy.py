"""The batching policy: how requests become chunks, and when and which chunks form a batch.

- **Rows, not requests.** A batch holds at most ``max_batch_rows`` rows. A request
  larger than that is cut by the submitter's ``split(payload, start, stop)`` into chunks
  of at most ``max_batch_rows`` rows (:meth:`BatchPolicy.pieces`); chunks of one request
  may land in different batches.
- **Dispatch when the worker is free (``max_delay_s == 0``, the default).** A batch is
  due the moment anything is queued (:meth:`BatchPolicy.due` is -inf): a lone request
  never waits for company, and batches form from what queued while the worker computed.
- **Optional delay from the oldest arrival (``max_delay_s > 0``).** A batch is due once
  the queued rows reach ``max_batch_rows``, or at ``oldest_arrival + max_delay_s``,
  where ``oldest_arrival`` is the arrival of the queue's head, not the time the worker
  last looked or became free. While stopping with ``drain`` a batch is always due.
- **FIFO.** A batch is the longest prefix of the queue that fits in ``max_batch_rows``
  (:meth:`BatchPolicy.take`); chunks are never reordered or split further.

The policy reads and takes from the batcher's :class:`~service.batching.queue.RequestQueue`
with the batcher's lock held; it never blocks and never reads the clock.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from service.batching.queue import Chunk, RequestQueue
from service.batching.validate import is_finite_real, positive_int

__all__ = ["BatchPolicy"]

P = TypeVar("P")


class BatchPolicy(Generic[P]):
    """Forms batches from ``queue``: at most ``max_batch_rows`` rows, due per ``max_delay_s`` (see the module)."""

    __slots__ = ("max_batch_rows", "max_delay_s", "_queue")

    def __init__(self, queue: RequestQueue[P], *, max_batch_rows: int, max_delay_s: float) -> None:
        self.max_batch_rows = positive_int("max_batch_rows", max_batch_rows)
        if not is_finite_real(max_delay_s) or max_delay_s < 0:
            raise ValueError(f"max_delay_s must be a finite number of seconds >= 0, got {max_delay_s!r}")
        self.max_delay_s = float(max_delay_s)
        self._queue = queue

    def pieces(self, payload: P, rows: int, split: Callable[[P, int, int], P] | None,
               merge: Callable[..., Any] | None) -> list[tuple[P, int]]:
        """The request as ``(payload, rows)`` pieces in row order: itself, or ``split`` at every ``max_batch_rows``.

        Raises ValueError when it needs cutting (``rows > max_batch_rows``) and ``split`` or ``merge`` is missing.
        """
        mbr = self.max_batch_rows
        if rows <= mbr:
            return [(payload, rows)]
        if split is None or merge is None:
            raise ValueError(
                f"a request of {rows} rows exceeds max_batch_rows={mbr}: pass split(payload, start, stop) "
                "and merge(results) so it can be chunked"
            )
        pieces = []
        for start in range(0, rows, mbr):
            stop = min(start + mbr, rows)
            pieces.append((split(payload, start, stop), stop - start))
        return pieces

    def due(self, draining: bool) -> float:
        """When the queued chunks are due as a batch, on the batcher's clock (-inf: now); the queue is not empty."""
        queue = self._queue
        if draining or self.max_delay_s == 0 or queue.rows >= self.max_batch_rows:
            return -math.inf  # draining, no delay, or a full batch: go now
        return queue.chunks[0].arrival + self.max_delay_s

    def take(self) -> list[Chunk[P]]:
        """Pop the longest FIFO prefix that fits in ``max_batch_rows`` and make it the batch in flight."""
        queue = self._queue
        chunks = queue.chunks
        mbr = self.max_batch_rows
        batch: list[Chunk[P]] = []
        rows = 0
        while chunks and rows + chunks[0].rows <= mbr:
            chunk = chunks.popleft()
            chunk._request.queued_chunks -= 1
            rows += chunk.rows
            batch.append(chunk)
        queue.rows -= rows
        queue.in_flight, queue.in_flight_rows = batch, rows
        return batch
