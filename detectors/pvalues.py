"""Per-component p-values against a reference sample, and their combinations.

A component's anomaly score s (higher = more anomalous) is compared with the scores
r_1..r_m of held-out in-distribution samples (the *reference*):

    p_up(s) = (1 + #{r_i >= s}) / (m + 1)

Beyond the largest reference score the empirical p-value would stop at 1/(m+1) and
tie every far outlier; there it continues with an exponential tail,

    p_up(s) = exp(−(s − r_(m)) / β) / (m + 1),   β = mean excess of the top k scores
                                                    over r_(m−k), k = max(5, m // 50)

(a peaks-over-threshold fit with shape 0), so a sample twice as far out gets a smaller
p-value. ``p_down`` mirrors it for the lower tail; a two-sided component uses
p = min(1, 2 · min(p_up, p_down)) (too confident is as suspicious as too unsure).
Everything is kept in log space (float64), so no p-value underflows to 0.

Combiners of K log p-values into one statistic (higher = more anomalous):

- ``fisher``: −2 Σ_j w_j log p_j (Fisher 1925; weights 1 unless given)
- ``min``: −log min_j p_j (the minimum; a Bonferroni factor K would not change the ranking)

The statistic is not a p-value itself (the components are dependent): the composite
detector calibrates it conformally on separate held-out data, which makes the served
trust a valid p-value whatever the dependence.
"""

from __future__ import annotations

import math

import torch

COMBINERS = ("fisher", "min")


class ReferenceTails:
    """Sorted reference scores per component, ``ref`` [m, K] float64, and their tail scales."""

    def __init__(self, ref: torch.Tensor, two_sided: torch.Tensor) -> None:
        ref = torch.as_tensor(ref).to("cpu", torch.float64)
        if ref.dim() != 2 or ref.shape[0] < 2:
            raise ValueError(f"reference scores must be [m >= 2, K], got {tuple(ref.shape)}")
        if not torch.isfinite(ref).all():
            raise ValueError("reference scores contain NaN or inf")
        self.sorted = torch.sort(ref, dim=0).values.contiguous()
        self.two_sided = torch.as_tensor(two_sided, dtype=torch.bool).flatten()
        if self.two_sided.numel() != ref.shape[1]:
            raise ValueError(f"two_sided must have one flag per component ({ref.shape[1]}), "
                             f"got {self.two_sided.numel()}")
        m = ref.shape[0]
        k = min(max(5, m // 50), m - 1)
        top, bottom = self.sorted[-k:], self.sorted[:k]
        self.beta_up = _positive((top - self.sorted[-k - 1]).mean(dim=0))
        self.beta_down = _positive((self.sorted[k] - bottom).mean(dim=0))

    @property
    def m(self) -> int:
        return self.sorted.shape[0]

    def log_p(self, scores: torch.Tensor) -> torch.Tensor:
        """log p-values [B, K] (float64) of component scores [B, K]."""
        s = torch.as_tensor(scores).to("cpu", torch.float64)
        if s.dim() != 2 or s.shape[1] != self.sorted.shape[1]:
            raise ValueError(f"scores must be [B, {self.sorted.shape[1]}], got {tuple(s.shape)}")
        m, log_norm = self.m, math.log(self.m + 1.0)
        ref_t = self.sorted.T.contiguous()  # [K, m]
        s_t = s.T.contiguous()  # [K, B]
        n_below = torch.searchsorted(ref_t, s_t, right=False).T.double()  # #{r < s}
        n_above = (m - torch.searchsorted(ref_t, s_t, right=True).T).double()  # #{r > s}
        log_up = torch.log1p(m - n_below) - log_norm
        log_down = torch.log1p(m - n_above) - log_norm
        hi, lo = self.sorted[-1], self.sorted[0]
        log_up = torch.where(s > hi, -(s - hi) / self.beta_up - log_norm, log_up)
        log_down = torch.where(s < lo, -(lo - s) / self.beta_down - log_norm, log_down)
        two = torch.clamp(math.log(2.0) + torch.minimum(log_up, log_down), max=0.0)
        return torch.where(self.two_sided, two, log_up)

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        return {f"{prefix}sorted": self.sorted, f"{prefix}two_sided": self.two_sided.to(torch.uint8)}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], prefix: str = "") -> ReferenceTails:
        try:
            return cls(state[f"{prefix}sorted"], state[f"{prefix}two_sided"].bool())
        except KeyError as exc:
            raise ValueError(f"reference state is missing {exc}") from exc


def combine(log_p: torch.Tensor, how: str, weights: torch.Tensor | None = None) -> torch.Tensor:
    """One statistic per sample from log p-values [B, K]; higher = more anomalous.

    ``weights`` [K] (Fisher only): −2 Σ_j w_j log p_j, the weighted product of Good (1955).
    """
    if how == "fisher":
        return -2.0 * (log_p if weights is None else log_p * weights).sum(dim=1)
    if how == "min":
        return -log_p.amin(dim=1)
    raise ValueError(f"combine must be one of {COMBINERS}, got {how!r}")


def _positive(beta: torch.Tensor) -> torch.Tensor:
    """Tail scales, with a zero scale (a constant tail) replaced by 1 (no information there)."""
    return torch.where(beta > 0, beta, torch.ones_like(beta))
