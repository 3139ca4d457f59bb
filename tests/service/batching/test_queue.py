"""The request queue alone: chunks in arrival order, how a request ends, delivery to its loop."""

from __future__ import annotations

import asyncio

import pytest

from service.batching import BatcherClosedError
from service.batching.queue import Request, RequestQueue, deliver
from service.batching.stats import new_counts


def pushed(loop: asyncio.AbstractEventLoop, queue: RequestQueue[str], pieces: list[tuple[str, int]],
           now: float) -> Request:
    req = Request(loop, loop.create_future(), len(pieces), "".join)
    queue.push(req, pieces, sum(rows for _, rows in pieces), now)
    return req


def settled(loop: asyncio.AbstractEventLoop) -> None:
    loop.run_until_complete(asyncio.sleep(0))  # runs the callbacks deliver scheduled


def test_push_queues_a_request_whole_in_row_order() -> None:
    loop = asyncio.new_event_loop()
    try:
        queue: RequestQueue[str] = RequestQueue(new_counts())
        a = pushed(loop, queue, [("a0", 4), ("a1", 4), ("a2", 1)], 1.5)
        b = pushed(loop, queue, [("b0", 2)], 2.0)
        assert [(c.payload, c.rows, c.arrival, c._index) for c in queue.chunks] == [
            ("a0", 4, 1.5, 0), ("a1", 4, 1.5, 1), ("a2", 1, 1.5, 2), ("b0", 2, 2.0, 0)]
        assert [c._request for c in queue.chunks] == [a, a, a, b]
        assert (queue.rows, queue.counts["submitted"]) == (11, 2)
        assert (a.arrival, a.queued_chunks, a.remaining, a.results, a.done) == (1.5, 3, 3, [None] * 3, False)
    finally:
        loop.close()


def test_finish_drops_only_that_request_counts_it_and_delivers_its_error() -> None:
    loop = asyncio.new_event_loop()
    try:
        queue: RequestQueue[str] = RequestQueue(new_counts())
        a = pushed(loop, queue, [("a0", 4), ("a1", 2)], 0.0)
        b = pushed(loop, queue, [("b0", 3)], 0.0)
        c = pushed(loop, queue, [("c0", 1)], 0.0)
        queue.finish(a, ValueError("bad a"), "failed")
        queue.finish(c, None, "cancelled")  # its awaiter is gone: nothing delivered
        assert [ch.payload for ch in queue.chunks] == ["b0"]
        assert queue.rows == 3
        assert (a.done, a.queued_chunks, a.results) == (True, 0, [])
        assert (queue.counts["failed"], queue.counts["cancelled"]) == (1, 1)
        settled(loop)
        assert str(a.future.exception()) == "bad a"
        assert not c.future.done()
        queue.fail_queued()
        settled(loop)
        assert type(b.future.exception()) is BatcherClosedError
        assert str(b.future.exception()) == "batcher stopped before the request was computed"
        assert (queue.rows, len(queue.chunks), queue.counts["closed"]) == (0, 0, 1)
    finally:
        loop.close()


def test_deliver_leaves_a_cancelled_future_alone_and_tolerates_a_closed_loop() -> None:
    loop = asyncio.new_event_loop()
    try:
        req = Request(loop, loop.create_future(), 1, None)
        req.future.cancel()
        deliver(req, 7, None)
        settled(loop)
        assert req.future.cancelled()
        done = Request(loop, loop.create_future(), 1, None)
        deliver(done, 7, None)
        settled(loop)
        assert done.future.result() == 7
    finally:
        loop.close()
    deliver(Request(loop, loop.create_future(), 1, None), 8, None)  # closed loop: dropped, no error
    with pytest.raises(RuntimeError, match="closed"):
        loop.call_soon_threadsafe(lambda: None)
