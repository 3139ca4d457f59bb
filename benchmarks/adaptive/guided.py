"""Guided start: the joint attack from an image of the target class instead of the clean input.

Decision-based attacks start from a sample of the adversarial class and walk it toward the input
(Brendel, Rauber & Bethge 2018); gradient attacks gain from the same start when the way from the
clean input is blocked (Brendel et al. 2019). Here, per input x of class y, a *guide* per wrong
class t: the sample of class t from the guide pool (public images, correctly classified and not
flagged by the real detector) that the projection onto the ball around x changes least,
‖g − Π(g)‖₂ (ties, e.g. when the ball holds every guide, broken by ‖g − x‖₂). Classes are tried
nearest guide first; restart r takes each class's (r+1)-th nearest guide and the weight c · 10^r.
Each run starts at Π(g) and minimises the joint objective toward t (:mod:`.joint`: the served
model's margin for t, the second opinion's disagreement with t, c · the detector hinge).

Without a bound Π(g) = g, already misclassified and unflagged: the attack then succeeds at its
first judged step on every input (the sanity check of Carlini et al. 2019 that nothing but the
budget stops the suite). With a bound it measures how far into the ball a real image of another
class can be pulled before both models and the detector give it away.
"""

from __future__ import annotations

import torch

from benchmarks.adaptive.common import Budget, Context, Tracker
from benchmarks.adaptive.joint import disagreement_term
from benchmarks.adaptive.multitarget import targeted_runs

NAME = "guided"


def projection_loss(x: torch.Tensor, pool_x: torch.Tensor, budget: Budget, chunk: int = 64) -> torch.Tensor:
    """[n, P] float64: ‖g − Π(g)‖₂ for every pool image g and the ball around each x (Π: onto the
    budget's ball; the [0, 1] box holds g already), plus 1e-6 ‖g − x‖₂ to break ties."""
    pf = pool_x.flatten(1)
    cost = torch.empty(len(x), len(pool_x), dtype=torch.float64)
    for i in range(0, len(x), chunk):
        d = pf[None, :, :] - x[i: i + chunk].flatten(1)[:, None, :]  # [b, P, D]
        dist = d.norm(dim=2)
        lost = (d.abs() - budget.eps).clamp(min=0).norm(dim=2) if budget.norm == "linf" else \
            (dist - budget.eps).clamp(min=0)
        cost[i: i + chunk] = lost.double() + 1e-6 * dist.double()
    return cost


def guides(cost: torch.Tensor, y: torch.Tensor, pool_y: torch.Tensor, num_classes: int, depth: int = 1
           ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """From ``cost`` [n, P] (:func:`projection_loss`): (classes [n, K], ranked) with classes the wrong
    classes present in the pool, nearest guide first (K: the fewest any input has), and ranked[r]
    [n, K] (r < ``depth``) the index into the pool of each of those classes' (r+1)-th nearest guide
    (the last one where the class has fewer)."""
    n = len(cost)
    best = torch.full((n, num_classes), torch.inf, dtype=torch.float64)
    per_class: list[torch.Tensor | None] = [None] * num_classes
    for t in range(num_classes):
        members = torch.nonzero(pool_y == t)[:, 0]
        if len(members):
            ranked = cost[:, members].argsort(dim=1)
            per_class[t] = members[ranked]  # [n, m_t]
            best[:, t] = cost[torch.arange(n)[:, None], per_class[t][:, :1]][:, 0]
    best[torch.arange(n), y] = torch.inf
    k = int(torch.isfinite(best).sum(dim=1).min().item())
    if k == 0:
        raise ValueError("the guide pool holds no class other than some input's own")
    classes = best.argsort(dim=1)[:, :k]
    ranked = []
    for r in range(depth):
        table = torch.full((n, num_classes), -1, dtype=torch.long)
        for t, m in enumerate(per_class):
            if m is not None:
                table[:, t] = m[:, min(r, m.shape[1] - 1)]
        ranked.append(table.gather(1, classes))
    return classes, ranked


def attack(ctx: Context, x: torch.Tensor, y: torch.Tensor, *, pool_x: torch.Tensor, pool_y: torch.Tensor,
           c: float = 0.1, classes_per_input: int | None = None) -> Tracker:
    """``pool_x``/``pool_y``: clean, correctly classified, unflagged samples of the classes (the guides);
    ``classes_per_input``: try only that many target classes per input, nearest guide first (default all)."""
    if len(pool_x) == 0:
        raise ValueError("the guided attack needs a non-empty guide pool")
    with torch.no_grad():
        num_classes = int(ctx.surrogate.model(x[:1]).shape[1])
    classes, ranked = guides(projection_loss(x, pool_x, ctx.budget), y, pool_y, num_classes, ctx.restarts)
    if classes_per_input is not None:
        if classes_per_input < 1:
            raise ValueError(f"classes_per_input must be >= 1, got {classes_per_input}")
        classes, ranked = classes[:, :classes_per_input], [r[:, :classes_per_input] for r in ranked]

    def start(rnd: int, k: int) -> torch.Tensor:
        return ctx.budget.project(pool_x[ranked[rnd][:, k]], x)

    return targeted_runs(ctx, x, y, NAME, lambda out, target: disagreement_term(ctx, out, target), c=c,
                         order=classes, start=start)
