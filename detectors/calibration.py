"""Conformal calibration of anomaly scores.

With a calibration set of n scores from held-out in-distribution samples,

    trust(x) = (1 + #{c_i >= score(x)}) / (n + 1)   ∈ (0, 1]

is a conformal p-value: for a fresh exchangeable in-distribution x,
P(trust(x) <= alpha) <= alpha. ``flagged = trust < alpha``.
"""

from __future__ import annotations

import math

import torch


def conformal_p_values(scores: torch.Tensor, calibration_sorted: torch.Tensor) -> torch.Tensor:
    """trust for each score; ``calibration_sorted`` ascending [n]. Returns float64 [B]."""
    cal = calibration_sorted.to(device=scores.device, dtype=torch.float64)
    n = cal.numel()
    below = torch.searchsorted(cal, scores.to(torch.float64).contiguous(), right=False)
    return (1.0 + (n - below).to(torch.float64)) / (n + 1.0)


def conformal_threshold(calibration_sorted: torch.Tensor, alpha: float) -> float:
    """The score above which trust < alpha (+inf when no score can be flagged).

    trust < alpha ⟺ #{c >= s} <= k − 1 with k = ceil(alpha (n + 1) − 1) ⟺ s > c_(k),
    the k-th largest calibration score.
    """
    n = calibration_sorted.numel()
    k = math.ceil(alpha * (n + 1) - 1 - 1e-12)
    if k < 1:
        return math.inf
    return float(calibration_sorted[n - k])


def min_calibration_size(alpha: float) -> int:
    """The fewest calibration scores with which ``trust < alpha`` can ever happen.

    The smallest trust is 1 / (n + 1), so flagging needs 1 / (n + 1) < alpha, i.e.
    n > 1/alpha − 1 (20 scores for alpha = 0.05, 100 for alpha = 0.01).
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    return math.floor(1.0 / alpha - 1.0 + 1e-9) + 1


class ConformalCalibration:
    """Turns raw anomaly scores (higher = more anomalous) into trust and flags.

    ``fit(scores)`` keeps the sorted calibration scores of held-out in-distribution
    samples; ``trust(s)`` is the conformal p-value (1 + #{c_i >= s}) / (n + 1) and
    ``flagged(s) = trust(s) < alpha``. The same wrapper serves every detector of the
    package. Refuses a calibration set too small to ever flag (see
    :func:`min_calibration_size`) and non-finite scores.
    """

    def __init__(self, alpha: float = 0.05) -> None:
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), e.g. 0.05; got {alpha!r}")
        self.alpha = float(alpha)
        self.scores: torch.Tensor | None = None

    @property
    def fitted(self) -> bool:
        return self.scores is not None

    def fit(self, scores: torch.Tensor) -> ConformalCalibration:
        scores = torch.as_tensor(scores).detach().to("cpu", torch.float64).flatten()
        need = min_calibration_size(self.alpha)
        if scores.numel() < need:
            raise ValueError(f"{scores.numel()} calibration scores can never flag at alpha={self.alpha}: "
                             f"pass at least {need} held-out in-distribution samples")
        if not torch.isfinite(scores).all():
            raise ValueError("calibration scores contain NaN or inf")
        self.scores = torch.sort(scores).values
        return self

    def _check(self) -> torch.Tensor:
        if self.scores is None:
            raise RuntimeError("the calibration is not fitted: call fit(scores) with held-out scores")
        return self.scores

    def trust(self, scores: torch.Tensor) -> torch.Tensor:
        return conformal_p_values(torch.as_tensor(scores), self._check())

    def flagged(self, scores: torch.Tensor) -> torch.Tensor:
        return self.trust(scores) < self.alpha

    @property
    def threshold(self) -> float:
        return conformal_threshold(self._check(), self.alpha)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"calibration_scores": self._check().contiguous()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> ConformalCalibration:
        if "calibration_scores" not in state:
            raise ValueError("calibration state needs 'calibration_scores'")
        return self.fit(state["calibration_scores"])
