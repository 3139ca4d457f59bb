"""Shared parts of the adaptive attacks: budgets, the judge, and the descent loop.

Every attack starts from the clean input x (a random start is weaker against this detector:
noise is itself flagged) and runs projected steps on an objective of its own. A point counts
(the attack *succeeds* on that input) when it is inside the ball ‖x' − x‖ ≤ ε (L∞ or L2, and
inside [0, 1]), misclassified (label ≠ y) and NOT flagged by the real detector (``score`` at
its served threshold). The loop keeps, per input, the first such point it finds (success is
binary; later points cannot undo it), and otherwise the last iterate.

Judging costs a full detector pass (GGA's N gradient passes), so the loop only judges
*candidates*: iterates that are misclassified and whose exact (unsmoothed) surrogate
statistic is at or below the threshold. When the surrogate leaves GGA out of a truncated
Fisher statistic, that statistic is a lower bound of the served one, so no success is missed
at the judged steps; candidates are judged every ``judge_every`` steps and at the last step.

Steps: L∞ x ← x − α sign(d), L2 x ← x − α d/‖d‖₂, then projection onto the ball and [0, 1];
α = ``step_scale`` · ε / steps (2.5 ε/steps by default, Madry et al. 2018); ``step_eps`` replaces
ε there (the sanity checks' ε sweep keeps the base budget's step, so a larger ball only adds room).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from benchmarks.adaptive.surrogate import Surrogate, SurrogateOutput

NORMS = ("linf", "l2")


@dataclass(frozen=True)
class Budget:
    norm: str
    eps: float

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps!r}")

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        d = x_adv - x
        if self.norm == "linf":
            d = d.clamp(-self.eps, self.eps)
        else:
            n = d.flatten(1).norm(dim=1).clamp(min=1e-12)
            d = d * (self.eps / n).clamp(max=1.0).view(-1, *([1] * (d.dim() - 1)))
        return (x + d).clamp(0.0, 1.0)

    def step(self, x_adv: torch.Tensor, direction: torch.Tensor, alpha: float) -> torch.Tensor:
        """One descent step along −direction."""
        if self.norm == "linf":
            return x_adv - alpha * direction.sign()
        n = direction.flatten(1).norm(dim=1).clamp(min=1e-12)
        return x_adv - alpha * direction / n.view(-1, *([1] * (direction.dim() - 1)))

    def inside(self, x_adv: torch.Tensor, x: torch.Tensor, tol: float = 1e-5) -> torch.Tensor:
        d = (x_adv - x).flatten(1)
        size = d.abs().amax(dim=1) if self.norm == "linf" else d.norm(dim=1)
        box = (x_adv >= -tol).flatten(1).all(dim=1) & (x_adv <= 1 + tol).flatten(1).all(dim=1)
        return (size <= self.eps + tol) & box


class Judge:
    """The real detector's verdict: ``judge(x_adv, y) -> success [B]`` = label ≠ y and not flagged.
    Counts the inputs it judged (``calls``)."""

    def __init__(self, surrogate: Surrogate) -> None:
        self.surrogate = surrogate
        self.calls = 0

    def __call__(self, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if len(x_adv) == 0:
            return torch.zeros(0, dtype=torch.bool)
        self.calls += len(x_adv)
        label, flagged = self.surrogate.flagged(x_adv)
        return (label != y) & ~flagged


@dataclass
class Tracker:
    """Per-input outcome of one attack: ``found`` [n] bool, ``x_point`` [n, ...] (the successful
    point where found, else the last iterate), ``step_found`` [n] (-1 where not found)."""

    x: torch.Tensor
    found: torch.Tensor = field(init=False)
    x_point: torch.Tensor = field(init=False)
    step_found: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.found = torch.zeros(len(self.x), dtype=torch.bool)
        self.x_point = self.x.clone()
        self.step_found = torch.full((len(self.x),), -1, dtype=torch.long)

    def record(self, rows: torch.Tensor, x_adv: torch.Tensor, success: torch.Tensor, step: int) -> None:
        win = rows[success]
        self.found[win] = True
        self.x_point[win] = x_adv[success].detach()
        self.step_found[win] = step


@dataclass
class Context:
    """What every attack needs: the surrogate (white-box view), the judge (real detector),
    the budget, steps per run, restarts, judging cadence and step scale."""

    surrogate: Surrogate
    judge: Judge
    budget: Budget
    steps: int = 200
    restarts: int = 1
    judge_every: int = 5
    step_scale: float = 2.5
    kappa: float = 1.0
    delta: float = 1.0
    log: Callable[[str], None] = field(default=lambda _m: None)
    step_eps: float | None = None  # the ε the step size is computed from (default: the budget's)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.restarts < 1 or self.judge_every < 1:
            raise ValueError("steps, restarts and judge_every must be >= 1")

    @property
    def alpha(self) -> float:
        return self.step_scale * (self.budget.eps if self.step_eps is None else self.step_eps) / self.steps


Direction = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, SurrogateOutput]]


def descend(ctx: Context, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, direction: Direction,
            tracker: Tracker, *, use_tracker_rows: bool = True, start: torch.Tensor | None = None) -> torch.Tensor:
    """Projected descent from x[rows] (or from ``start[rows]``, a point of the ball around x) along
    ``direction(x_adv, rows) -> (d [b, ...], surrogate output)`` for ``ctx.steps`` steps; inputs are
    dropped once the judge accepts a point. Returns the last iterate of every row in ``rows``
    (detached), also written to ``tracker.x_point`` for unsolved rows."""
    rows = rows[~tracker.found[rows]] if use_tracker_rows else rows
    x0 = x if start is None else start
    last = x0[rows].clone()
    if len(rows) == 0:
        return last
    x_adv = x0[rows].clone()
    active = torch.arange(len(rows))
    thr = ctx.surrogate.threshold
    for t in range(ctx.steps + 1):
        r = rows[active]
        xa = x_adv[active].detach().requires_grad_(True)
        with torch.enable_grad():
            d, out = direction(xa, r)
        final = t == ctx.steps
        if t % ctx.judge_every == 0 or final:
            with torch.no_grad():
                cand = (out.logits.argmax(dim=1) != y[r]) & (out.hard_statistic <= thr)
            if cand.any():
                ok = torch.zeros(len(r), dtype=torch.bool)
                ok[cand] = ctx.judge(xa[cand].detach(), y[r][cand])
                tracker.record(r, xa.detach(), ok, t)
                last[active[ok]] = xa.detach()[ok]
                keep = ~ok
                active, xa, d = active[keep], xa[keep], d[keep]
                r = r[keep]
        if final or len(active) == 0:
            last[active] = xa.detach()
            break
        with torch.no_grad():
            x_adv[active] = ctx.budget.project(ctx.budget.step(xa.detach(), d.detach(), ctx.alpha), x[r])
    unsolved = ~tracker.found[rows]
    tracker.x_point[rows[unsolved]] = last[unsolved]
    return last


def cw_margin(z: torch.Tensor, y: torch.Tensor, kappa: float) -> torch.Tensor:
    """Carlini & Wagner's margin, untargeted: max(z_y − max_{j≠y} z_j, −κ) [B] (minimised)."""
    other = z.scatter(1, y[:, None], -torch.inf).amax(dim=1)
    return (z.gather(1, y[:, None])[:, 0] - other).clamp(min=-kappa)


def targeted_margin(z: torch.Tensor, target: torch.Tensor, kappa: float) -> torch.Tensor:
    """max(max_{j≠t} z_j − z_t, −κ) [B] (minimised: class t wins by κ)."""
    other = z.scatter(1, target[:, None], -torch.inf).amax(dim=1)
    return (other - z.gather(1, target[:, None])[:, 0]).clamp(min=-kappa)


def detector_hinge(out: SurrogateOutput, threshold: float, delta: float) -> torch.Tensor:
    """max(0, S̃(x) − (threshold − δ)) [B]: the smoothed statistic pushed δ below the threshold."""
    return (out.statistic - (threshold - delta)).clamp(min=0.0)


def gradient(loss: torch.Tensor, x: torch.Tensor, retain: bool = False) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss.sum(), x, retain_graph=retain)
    return torch.nan_to_num(g)
