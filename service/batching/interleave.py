"""Other work on the worker thread, between batches (``DynamicBatcher.run_between``).

The fit jobs' model passes and the strategy measurements run on the compute worker, so
that nothing else ever uses the model while a batch is computed. Each such call is a
:class:`Task`, queued in :class:`Interleaver` and run by the worker:

- when no request is queued, at once;
- under sustained load, once it has waited ``background_wait_s``: then before the next
  batch, so it is never starved and delays requests by at most one task at a time.

A task still waiting when the batcher stops fails with :class:`BatcherClosedError`
(fit jobs stop with the service; only requests are drained). Guarded by the batcher's
lock, except :meth:`Task.wait` and :meth:`Interleaver.run`.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from service.batching.errors import BatcherClosedError
from service.batching.validate import is_finite_real

__all__ = ["Interleaver", "Task"]


class Task:
    """A ``run_between`` call waiting for, or running on, the worker thread."""

    __slots__ = ("fn", "queued_at", "done", "result", "error")

    def __init__(self, fn: Callable[[], Any], queued_at: float) -> None:
        self.fn, self.queued_at = fn, queued_at
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None

    def finish(self, result: Any, error: BaseException | None) -> None:
        self.result, self.error = result, error
        self.done.set()

    def wait(self) -> Any:
        """Block until the task has run; its result, or its error raised."""
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.result


class Interleaver:
    """The queue of waiting tasks and when the next one goes before the queued requests."""

    __slots__ = ("background_wait_s", "tasks", "_clock")

    def __init__(self, clock: Callable[[], float], *, background_wait_s: float) -> None:
        if not is_finite_real(background_wait_s) or background_wait_s < 0:
            raise ValueError(f"background_wait_s must be a finite number of seconds >= 0, got {background_wait_s!r}")
        self.background_wait_s = float(background_wait_s)
        self.tasks: deque[Task] = deque()
        self._clock = clock

    def add(self, fn: Callable[[], Any]) -> Task:
        """Queue ``fn`` as a task, arrived now."""
        task = Task(fn, self._clock())
        self.tasks.append(task)
        return task

    def pop_due(self, now: float, requests_queued: bool) -> Task | None:
        """The oldest task if it goes now (no request queued, or it waited ``background_wait_s``), removed."""
        tasks = self.tasks
        if tasks and (not requests_queued or now - tasks[0].queued_at >= self.background_wait_s):
            return tasks.popleft()
        return None

    def wake_by(self, due: float) -> float:
        """The earlier of ``due`` and the time the oldest task stops yielding to requests."""
        tasks = self.tasks
        return min(due, tasks[0].queued_at + self.background_wait_s) if tasks else due

    def fail_all(self) -> None:
        """Fail every waiting task with :class:`BatcherClosedError`."""
        while self.tasks:
            self.tasks.popleft().finish(None, BatcherClosedError("batcher stopped before the task ran"))

    @staticmethod
    def run(task: Task) -> None:
        """Run ``task`` (on the worker thread) and hand its result or error to its caller."""
        try:
            result = task.fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, whatever it is
            task.finish(None, exc)
        else:
            task.finish(result, None)
