"""Carlini & Wagner's attack on the classifier and the detector at once (Carlini & Wagner 2017).

Per input, minimise  L(x') = max(z_y − max_{j≠y} z_j, −κ) + c · max(0, S̃(x') − (threshold − δ))
with S̃ the surrogate's smoothed statistic, by projected steps from the clean input. The
weight c is searched per input over ``ctx.restarts`` rounds (binary search as in C&W, here on
the detector's weight): a round that ends misclassified but flagged raises c (×10 while no
upper bound is known, else the midpoint), one that ends still correctly classified lowers it.
``c=0`` is the attack without the detector term (the classifier's own robustness).
"""

from __future__ import annotations

import torch

from benchmarks.adaptive.common import Context, Tracker, cw_margin, descend, detector_hinge, gradient

NAME = "cw"


def attack(ctx: Context, x: torch.Tensor, y: torch.Tensor, *, c0: float = 0.1, search: bool = True) -> Tracker:
    """Returns the :class:`Tracker` of the inputs x [n, ...] with labels y [n]."""
    tracker = Tracker(x)
    n = len(x)
    c = torch.full((n,), float(c0), dtype=torch.float64)
    lo = torch.zeros(n, dtype=torch.float64)
    hi = torch.full((n,), torch.inf, dtype=torch.float64)
    thr = ctx.surrogate.threshold

    def direction(xa: torch.Tensor, rows: torch.Tensor):
        out = ctx.surrogate(xa, exclude=y[rows])
        loss = cw_margin(out.logits, y[rows], ctx.kappa).double()
        if c0 > 0:
            loss = loss + c[rows] * detector_hinge(out, thr, ctx.delta)
        return gradient(loss, xa), out

    for rnd in range(ctx.restarts):
        rows = torch.nonzero(~tracker.found)[:, 0]
        if len(rows) == 0:
            break
        last = descend(ctx, x, y, rows, direction, tracker)
        ctx.log(f"cw round {rnd + 1}/{ctx.restarts}: {int(tracker.found.sum())}/{n} found")
        if not search or c0 == 0:
            continue
        with torch.no_grad():
            fooled = ctx.surrogate.model(last).argmax(dim=1) != y[rows]
        failed = ~tracker.found[rows]
        up, down = rows[failed & fooled], rows[failed & ~fooled]
        lo[up] = c[up]
        c[up] = torch.where(torch.isinf(hi[up]), c[up] * 10, (lo[up] + hi[up]) / 2)
        hi[down] = c[down]
        c[down] = (lo[down] + hi[down]) / 2
    return tracker
