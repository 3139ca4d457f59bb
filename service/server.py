"""The uvicorn server of ``gga-serve``, with a graceful drain on SIGTERM (and SIGINT).

uvicorn's own shutdown stops listening, closes idle keep-alive connections, waits up to
``timeout_graceful_shutdown`` for the requests in progress and then cancels whatever is
left, whose clients get a bare 500. :class:`DrainingServer` puts the service's policy in
front of it:

1. At once: the service stops admitting (``/readyz`` and new ``/predict`` get 503, so a
   load balancer takes the replica out), and the batcher stops accepting but keeps
   computing what is queued, without the batching delay.
2. Shortly before the grace period ends (``margin_s``: long enough for a batch in flight
   to finish and answer, at least 1 s and at most half the grace), requests still queued
   are failed with the 503 envelope ("shutting down"): a client is told to retry
   elsewhere instead of being cut off.
3. uvicorn waits for the answers, then the lifespan releases the model, the batcher and
   the fit jobs, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import uvicorn
from fastapi import FastAPI

log = logging.getLogger("service.server")


def margin_s(grace_s: float, mean_batch_s: float | None) -> float:
    """How long before the end of the grace the still-queued requests are failed with 503:
    two batch times (the batch in flight must finish and answer), at least 1 s, at most half the grace."""
    return min(grace_s / 2, max(1.0, 2 * (mean_batch_s or 0.0)))


class DrainingServer(uvicorn.Server):
    """``uvicorn.Server`` whose shutdown drains the service first (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.app = app

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        state = self.app.state
        state.ready = False  # /readyz 503 and /predict 503 from now on
        batcher = getattr(state, "batcher", None)
        grace = self.config.timeout_graceful_shutdown
        escalation = None
        if batcher is not None:
            queued = batcher.queued_rows
            batcher.close(drain=True)
            if grace is not None:
                margin = margin_s(grace, batcher.mean_compute_s)
                escalation = asyncio.get_running_loop().call_later(max(0.0, grace - margin), self._escalate, batcher)
            log.info("shutting down: not admitting; %d queued rows computed for up to %s s", queued,
                     "unbounded" if grace is None else f"{max(0.0, grace - margin):.1f}")
        try:
            await super().shutdown(sockets)
        finally:
            if escalation is not None:
                escalation.cancel()

    @staticmethod
    def _escalate(batcher) -> None:
        left = batcher.queued_rows
        if left:
            log.warning("shutdown grace ending: %d queued rows answered 503 (not computed)", left)
        batcher.close()
