"""Feature matching (Tramèr, Carlini, Brendel & Madry 2020; Sabour et al. 2016).

Per input x of class y, restart r picks the target class t_r, the (r mod (C−1))-th most likely
wrong class of the clean logits, and a *guide*: the sample of class t_r from the guide pool
(correctly classified and not flagged by the real detector) nearest to x in L2. Then minimise

    Σ_l ‖f_l(x') − f_l(g)‖² / ‖f_l(g)‖²

over every layer the detector taps (channel means f_l) plus the logits, by projected steps
from x: if the detector only reads those layers, an input whose features equal a clean
sample's of class t looks like that sample to it.
"""

from __future__ import annotations

import torch

from benchmarks.adaptive.common import Context, Tracker, descend, gradient

NAME = "feature_match"


def guides_for(x: torch.Tensor, targets: torch.Tensor, pool_x: torch.Tensor, pool_y: torch.Tensor) -> torch.Tensor:
    """Index into the pool of the nearest (L2) pool sample of class targets[i] for each x[i] ([n], -1 if none)."""
    d = torch.cdist(x.flatten(1), pool_x.flatten(1))  # [n, P]
    d = torch.where(pool_y[None, :] == targets[:, None], d, torch.inf)
    idx = d.argmin(dim=1)
    return torch.where(torch.isinf(d.gather(1, idx[:, None])[:, 0]), -1, idx)


def attack(ctx: Context, x: torch.Tensor, y: torch.Tensor, *, pool_x: torch.Tensor, pool_y: torch.Tensor) -> Tracker:
    """``pool_x``/``pool_y``: clean, correctly classified, unflagged samples to copy features from."""
    if len(pool_x) == 0:
        raise ValueError("feature matching needs a non-empty guide pool")
    tracker = Tracker(x)
    sur = ctx.surrogate
    with torch.no_grad():
        z = sur.model(x)
        order = z.scatter(1, y[:, None], -torch.inf).argsort(dim=1, descending=True)[:, : z.shape[1] - 1]
        g_logits, g_layers, _ = sur.components(pool_x)
    for rnd in range(ctx.restarts):
        target = order[:, rnd % order.shape[1]]
        guide = guides_for(x, target, pool_x, pool_y)

        def direction(xa: torch.Tensor, rows: torch.Tensor, guide=guide):
            out = sur(xa)
            gi = guide[rows].clamp(min=0)
            loss = _match(out.logits.double(), g_logits[gi].double())
            for name, f in out.layers.items():
                loss = loss + _match(f, g_layers[name][gi])
            return gradient(loss, xa), out

        rows = torch.nonzero(~tracker.found & (guide >= 0))[:, 0]
        if len(rows) == 0:
            continue
        descend(ctx, x, y, rows, direction, tracker)
        ctx.log(f"feature_match restart {rnd + 1}/{ctx.restarts}: {int(tracker.found.sum())}/{len(x)} found")
    return tracker


def _match(f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return ((f - g) ** 2).sum(dim=1) / (g ** 2).sum(dim=1).clamp(min=1e-12)
