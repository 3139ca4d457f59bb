"""Multi-targeted margin attack (Gowal et al. 2019), against the classifier and the detector at once.

For each wrong class t (in order of the clean logits, most likely first), one run from the
clean input minimising  max(max_{j≠t} z_j − z_t, −κ) + c · max(0, S̃ − (threshold − δ)),
with c = ``c`` (restarts r > 0 use c · 10^r); an input counts as broken when any run finds
an accepted point. Runs stop for inputs already broken.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from benchmarks.adaptive.common import Context, Tracker, descend, detector_hinge, gradient, targeted_margin
from benchmarks.adaptive.surrogate import SurrogateOutput

NAME = "multitarget"


def attack(ctx: Context, x: torch.Tensor, y: torch.Tensor, *, c: float = 0.1) -> Tracker:
    return targeted_runs(ctx, x, y, NAME, lambda out, target: torch.zeros(len(target), dtype=torch.float64), c=c)


def targeted_runs(ctx: Context, x: torch.Tensor, y: torch.Tensor, name: str,
                  extra: Callable[[SurrogateOutput, torch.Tensor], torch.Tensor], *, c: float = 0.1,
                  order: torch.Tensor | None = None,
                  start: Callable[[int, int], torch.Tensor] | None = None) -> Tracker:
    """One run per wrong class t (``order`` [n, K]: default every wrong class, most likely first) from
    the clean input (or from ``start(restart, k)`` [n, ...], a point of the ball, for the k-th target),
    minimising the targeted margin + ``extra(out, t)`` + c · the detector hinge, with the surrogate
    scored for t; restarts r > 0 use c · 10^r. Shared by this attack, :mod:`.joint` and :mod:`.guided`."""
    tracker = Tracker(x)
    thr = ctx.surrogate.threshold
    if order is None:
        with torch.no_grad():
            z = ctx.surrogate.model(x)
        order = z.scatter(1, y[:, None], -torch.inf).argsort(dim=1, descending=True)[:, : z.shape[1] - 1]
    for rnd in range(ctx.restarts):
        weight = c * 10.0 ** rnd
        for k in range(order.shape[1]):
            target = order[:, k]

            def direction(xa: torch.Tensor, rows: torch.Tensor, target=target, weight=weight):
                out = ctx.surrogate(xa, target=target[rows])
                loss = targeted_margin(out.logits, target[rows], ctx.kappa).double() + extra(out, target[rows])
                loss = loss + weight * detector_hinge(out, thr, ctx.delta)
                return gradient(loss, xa), out

            rows = torch.nonzero(~tracker.found)[:, 0]
            if len(rows) == 0:
                return tracker
            descend(ctx, x, y, rows, direction, tracker, start=None if start is None else start(rnd, k))
            ctx.log(f"{name} restart {rnd + 1} target rank {k + 1}: {int(tracker.found.sum())}/{len(x)} found")
    return tracker
