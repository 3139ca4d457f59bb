"""The queue of requests: who is waiting, who is being computed, and how a request ends.

A submitted request becomes one :class:`Request` (its future and the results gathered so
far) and one or more :class:`Chunk` items of at most ``max_batch_rows`` rows, queued in
arrival order in :class:`RequestQueue`. Whatever ends a request early (a timeout, a
cancellation, a compute error, a stop) goes through :meth:`RequestQueue.finish`: it
drops the request's queued chunks, counts the outcome and hands the error to the
request's event loop (``loop.call_soon_threadsafe``; no thread but the loop's touches
an asyncio future).

Not thread-safe on its own: every method expects the batcher's lock held.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from service.batching.errors import BatcherClosedError

__all__ = ["Chunk", "Request", "RequestQueue", "deliver"]

P = TypeVar("P")  # payload type: whatever the submitter queues (e.g. an array of rows)


class Request:
    """One submitted request; its mutable fields are guarded by the batcher's lock."""

    __slots__ = ("loop", "future", "n_chunks", "merge", "arrival", "results", "remaining", "queued_chunks", "done")

    def __init__(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], n_chunks: int,
                 merge: Callable[[list[Any]], Any] | None) -> None:
        self.loop = loop
        self.future = future
        self.n_chunks = n_chunks
        self.merge = merge
        self.arrival = 0.0
        self.results: list[Any] = [None] * n_chunks
        self.remaining = n_chunks  # chunks without a result yet
        self.queued_chunks = 0  # chunks still in the queue (not taken by the worker)
        self.done = False  # a result or an exception has been decided


@dataclass(frozen=True, eq=False)
class Chunk(Generic[P]):
    """One item of a batch: a request, or a piece of one, of at most ``max_batch_rows`` rows.

    ``compute`` reads ``payload`` and ``rows``; ``arrival`` is the request's arrival time
    on the batcher's clock.
    """

    payload: P
    rows: int
    arrival: float
    _request: Request = field(repr=False)
    _index: int = field(repr=False)


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    """Resolve ``future``; runs on its loop. A cancelled (done) future is left alone."""
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


def deliver(req: Request, result: Any, exc: BaseException | None) -> None:
    """Hand the outcome to the request's loop; never touches the future from this thread."""
    try:
        req.loop.call_soon_threadsafe(_settle, req.future, result, exc)
    except RuntimeError:
        pass  # the loop is closed: nobody awaits this request any more


class RequestQueue(Generic[P]):
    """The FIFO of queued chunks (``chunks``, ``rows`` in them) and the batch in flight.

    ``in_flight`` is the batch the worker took (``in_flight_rows`` rows, taken at
    ``batch_started`` on the batcher's clock); ``counts`` are the batcher's counters,
    which :meth:`push` and :meth:`finish` update.
    """

    __slots__ = ("chunks", "rows", "in_flight", "in_flight_rows", "batch_started", "counts")

    def __init__(self, counts: dict[str, int]) -> None:
        self.chunks: deque[Chunk[P]] = deque()
        self.rows = 0
        self.in_flight: list[Chunk[P]] = []
        self.in_flight_rows = 0
        self.batch_started = 0.0
        self.counts = counts

    def push(self, req: Request, pieces: list[tuple[P, int]], rows: int, now: float) -> None:
        """Queue ``req`` whole, as ``pieces`` of ``(payload, rows)`` in row order, arrived at ``now``."""
        req.arrival = now
        append = self.chunks.append
        for index, (piece, piece_rows) in enumerate(pieces):
            append(Chunk(piece, piece_rows, now, req, index))
        req.queued_chunks = req.n_chunks
        self.rows += rows
        self.counts["submitted"] += 1

    def finish(self, req: Request, exc: BaseException | None, kind: str) -> None:
        """End ``req`` with ``exc``: drop its queued chunks, count it under ``kind``, deliver.

        For ``kind == "cancelled"`` nothing is delivered (its awaiter is gone).
        """
        req.done = True
        req.results = []
        if req.queued_chunks:
            kept: deque[Chunk[P]] = deque()
            for chunk in self.chunks:
                if chunk._request is req:
                    self.rows -= chunk.rows
                else:
                    kept.append(chunk)
            self.chunks = kept
            req.queued_chunks = 0
        self.counts[kind] += 1
        if kind != "cancelled":
            deliver(req, None, exc)

    def fail_queued(self) -> None:
        """Fail every queued request with :class:`BatcherClosedError` (counted as closed)."""
        while self.chunks:
            req = self.chunks[0]._request
            self.finish(req, BatcherClosedError("batcher stopped before the request was computed"), "closed")
