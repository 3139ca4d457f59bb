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

from benchmarks.adaptive.common import Context, Tracker
from benchmarks.adaptive.multitarget import targeted_runs
from benchmarks.adaptive.surrogate import SurrogateOutput

NAME = "joint"


def attack(ctx: Context, x: torch.Tensor, y: torch.Tensor, *, c: float = 0.1) -> Tracker:
    return targeted_runs(ctx, x, y, NAME, lambda out, target: disagreement_term(ctx, out, target), c=c)


def disagreement_term(ctx: Context, out: SurrogateOutput, target: torch.Tensor) -> torch.Tensor:
    """max(d_t, −κ) [B]: the second opinion's disagreement with class t (scored for t: the last component),
    pushed down to −κ; zeros without a second opinion."""
    if "disagreement" not in ctx.surrogate.names:
        return torch.zeros(len(target), dtype=torch.float64)
    return out.components[:, -1].clamp(min=-ctx.kappa)
