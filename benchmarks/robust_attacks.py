"""L-inf attacks for judging an adversarially trained classifier and a two-model disagreement check.

All attacks search the set B(x) = {x' : ||x' - x||_inf <= eps, 0 <= x' <= 1} with sign
steps, keep the FIRST point where the attack's success test holds (an attack that found
a point has found it; later iterates cannot undo that) and return per-sample verdicts.
Logit margins, with z = f(x') the logits [B, C]:

- CE: L = CE(z, y) (Madry et al. 2018), success argmax z != y;
- CW margin: L = max_{j != y} z_j - z_y (Carlini & Wagner 2017), success L > 0;
- multi-targeted margin (Gowal et al. 2019): one run per wrong class t with
  L_t = z_t - z_y, success argmax z != y; a sample is robust only if all C - 1 runs fail;
- joint targeted (the disagreement check): models f_1..f_M and a target t != y, with
  m_k(t) = z^k_t - max_{j != t} z^k_j (> 0 iff f_k says t); L = min_k m_k(t) (``"min"``),
  sum_k min(m_k(t), kappa) (``"sum"``) or the smooth minimum over every model k and class
  j != t, L = -tau log sum_{k, j != t} exp(-(z^k_t - z^k_j) / tau) (``"softmin"``, which
  tends to ``"min"`` as tau -> 0; on linear models, where the best point is a linear
  programme, it found every clearly reachable agreement that ``"min"``'s sign steps,
  zig-zagging between the pieces of the minimum, sometimes miss: 12 of 12 against 11);
  success when every model says t. A digit is
  "held" when no target's run succeeds: then no point found in the ball makes the models
  agree on a wrong class, which is what a disagreement flag needs.

Step sizes: a fixed step, or (``step_size=None``) a cosine schedule
a_s = a_0 * (1 + cos(pi * s / S)) / 2 with a_0 = eps / 4 over S steps (large moves
first, fine ones at the end; the sum of steps is about 3 eps, so the whole ball is
reachable). The first run starts at the clean input (a random start makes margin attacks
weaker against some defences); restarts 2.. start from x + U(-eps, eps), clipped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# objective(x_adv [A, ...], index [A] into the batch) -> (objective to maximise [A], success [A])
Objective = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
JOINT_LOSSES = ("min", "sum", "softmin")


def _check(x: torch.Tensor, y: torch.Tensor, eps: float, steps: int) -> None:
    if x.dim() < 2 or y.shape != (x.shape[0],):
        raise ValueError(f"x must be [B, ...] and y [B], got {tuple(x.shape)} and {tuple(y.shape)}")
    if not 0.0 <= eps <= 1.0 or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"eps must be in [0, 1] and steps an integer >= 0, got eps={eps}, steps={steps}")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError("x must lie in [0, 1]")


def step_sizes(eps: float, steps: int, step_size: float | None) -> list[float]:
    """The S step sizes: ``step_size`` each, or the cosine schedule from eps / 4 (module docstring)."""
    if step_size is not None:
        return [float(step_size)] * steps
    return [eps / 4 * (1 + math.cos(math.pi * s / steps)) / 2 for s in range(steps)]


def pgd_search(objective: Objective, x: torch.Tensor, *, eps: float, steps: int, step_size: float | None = None,
               random_start: bool = False, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sign-gradient ascent of ``objective`` in B(x); returns (x_found [B, ...], found bool [B]).

    The iterate is tested before each of the ``steps`` steps and after the last
    (steps + 1 tests); a sample leaves the search at its first success and x_found holds
    that point (x itself where nothing was found).
    """
    lo, hi = (x - eps).clamp(min=0.0), (x + eps).clamp(max=1.0)
    x_adv = x.clone()
    if random_start and eps > 0:
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype) * (2 * eps) - eps
        x_adv = (x + noise).clamp(0.0, 1.0)
    x_found, found = x.clone(), torch.zeros(len(x), dtype=torch.bool)
    active = torch.arange(len(x))
    sizes = step_sizes(eps, steps, step_size)
    with torch.enable_grad():
        for s in range(steps + 1):
            if len(active) == 0:
                break
            xa = x_adv[active].detach().requires_grad_(True)
            obj, succ = objective(xa, active)
            succ = succ.detach()
            if succ.any():
                x_found[active[succ]] = xa.detach()[succ]
                found[active[succ]] = True
            if s == steps:
                break
            keep = ~succ
            (g,) = torch.autograd.grad(obj.sum(), xa)
            active = active[keep]
            stepped = xa.detach()[keep] + sizes[s] * g[keep].sign()
            x_adv[active] = torch.minimum(torch.maximum(stepped, lo[active]), hi[active])
    return x_found, found


def _runs(search: Callable[[bool], torch.Tensor], restarts: int) -> torch.Tensor:
    """OR of ``restarts`` searches' success masks: the first from the clean input, the rest random."""
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    broken = search(False)
    for _ in range(restarts - 1):
        broken = broken | search(True)
    return broken


