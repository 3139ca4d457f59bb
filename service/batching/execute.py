"""Computing one batch on the worker thread, and handing each request its outcome.

- ``compute(items)`` is called once per batch with the items whose requests are still
  live (cancelled or timed-out ones are skipped) and must return one result per item.
- **A failing request fails alone.** If ``compute`` raises for a batch of several items,
  every live item is retried on its own; only the items that raise again fail, each with
  its own exception (original type), and their neighbours get their results.
- ``on_batch(BatchInfo)`` is called before any result is delivered (a client that sees
  its response also sees its batch counted); its exceptions are logged and ignored.
- A request whose chunks all have results is finished with ``merge(results in row
  order)`` (its single result when it has one chunk), outside the lock: merge is user
  code. Then the compute-time averages and counters are updated.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from service.batching.queue import Chunk, Request, RequestQueue, deliver
from service.batching.stats import BatchInfo, ComputeTimes

__all__ = ["BatchRunner"]

log = logging.getLogger(__name__)

P = TypeVar("P")
R = TypeVar("R")


class BatchRunner(Generic[P, R]):
    """Runs batches taken from ``queue`` through ``compute`` and delivers their outcomes (see the module)."""

    def __init__(self, compute: Callable[[list[Chunk[P]]], Sequence[R]],
                 on_batch: Callable[[BatchInfo], None] | None, *, lock: threading.Condition,
                 queue: RequestQueue[P], times: ComputeTimes, clock: Callable[[], float]) -> None:
        self._compute = compute
        self._on_batch = on_batch
        self._lock = lock
        self._queue = queue
        self._times = times
        self._clock = clock

    def run(self, batch: list[Chunk[P]]) -> None:
        """Compute ``batch`` (the queue's batch in flight) and settle its requests; called without the lock."""
        lock, queue = self._lock, self._queue
        with lock:
            items = [c for c in batch if not c._request.done]  # skip requests cancelled meanwhile
        if not items:
            with lock:
                queue.in_flight = []
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
                    with lock:
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

        finished: list[Request] = []
        counts = queue.counts
        with lock:
            queue.in_flight = []
            rows = sum(c.rows for c in items)
            counts["batches"] += 1
            counts["batch_rows"] += rows
            counts["batch_items"] += len(items)
            self._times.record(compute_s, rows)
            for chunk, (result, exc) in zip(items, outcomes, strict=True):
                req = chunk._request
                if req.done:
                    continue
                if exc is not None:
                    queue.finish(req, exc, "failed")
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
                deliver(req, None, exc)
                kind = "failed"
            else:
                deliver(req, value, None)
                kind = "completed"
            with lock:
                counts[kind] += 1

    def _call_compute(self, items: list[Chunk[P]]) -> list[R]:
        results = list(self._compute(items))
        if len(results) != len(items):
            raise RuntimeError(
                f"compute returned {len(results)} results for {len(items)} items; "
                "it must return exactly one result per item, in order"
            )
        return results
