"""Nonconformity scores of split conformal classification and the conformal quantile.

Every function takes logits z [B, C] (any float dtype) and works on p = softmax(z) in float64.
A score matrix E [B, C] holds, for every sample b and every candidate label c, the score the
pair (x_b, c) would have; higher = less conforming. The calibration score of a labelled sample
is E[b, y_b], gathered from the same matrix, so a calibration score and a test score of the same
pair are the same float64 number.

Scores (π_(1) ≥ π_(2) ≥ … the sorted probabilities, o(c) ∈ {1..C} the 1-based rank of class c,
ties ranked by class index, ρ(c) = Σ_{j<o(c)} π_(j) the mass ranked strictly above c):

- LAC (least ambiguous set-valued classifier; Sadinle, Lei & Wasserman 2019):
  E(x, c) = 1 − p_c.
- APS (adaptive prediction sets; Romano, Sesia & Candès 2020):
  E(x, c) = ρ(c) + u · p_c, with u = 1 (non-randomised: the cumulative mass up to and including
  c) or u ~ U(0, 1), one draw per sample (randomised).
- RAPS (regularised APS; Angelopoulos, Bates, Malik & Jordan 2021):
  E(x, c) = ρ(c) + u · p_c + λ · max(0, o(c) − k_reg).

The set of a test input is C(x) = {c : E(x, c) ≤ q̂}. For APS/RAPS the score grows with the rank
(for a fixed u), so C(x) is a prefix of the ranking: the classes whose cumulative score up to and
including them is ≤ q̂ and, when randomised, the class that crosses q̂ with probability
(q̂ − ρ − penalty) / p, which is the randomised rule of both papers written as a score threshold.

Conformal quantile (Vovk et al. 2005; Angelopoulos & Bates 2021, eq. 1): with calibration
scores s_1..s_n, q̂ = s_(k), the k-th smallest, k = ⌈(n + 1)(1 − α)⌉, and q̂ = +∞ (every class)
when k > n. Then P(y ∈ C(x)) ≥ 1 − α for (x, y) exchangeable with the calibration samples.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

SCORES = ("lac", "aps", "raps")
# the λ grid of Angelopoulos et al. (2021), section 2.3
RAPS_LAMBDA_GRID = (0.001, 0.01, 0.1, 0.2, 0.5)

__all__ = ["RAPS_LAMBDA_GRID", "SCORES", "aps_scores", "check_alpha", "check_logits", "conformal_quantile",
           "conformal_rank", "lac_scores", "raps_scores", "score_matrix", "softmax64", "true_label_ranks",
           "uniforms"]


def check_logits(logits, labels=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validated float64 logits [B, C >= 2] on the CPU and int64 labels [B] in [0, C) (when given)."""
    z = torch.as_tensor(logits).detach().to("cpu", torch.float64)
    if z.dim() != 2 or z.shape[1] < 2:
        raise ValueError(f"logits must be [B, C] with C >= 2 classes, got shape {tuple(z.shape)}")
    if not torch.isfinite(z).all():
        raise ValueError("logits contain NaN or inf")
    if labels is None:
        return z, None
    y = torch.as_tensor(labels).detach().to("cpu")
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.dim() != 1 or len(y) != len(z):
        raise ValueError(f"labels must be integer class indices [{len(z)}], got {y.dtype} {tuple(y.shape)}")
    y = y.long()
    if len(y) and (y.min() < 0 or y.max() >= z.shape[1]):
        raise ValueError(f"labels must lie in [0, {z.shape[1]}), got min {int(y.min())} max {int(y.max())}")
    return z, y


def check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha (the miscoverage level) must lie in (0, 1), got {alpha}")
    return alpha


def softmax64(logits) -> torch.Tensor:
    """p = softmax(z) in float64, [B, C]."""
    return torch.softmax(check_logits(logits)[0], dim=1)