def _model_objective(model: nn.Module, y: torch.Tensor, loss: str, target: torch.Tensor | None = None) -> Objective:
    def objective(xa: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = model(xa)
        yy = y[idx]
        wrong = z.argmax(1) != yy
        if loss == "ce":
            return F.cross_entropy(z, yy, reduction="none"), wrong
        z_y = z.gather(1, yy[:, None])[:, 0]
        if loss == "cw":
            others = z.scatter(1, yy[:, None], -math.inf)
            return others.max(1).values - z_y, wrong
        if loss == "targeted":
            return z.gather(1, target[idx][:, None])[:, 0] - z_y, wrong
        raise ValueError(f"unknown loss {loss!r}")
    return objective


def attack_broken(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, loss: str, eps: float, steps: int,
                  restarts: int = 1, step_size: float | None = None, random_first: bool = False,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Bool [B]: an untargeted attack (``loss`` "ce" or "cw") found a misclassified point in B(x).

    ``random_first`` starts the first run at a random point as well (the conventional CE
    PGD evaluation); otherwise the first run starts at x. Clean errors count as broken.
    """
    _check(x, y, eps, steps)
    if loss not in ("ce", "cw"):
        raise ValueError(f"loss must be 'ce' or 'cw', got {loss!r}")
    obj = _model_objective(model, y, loss)

    def search(random: bool) -> torch.Tensor:
        return pgd_search(obj, x, eps=eps, steps=steps, step_size=step_size, random_start=random or random_first,
                          generator=generator)[1]
    return _runs(search, restarts)


def multitargeted_broken(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int,
                         restarts: int = 1, num_classes: int = 10, step_size: float | None = None,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """Bool [B]: some run of the multi-targeted margin attack (z_t - z_y, every t != y) found an error."""
    _check(x, y, eps, steps)
    broken = torch.zeros(len(x), dtype=torch.bool)
    for t in range(num_classes):
        sel = torch.nonzero((y != t) & ~broken).flatten()
        if len(sel) == 0:
            continue
        xs, ys = x[sel], y[sel]
        obj = _model_objective(model, ys, "targeted", torch.full_like(ys, t))

        def search(random: bool, obj=obj, xs=xs) -> torch.Tensor:
            return pgd_search(obj, xs, eps=eps, steps=steps, step_size=step_size, random_start=random,
                              generator=generator)[1]
        broken[sel] = _runs(search, restarts)
    return broken


def _target_margin(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """z_t - max_{j != t} z_j per row: > 0 iff argmax z = t (ties aside)."""
    z_t = z.gather(1, t[:, None])[:, 0]
    return z_t - z.scatter(1, t[:, None], -math.inf).max(1).values


def joint_objective(models: Sequence[nn.Module], target: torch.Tensor, *, loss: str = "min",
                    kappa: float = 1.0, tau: float = 0.3) -> Objective:
    """Objective for moving every model to class ``target`` [B] at once (module docstring)."""
    if loss not in JOINT_LOSSES:
        raise ValueError(f"loss must be one of {JOINT_LOSSES}, got {loss!r}")

    def objective(xa: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = target[idx]
        margins, gaps, agree = [], [], torch.ones(len(xa), dtype=torch.bool)
        for m in models:
            z = m(xa)
            margins.append(_target_margin(z, t))
            gaps.append((z.gather(1, t[:, None]) - z).scatter(1, t[:, None], math.inf))  # z_t - z_j, inf at t
            agree &= z.argmax(1) == t
        if loss == "softmin":
            return -tau * torch.logsumexp(-torch.cat(gaps, 1) / tau, 1), agree
        stacked = torch.stack(margins)
        value = stacked.min(0).values if loss == "min" else stacked.clamp(max=kappa).sum(0)
        return value, agree
    return objective


def joint_held(models: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int,
               restarts: int = 1, losses: Sequence[str] = ("min",), kappa: float = 1.0, tau: float = 0.3,
               num_classes: int = 10,
               step_size: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Bool [B]: no run found a point in B(x) where all ``models`` say the same class t != y.

    For every t != y and every loss in ``losses``, ``restarts`` runs (the first from x).
    """
    _check(x, y, eps, steps)
    if len(models) < 1:
        raise ValueError("joint_held needs at least one model")
    broken = torch.zeros(len(x), dtype=torch.bool)
    for t in range(num_classes):
        for loss in losses:
            sel = torch.nonzero((y != t) & ~broken).flatten()
            if len(sel) == 0:
                continue
            xs = x[sel]
            obj = joint_objective(models, torch.full((len(sel),), t, dtype=torch.long), loss=loss, kappa=kappa,
                                  tau=tau)

            def search(random: bool, obj=obj, xs=xs) -> torch.Tensor:
                return pgd_search(obj, xs, eps=eps, steps=steps, step_size=step_size, random_start=random,
                                  generator=generator)[1]
            broken[sel] = _runs(search, restarts)
    return ~broken
