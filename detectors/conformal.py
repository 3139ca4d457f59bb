"""Split conformal prediction sets: fitted on labelled calibration logits, applied to new logits.

Scores and the quantile rule are in :mod:`detectors.conformal_scores`. Given calibration logits
[n, C] and labels [n], :class:`PredictionSets` keeps q̂ (one per class when ``mondrian``) and
returns, for new logits [B, C], a bool mask [B, C] with mask[b, c] = E(x_b, c) ≤ q̂ (or
≤ q̂_c). Guarantee (split conformal; Vovk et al. 2005, Angelopoulos & Bates 2021): for a test
pair exchangeable with the calibration pairs, P(y ∈ C(x)) ≥ 1 − α; Mondrian (class-conditional)
calibration gives P(y ∈ C(x) | y = c) ≥ 1 − α for every class c (Vovk 2012; Sadinle et al.
2019), at the price of larger sets for rare classes.

RAPS parameters, when not given, are chosen on a seeded ``tune_fraction`` of the calibration
data and the quantile is taken on the rest (Angelopoulos et al. 2021, section 2.3), so the
quantile's calibration samples never saw the choice:

- k_reg = the ⌈m(1 − α)⌉-th smallest 1-based true-label rank o(y) on the m tuning samples (the
  rank that covers 1 − α of them by itself);
- λ = the grid value whose set, calibrated and measured on the tuning samples, has the smallest
  mean size (ties: the smaller λ).
"""

from __future__ import annotations

import math
from typing import Self

import torch

from detectors.conformal_scores import (
    RAPS_LAMBDA_GRID,
    SCORES,
    check_alpha,
    check_logits,
    conformal_quantile,
    conformal_rank,
    score_matrix,
    true_label_ranks,
    uniforms,
)

__all__ = ["PredictionSets", "tune_raps"]


def tune_raps(logits, labels, alpha: float, *, lambda_grid=RAPS_LAMBDA_GRID, randomized: bool = False,
              generator: torch.Generator | None = None) -> tuple[int, float]:
    """(k_reg, λ) chosen on tuning logits [m, C] and labels [m] (see the module docstring)."""
    z, y = check_logits(logits, labels)
    alpha = check_alpha(alpha)
    if len(y) < 1:
        raise ValueError("RAPS tuning needs at least one labelled sample")
    grid = [float(v) for v in lambda_grid]
    if not grid or min(grid) < 0:
        raise ValueError(f"lambda_grid must hold values >= 0, got {lambda_grid}")
    ranks = torch.sort(true_label_ranks(z, y)).values
    k_reg = int(ranks[min(conformal_rank(len(ranks) - 1, alpha), len(ranks)) - 1])  # ⌈m(1 − α)⌉-th smallest
    u = uniforms(len(z), generator) if randomized else None
    best: tuple[float, float] | None = None
    for lam in grid:
        e = score_matrix("raps", z, u=u, lam=lam, k_reg=k_reg)
        q = conformal_quantile(e.gather(1, y[:, None])[:, 0], alpha)
        size = float((e <= q).sum(dim=1).double().mean())
        if best is None or size < best[0]:
            best = (size, lam)
    return k_reg, best[1]