def _sorted(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities sorted in descending order (ties by class index) and the sorting indices."""
    return torch.sort(p, dim=1, descending=True, stable=True)


def lac_scores(logits) -> torch.Tensor:
    """E[b, c] = 1 − p_c (float64 [B, C])."""
    return 1.0 - softmax64(logits)


def raps_scores(logits, lam: float, k_reg: int, u: torch.Tensor | None = None) -> torch.Tensor:
    """E[b, c] = ρ(c) + u_b · p_c + λ · max(0, o(c) − k_reg) (float64 [B, C]).

    ``u`` [B] in [0, 1] randomises (one draw per sample); None means u = 1 (non-randomised).
    λ = 0 gives APS. The cumulative sum runs over the sorted probabilities, so ρ(c) + p_c is the
    running sum at c's rank, exactly as written here.
    """
    p = softmax64(logits)
    if lam < 0 or k_reg < 0:
        raise ValueError(f"RAPS needs lambda >= 0 and k_reg >= 0, got lambda={lam}, k_reg={k_reg}")
    ps, order = _sorted(p)
    inclusive = torch.cumsum(ps, dim=1)
    if u is None:
        sorted_scores = inclusive
    else:
        u = torch.as_tensor(u, dtype=torch.float64).reshape(-1, 1)
        if len(u) != len(p):
            raise ValueError(f"u must hold one uniform per sample ({len(p)}), got {len(u)}")
        sorted_scores = (inclusive - ps) + u * ps
    if lam > 0:
        rank = torch.arange(1, p.shape[1] + 1, dtype=torch.float64)
        sorted_scores = sorted_scores + lam * torch.clamp(rank - k_reg, min=0.0)
    return torch.empty_like(p).scatter_(1, order, sorted_scores)


def aps_scores(logits, u: torch.Tensor | None = None) -> torch.Tensor:
    """E[b, c] = ρ(c) + u_b · p_c (float64 [B, C]); u = None is the non-randomised cumulative mass."""
    return raps_scores(logits, 0.0, 0, u)


def score_matrix(name: str, logits, *, u: torch.Tensor | None = None, lam: float = 0.0,
                 k_reg: int = 0) -> torch.Tensor:
    """The score matrix [B, C] of ``name`` (one of :data:`SCORES`); u is ignored by LAC."""
    if name == "lac":
        return lac_scores(logits)
    if name == "aps":
        return aps_scores(logits, u)
    if name == "raps":
        return raps_scores(logits, lam, k_reg, u)
    raise ValueError(f"score must be one of {SCORES}, got {name!r}")


def uniforms(n: int, generator: torch.Generator | None) -> torch.Tensor:
    """n draws of U(0, 1) in float64 from ``generator``: the randomisation of APS/RAPS."""
    return torch.rand(n, dtype=torch.float64, generator=generator)


def conformal_rank(n: int, alpha: float) -> int:
    """k = ⌈(n + 1)(1 − α)⌉, computed exactly on the binary value of α (no float rounding up:
    n = 99, α = 0.1 gives 90, where the float product 100 · 0.9 = 90.00000000000001 would give 91)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return math.ceil((n + 1) * (1 - Fraction(check_alpha(alpha))))


def conformal_quantile(scores: torch.Tensor, alpha: float) -> float:
    """q̂ = the ⌈(n + 1)(1 − α)⌉-th smallest of the calibration scores [n]; +∞ when that exceeds n."""
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    k = conformal_rank(len(s), alpha)
    if k > len(s):
        return math.inf
    return float(torch.kthvalue(s, k).values)


def true_label_ranks(logits, labels) -> torch.Tensor:
    """o(y) ∈ {1..C}: the 1-based rank of each true label in the descending order of p (int64 [B])."""
    z, y = check_logits(logits, labels)
    _, order = _sorted(torch.softmax(z, dim=1))
    return (order == y[:, None]).long().argmax(dim=1) + 1
