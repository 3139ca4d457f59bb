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
