"""Joint multi-targeted attack on the served model and the detector's robust second opinion.

The second opinion's guard flags an input whose robust model does not back the served label, so
an attacker must move *both* models to the same wrong class t inside the ball (and keep the rest
of the statistic low). For each wrong class t (most likely first), one run from the clean input
minimising

    max(max_{j≠t} z_j − z_t, −κ) + max(d_t, −κ) + c · max(0, S̃ − (threshold − δ))

with z the served logits, d_t = −(r_t − logsumexp_{j≠t} r_j) the disagreement component for t (r:
the second opinion's logits; its margin for t pushed up to κ), and S̃ the surrogate statistic
with the margin and the disagreement taken for t. Without a second opinion it is the
multi-targeted attack. Restarts r > 0 use c · 10^r.
"""

from __future__ import annotations

import torch

from benchmarks.adaptive.common import Context, Tracker, descend, detector_hinge, gradient, targeted_margin

NAME = "joint"


def attack(ctx: Context, x: torch.Tensor, y: torch.Tensor, *, c: float = 0.1) -> Tracker:
    tracker = Tracker(x)
    sur = ctx.surrogate
    thr = sur.threshold
    guard = "disagreement" in sur.names
    with torch.no_grad():
        z = sur.model(x)
    order = z.scatter(1, y[:, None], -torch.inf).argsort(dim=1, descending=True)[:, : z.shape[1] - 1]
    for rnd in range(ctx.restarts):
        weight = c * 10.0 ** rnd
        for k in range(order.shape[1]):
            target = order[:, k]

            def direction(xa: torch.Tensor, rows: torch.Tensor, target=target, weight=weight):
                out = sur(xa, target=target[rows])
                loss = targeted_margin(out.logits, target[rows], ctx.kappa).double()
                if guard:
                    loss = loss + out.components[:, -1].clamp(min=-ctx.kappa)
                loss = loss + weight * detector_hinge(out, thr, ctx.delta)
                return gradient(loss, xa), out

            rows = torch.nonzero(~tracker.found)[:, 0]
            if len(rows) == 0:
                return tracker
            descend(ctx, x, y, rows, direction, tracker)
            ctx.log(f"joint restart {rnd + 1} target rank {k + 1}: {int(tracker.found.sum())}/{len(x)} found")
    return tracker
