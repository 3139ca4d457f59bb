"""Fakes and helpers of the batcher tests (tests/service/batching/), without torch.

The fake compute sums rows of numpy arrays the way the service concatenates a batch,
runs one model call and splits it back. Payload rows are tagged: row i of request
``tag`` is ``[tag * 1000 + i, 1]``, so a chunk names its request and first row, and a
row's result ``tag * 1000 + i + 1`` is exact.

Determinism: the worker is controlled with threading.Events (a "blocker" request holds
compute until released) and an injected fake clock that only moves when a test moves
it (then ``batcher.wake()``), so batch compositions never depend on scheduling.
"""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np

from service.batching import (
    BatchInfo,
    Chunk,
    DynamicBatcher,
)

WAIT_S = 5.0  # generous bound for waits that normally end in milliseconds
BLOCKER = 9  # compute blocks on requests with this tag until `release` is set
BAD = 13  # compute raises ValueError on requests with this tag

T = TypeVar("T")


def tagged(tag: int, n: int) -> np.ndarray:
    """Rows ``[tag * 1000 + i, 1]`` for i < n: row sum ``tag * 1000 + i + 1``."""
    x = np.ones((n, 2))
    x[:, 0] = tag * 1000 + np.arange(n)
    return x


def expected(tag: int, n: int) -> np.ndarray:
    return tag * 1000 + np.arange(n) + 1.0


def split(x: np.ndarray, start: int, stop: int) -> np.ndarray:
    return x[start:stop]


def merge(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts)


def describe(chunk: Chunk[np.ndarray]) -> tuple[int, int, int]:
    """(tag, first row, rows) of a chunk."""
    first = int(chunk.payload[0, 0])
    return first // 1000, first % 1000, chunk.rows


class FakeClock:
    """A clock that moves only when told to; counts its reads."""

    def __init__(self, t: float = 0.0) -> None:
        self._t = t
        self._cond = threading.Condition()
        self.reads = 0

    def __call__(self) -> float:
        with self._cond:
            self.reads += 1
            self._cond.notify_all()
            return self._t

    def set(self, t: float) -> None:
        with self._cond:
            self._t = t

    def advance(self, dt: float) -> None:
        with self._cond:
            self._t += dt

    def wait_reads(self, n: int) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.reads >= n, WAIT_S)


class RowSums:
    """Fake compute: per item, the row sums of its payload; records every call."""

    def __init__(self, clock: FakeClock | None = None, compute_s: float = 0.0) -> None:
        self.calls: list[list[tuple[int, int, int]]] = []
        self.threads: set[tuple[int, str]] = set()
        self.entered = threading.Event()  # a blocker request is being computed
        self.release = threading.Event()
        self._clock = clock
        self._compute_s = compute_s
        self._cond = threading.Condition()
        self._returned = 0

    def __call__(self, items: list[Chunk[np.ndarray]]) -> list[np.ndarray]:
        me = threading.current_thread()
        described = [describe(c) for c in items]
        with self._cond:
            self.threads.add((threading.get_ident(), me.name))
            self.calls.append(described)
        try:
            if any(tag == BLOCKER for tag, _, _ in described):
                self.entered.set()
                if not self.release.wait(WAIT_S):
                    raise RuntimeError("test never released the blocker")
            if self._clock is not None:
                self._clock.advance(self._compute_s)
            bad = [tag for tag, _, _ in described if tag == BAD]
            if bad:
                raise ValueError(f"bad rows from request {bad[0]}")
            x = np.concatenate([c.payload for c in items])  # one model batch
            sums = x.sum(axis=1)
            return np.split(sums, np.cumsum([c.rows for c in items])[:-1])
        finally:
            with self._cond:
                self._returned += 1
                self._cond.notify_all()

    def wait_calls(self, n: int) -> bool:
        """Block until ``n`` compute calls have returned (or raised)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._returned >= n, WAIT_S)


class Infos:
    """on_batch recorder."""

    def __init__(self) -> None:
        self.items: list[BatchInfo] = []
        self._cond = threading.Condition()

    def __call__(self, info: BatchInfo) -> None:
        with self._cond:
            self.items.append(info)
            self._cond.notify_all()

    def wait(self, n: int) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.items) >= n, WAIT_S)


@contextmanager
def running(compute: RowSums, **kwargs: Any) -> Iterator[DynamicBatcher[np.ndarray, np.ndarray]]:
    """A started batcher (defaults: rows cap 8, a delay and timeout the fake clock never reaches)."""
    settings: dict[str, Any] = dict(max_batch_rows=8, max_delay_s=1000.0, max_queue_rows=64, timeout_s=10_000.0)
    settings.update(kwargs)
    batcher: DynamicBatcher[np.ndarray, np.ndarray] = DynamicBatcher(compute, **settings)
    batcher.start()
    try:
        yield batcher
    finally:
        compute.release.set()
        assert batcher.stop(timeout=WAIT_S), "worker thread did not end"
        assert not batcher.running


def run(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run with an overall bound, so that a broken batcher fails a test instead of hanging it."""
    return asyncio.run(asyncio.wait_for(main, 2 * WAIT_S))


async def in_thread(wait: Callable[[], bool]) -> None:
    """Await a blocking wait (Event.wait, Condition.wait_for) without blocking the loop."""
    assert await asyncio.to_thread(wait), "timed out waiting for the worker"


def spawn(batcher: DynamicBatcher[np.ndarray, np.ndarray], tag: int, n: int) -> asyncio.Task[np.ndarray]:
    return asyncio.ensure_future(batcher.submit(tagged(tag, n), n, split=split, merge=merge))