class PredictionSets:
    """Conformal prediction sets for one score function and miscoverage α; fitted state only.

    ``score``: "lac", "aps" or "raps". ``randomized`` (APS/RAPS): one U(0, 1) draw per sample, at
    calibration and at prediction, from a generator seeded with ``seed``. ``mondrian``: one quantile
    per class. RAPS: ``k_reg`` and ``lam`` fixed by the caller, or both None to tune them on
    ``tune_fraction`` of the calibration data over ``lambda_grid``.
    """

    def __init__(self, score: str = "aps", alpha: float = 0.1, *, randomized: bool = False, mondrian: bool = False,
                 k_reg: int | None = None, lam: float | None = None, tune_fraction: float = 0.3,
                 lambda_grid=RAPS_LAMBDA_GRID, seed: int = 0) -> None:
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        self.score = score
        self.alpha = check_alpha(alpha)
        self.randomized = bool(randomized) and score != "lac"
        self.mondrian = bool(mondrian)
        if (k_reg is None) != (lam is None):
            raise ValueError("give both k_reg and lam (fixed RAPS parameters) or neither (tuned at fit)")
        if k_reg is not None and (int(k_reg) < 0 or float(lam) < 0):
            raise ValueError(f"RAPS needs k_reg >= 0 and lam >= 0, got k_reg={k_reg}, lam={lam}")
        if score != "raps" and k_reg is not None:
            raise ValueError(f"k_reg and lam belong to the RAPS score, not {score!r}")
        if not 0.0 < tune_fraction < 1.0:
            raise ValueError(f"tune_fraction must lie in (0, 1), got {tune_fraction}")
        self.k_reg = None if k_reg is None else int(k_reg)
        self.lam = None if lam is None else float(lam)
        self.tuned = score == "raps" and k_reg is None
        self.tune_fraction = float(tune_fraction)
        self.lambda_grid = tuple(float(v) for v in lambda_grid)
        self.seed = int(seed)
        self._gen = torch.Generator().manual_seed(self.seed)
        self.quantiles: torch.Tensor | None = None  # float64 [1] or [C]
        self.num_classes: int | None = None
        self.n_calibration = 0
        self.n_tune = 0

    @property
    def fitted(self) -> bool:
        return self.quantiles is not None

    def _scores(self, z: torch.Tensor) -> torch.Tensor:
        u = uniforms(len(z), self._gen) if self.randomized else None
        return score_matrix(self.score, z, u=u, lam=self.lam or 0.0, k_reg=self.k_reg or 0)

    def fit(self, logits, labels) -> Self:
        """Calibrate on logits [n, C] and labels [n] (held-out data, exchangeable with the test inputs)."""
        z, y = check_logits(logits, labels)
        if len(y) < 1:
            raise ValueError("calibration needs at least one labelled sample")
        self._gen.manual_seed(self.seed)
        self.n_tune = 0
        if self.tuned:
            perm = torch.randperm(len(y), generator=self._gen)
            m = math.floor(self.tune_fraction * len(y))
            if m < 1 or m >= len(y):
                raise ValueError(f"RAPS tuning on a fraction {self.tune_fraction} of {len(y)} samples leaves an "
                                 "empty part: give more calibration data or fixed k_reg and lam")
            tune, perm = perm[:m], perm[m:]
            self.k_reg, self.lam = tune_raps(z[tune], y[tune], self.alpha, lambda_grid=self.lambda_grid,
                                             randomized=self.randomized, generator=self._gen)
            z, y, self.n_tune = z[perm], y[perm], m
        true = self._scores(z).gather(1, y[:, None])[:, 0]
        if self.mondrian:
            self.quantiles = torch.tensor([conformal_quantile(true[y == c], self.alpha) for c in range(z.shape[1])],
                                          dtype=torch.float64)
        else:
            self.quantiles = torch.tensor([conformal_quantile(true, self.alpha)], dtype=torch.float64)
        self.num_classes, self.n_calibration = z.shape[1], len(y)
        return self

    def predict(self, logits) -> torch.Tensor:
        """Bool mask [B, C]: mask[b, c] = E(x_b, c) ≤ q̂ (q̂_c when Mondrian). Randomised scores draw
        their uniforms from the set's own generator, which continues across calls after fit."""
        if not self.fitted:
            raise RuntimeError("the prediction sets are not fitted: call fit(logits, labels) or load_state_dict")
        z, _ = check_logits(logits)
        if z.shape[1] != self.num_classes:
            raise ValueError(f"logits have {z.shape[1]} classes, the sets were fitted for {self.num_classes}")
        return self._scores(z) <= self.quantiles[None, :]

    def metadata(self) -> dict:
        if not self.fitted:
            raise RuntimeError("the prediction sets are not fitted")
        q = [None if math.isinf(v) else v for v in self.quantiles.tolist()]
        return {"score": self.score, "alpha": self.alpha, "randomized": self.randomized, "mondrian": self.mondrian,
                "k_reg": self.k_reg, "lambda": self.lam, "tuned": self.tuned, "tune_fraction": self.tune_fraction,
                "seed": self.seed, "num_classes": self.num_classes, "n_calibration": self.n_calibration,
                "n_tune": self.n_tune, "quantiles": q}

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Tensors only: the quantiles (float64 [1] or [C]; +inf allowed) and
        [α, k_reg, λ, randomized, mondrian, C, seed, n_calibration] as float64 [8]."""
        if not self.fitted:
            raise RuntimeError("the prediction sets are not fitted")
        header = [self.alpha, -1 if self.k_reg is None else self.k_reg, -1.0 if self.lam is None else self.lam,
                  float(self.randomized), float(self.mondrian), self.num_classes, self.seed, self.n_calibration]
        return {f"{prefix}quantiles": self.quantiles.clone(),
                f"{prefix}params": torch.tensor(header, dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, torch.Tensor], prefix: str = "") -> Self:
        try:
            q = torch.as_tensor(state[f"{prefix}quantiles"]).to(torch.float64).flatten()
            params = torch.as_tensor(state[f"{prefix}params"]).to(torch.float64).flatten()
        except KeyError as exc:
            raise ValueError(f"prediction-set state is missing {exc}") from exc
        if len(params) != 8:
            raise ValueError(f"prediction-set params must hold 8 values, got {len(params)}")
        alpha, k_reg, lam, randomized, mondrian, c, seed, n = params.tolist()
        if check_alpha(alpha) != self.alpha or bool(mondrian) != self.mondrian or bool(randomized) != self.randomized:
            raise ValueError(f"the state is for alpha={alpha}, mondrian={bool(mondrian)}, "
                             f"randomized={bool(randomized)}; these sets were built with alpha={self.alpha}, "
                             f"mondrian={self.mondrian}, randomized={self.randomized}")
        if len(q) != (int(c) if self.mondrian else 1) or torch.isnan(q).any():
            raise ValueError(f"expected {int(c) if self.mondrian else 1} quantiles for {int(c)} classes, got {len(q)}")
        if self.score == "raps" and k_reg < 0:
            raise ValueError("the state holds no RAPS parameters (k_reg, lambda)")
        if self.score == "raps":
            self.k_reg, self.lam = int(k_reg), float(lam)
        self.quantiles, self.num_classes, self.n_calibration = q, int(c), int(n)
        self.seed = int(seed)
        self._gen.manual_seed(self.seed)
        return self
