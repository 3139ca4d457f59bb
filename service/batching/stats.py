"""What the batcher measures: per-batch statistics, monotonic counters, and the compute-time averages.

- :class:`BatchInfo` goes to the ``on_batch`` hook after every computed batch (metrics).
- :class:`BatcherCounters` is the snapshot of the counters (``DynamicBatcher.counters``).
- :class:`ComputeTimes` holds the two moving averages that admission (estimated wait,
  Retry-After) and deadlines (expected compute of the next batch) read.

Nothing here is thread-safe on its own: the batcher's lock guards the counts dict and
the :class:`ComputeTimes` of a batcher.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

__all__ = ["EWMA_ALPHA", "BatchInfo", "BatcherCounters", "ComputeTimes", "new_counts"]

EWMA_ALPHA = 0.2  # weight of the newest batch in the compute-time averages


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
    """Monotonic counters since construction (a snapshot; see ``DynamicBatcher.counters``).

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


def new_counts() -> dict[str, int]:
    """The mutable counts behind :class:`BatcherCounters`, all 0 (``BatcherCounters(**counts)`` snapshots them)."""
    return {f.name: 0 for f in fields(BatcherCounters)}


class ComputeTimes:
    """Moving averages of the measured compute time, updated once per batch.

    - ``mean_s``: of a batch, ``m <- (1 - a) m + a c`` with ``a = EWMA_ALPHA`` and ``c``
      the batch's compute seconds.
    - ``row_s``: per row, ``r <- (1 - w) r + w (c / rows)`` with ``w = a * min(1, rows /
      max_batch_rows)``: a batch weighs by its rows, so under load full batches dominate.

    Both are None before the first batch (the first batch sets them to its own values).
    """

    __slots__ = ("mean_s", "row_s", "_max_batch_rows")

    def __init__(self, max_batch_rows: int) -> None:
        self.mean_s: float | None = None
        self.row_s: float | None = None
        self._max_batch_rows = max_batch_rows

    def record(self, compute_s: float, rows: int) -> None:
        """Fold in one batch of ``rows`` rows (>= 1) that took ``compute_s`` seconds."""
        self.mean_s = compute_s if self.mean_s is None else (1 - EWMA_ALPHA) * self.mean_s + EWMA_ALPHA * compute_s
        per_row = compute_s / rows
        weight = EWMA_ALPHA * min(1.0, rows / self._max_batch_rows)
        self.row_s = per_row if self.row_s is None else (1 - weight) * self.row_s + weight * per_row
