"""The worker thread: its lifecycle, and its loop of waiting for, taking and running work.

- **Lifecycle** ``new -> running -> closing -> closed``. :meth:`WorkerLoop.start` starts
  the thread once. :meth:`WorkerLoop.begin_stop` stops accepting; without ``drain`` the
  queued requests fail with :class:`BatcherClosedError` at once, with ``drain`` they are
  computed first without waiting for the batching delay (a later stop without drain
  escalates). Waiting ``run_between`` tasks fail. The batch in flight always finishes
  and its results are delivered; :meth:`WorkerLoop.join` waits for the thread.
- **The loop.** Under the lock: expire the queue's late heads (deadlines), run a due
  ``run_between`` task, take a due batch (policy), or sleep on the condition until the
  earliest of the batch's and the oldest task's due times (or a notify: a submit, a
  task, a stop, ``wake``). Compute runs outside the lock.
- If the thread ends for any reason, the batch in flight, the queue and the waiting
  tasks fail with :class:`BatcherClosedError`.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from service.batching.deadlines import Deadlines
from service.batching.errors import BatcherClosedError
from service.batching.execute import BatchRunner
from service.batching.interleave import Interleaver, Task
from service.batching.policy import BatchPolicy
from service.batching.queue import Chunk, RequestQueue

__all__ = ["CLOSED", "CLOSING", "NEW", "RUNNING", "WorkerLoop"]

log = logging.getLogger(__name__)

NEW, RUNNING, CLOSING, CLOSED = "new", "running", "closing", "closed"


class WorkerLoop:
    """The one compute thread of a batcher (see the module); ``state`` is read and written under ``lock``."""

    def __init__(self, *, name: str, lock: threading.Condition, clock: Any, queue: RequestQueue[Any],
                 policy: BatchPolicy[Any], deadlines: Deadlines, interleave: Interleaver,
                 runner: BatchRunner[Any, Any]) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError("name must be a non-empty string (the worker thread's name)")
        self.name = name
        self.state = NEW
        self.drain = False
        self.thread: threading.Thread | None = None
        self._lock, self._clock, self._queue = lock, clock, queue
        self._policy, self._deadlines, self._interleave, self._runner = policy, deadlines, interleave, runner

    def closed_message(self) -> str:
        """Why a submit is refused in the current state."""
        if self.state == NEW:
            return "batcher not started: call start() first"
        return "batcher is stopping or stopped; not accepting requests"

    def start(self) -> None:
        """Start the thread. A batcher starts once; after stop, build a new one."""
        with self._lock:
            if self.state != NEW:
                raise RuntimeError(f"batcher already {self.state}; a DynamicBatcher can be started once")
            self.state = RUNNING
            self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self.thread.start()

    def begin_stop(self, drain: bool) -> None:
        """Stop accepting; fail the queue unless ``drain``; fail waiting tasks. Never blocks on the thread."""
        with self._lock:
            if self.state == NEW:
                self.state = CLOSED
                return
            if self.state == RUNNING:
                self.state = CLOSING
                self.drain = drain
                self._interleave.fail_all()  # (fit jobs stop with the service; only requests are drained)
            if self.state == CLOSING and not drain:
                # also escalates an earlier stop(drain=True)
                self.drain = False
                self._queue.fail_queued()
            self._lock.notify_all()

    def join(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` seconds for the thread; whether it has ended (False when called on it)."""
        thread = self.thread
        if thread is None:
            return True
        if thread is threading.current_thread():
            return False  # stop() called from compute/on_batch: cannot join itself
        thread.join(timeout)
        return not thread.is_alive()

    def _run(self) -> None:
        try:
            while (work := self._next_work()) is not None:
                if isinstance(work, Task):
                    Interleaver.run(work)
                else:
                    self._runner.run(work)
        except BaseException:
            log.exception("batch worker %r crashed; failing its requests", self.name)
            raise
        finally:
            with self._lock:
                self.state = CLOSED
                queue = self._queue
                for chunk in queue.in_flight:
                    if not chunk._request.done:
                        queue.finish(chunk._request, BatcherClosedError("batch worker stopped"), "closed")
                queue.in_flight = []
                queue.fail_queued()
                self._interleave.fail_all()

    def _next_work(self) -> list[Chunk[Any]] | Task | None:
        """Block until a batch (or a run_between task) is due and take it; None when the thread should exit."""
        lock, queue, interleave = self._lock, self._queue, self._interleave
        with lock:
            while True:
                state = self.state
                if state != RUNNING and not (state == CLOSING and self.drain):
                    return None
                now = self._clock()
                self._deadlines.expire_head(now)
                if interleave.tasks and state == RUNNING:
                    task = interleave.pop_due(now, bool(queue.chunks))
                    if task is not None:
                        return task
                if not queue.chunks:
                    if state != RUNNING:
                        return None  # drained
                    lock.wait()
                    continue
                due = self._policy.due(state != RUNNING)
                if now >= due:
                    batch = self._policy.take()
                    queue.batch_started = self._clock()
                    return batch
                lock.wait(interleave.wake_by(due) - now)
