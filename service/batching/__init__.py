"""Dynamic batching: moves work from the asyncio event loop to ONE compute worker thread.

A route awaits ``DynamicBatcher.submit(payload, rows)``; the rows are queued, grouped
into batches of at most ``max_batch_rows`` rows, computed by one call of the injected
``compute(items)`` on the worker thread, and each result is handed back to its awaiting
coroutine on the loop that submitted it. One unit per concept, each with its own tests
(``tests/service/batching/``):

- :mod:`.errors`: what a submitter can get instead of a result (503, 504, 413, closed).
- :mod:`.admission`: queued whole or refused at once, by rows and by estimated wait.
- :mod:`.policy`: rows not requests; dispatch when the worker is free, or after a
  delay counted from the oldest arrival; FIFO prefixes.
- :mod:`.deadlines`: the request timeout, counted to the end of compute.
- :mod:`.interleave`: ``run_between``, other work on the worker between batches.
- :mod:`.execute`: one batch through ``compute``; a failing request fails alone.
- :mod:`.loop`: the worker thread, its lifecycle (start, stop, drain, close).
- :mod:`.queue` and :mod:`.stats`: the shared state (requests, chunks, counters and
  compute-time averages).
- :mod:`.batcher`: :class:`DynamicBatcher`, the facade that composes them.

Nothing here imports torch: the service's compute function (``service/worker.py``)
concatenates the items' numpy rows, runs one model batch and splits the results back.
"""

from service.batching.batcher import DynamicBatcher
from service.batching.errors import (
    BatcherClosedError,
    BatcherError,
    QueueFullError,
    QueueTimeoutError,
    RequestTooLargeError,
)
from service.batching.queue import Chunk
from service.batching.stats import BatcherCounters, BatchInfo

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
