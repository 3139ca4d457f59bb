"""Orthogonal projected gradient descent (Bryniarski, Hingun, Pachuca, Wang & Carlini 2022).

Per input and step, with g_cls = ∇ max(z_y − max_{j≠y} z_j, −κ) and
g_det = ∇ max(0, S̃ − (threshold − δ)) (S̃: the surrogate's smoothed statistic):

- still classified correctly: step on g_cls − (⟨g_cls, g_det⟩/‖g_det‖²) g_det (towards
  misclassification without moving the statistic, to first order);
- misclassified: step on g_det − (⟨g_det, g_cls⟩/‖g_cls‖²) g_cls (under the threshold without
  undoing the misclassification). Where g_det is zero (already δ under the surrogate
  threshold, waiting for the real detector's verdict) the step follows g_cls to stay wrong.

Each restart runs ``ctx.steps`` steps from the clean input, restart r with the step size
halved r times (a finer approach to the same input).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from benchmarks.adaptive.common import Context, Tracker, cw_margin, descend, detector_hinge

NAME = "orthogonal"


def _off(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a minus its projection on b, per sample (b = 0 leaves a)."""
    fa, fb = a.flatten(1), b.flatten(1)
    coef = (fa * fb).sum(dim=1) / (fb * fb).sum(dim=1).clamp(min=1e-30)
    return (fa - coef[:, None] * fb).view_as(a)


def attack(ctx: Context, x: torch.Tensor, y: torch.Tensor) -> Tracker:
    tracker = Tracker(x)
    thr = ctx.surrogate.threshold

    def direction(xa: torch.Tensor, rows: torch.Tensor):
        out = ctx.surrogate(xa, exclude=y[rows])
        cls = cw_margin(out.logits, y[rows], ctx.kappa)
        det = detector_hinge(out, thr, ctx.delta)
        g_cls, g_det = _two_grads(cls, det, xa)
        shape = (-1, *([1] * (xa.dim() - 1)))
        wrong = (out.logits.argmax(dim=1) != y[rows]).view(shape)
        zero_det = (g_det.flatten(1).abs().sum(dim=1) == 0).view(shape)
        step_wrong = torch.where(zero_det, g_cls, _off(g_det, g_cls))
        return torch.where(wrong, step_wrong, _off(g_cls, g_det)), out

    for rnd in range(ctx.restarts):
        rows = torch.nonzero(~tracker.found)[:, 0]
        if len(rows) == 0:
            break
        descend(replace(ctx, step_scale=ctx.step_scale / 2 ** rnd), x, y, rows, direction, tracker)
        ctx.log(f"orthogonal restart {rnd + 1}/{ctx.restarts}: {int(tracker.found.sum())}/{len(x)} found")
    return tracker


def _two_grads(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    (ga,) = torch.autograd.grad(a.sum(), x, retain_graph=True)
    (gb,) = torch.autograd.grad(b.sum(), x, allow_unused=True)
    gb = torch.zeros_like(x) if gb is None else gb
    return torch.nan_to_num(ga), torch.nan_to_num(gb)
