"""The errors the batcher raises to its submitters, and the HTTP status each one maps to."""

from __future__ import annotations

__all__ = ["BatcherClosedError", "BatcherError", "QueueFullError", "QueueTimeoutError", "RequestTooLargeError"]


class BatcherError(Exception):
    """Base class of the errors raised by :class:`~service.batching.DynamicBatcher`."""


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
