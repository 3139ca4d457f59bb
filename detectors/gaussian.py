"""Class-conditional Gaussians with one tied covariance (Lee et al., NeurIPS 2018).

Pure state and math shared by the single-layer Mahalanobis baseline and the per-layer
distances of the composite detector. With features f_i [n, D] (float64) and labels y_i,

    μ_c = mean_{i: y_i = c} f_i,    Σ = (1/n) Σ_i (f_i − μ_{y_i})(f_i − μ_{y_i})ᵀ,
    P = Σ⁺ (Moore–Penrose pseudo-inverse: directions without variance are ignored)

Directions whose variance is below ``RTOL`` (1e-9) times the largest are treated as without
variance: the features are float32 activations, whose rounding (which differs between CPUs,
kernels and batch splits, about 1e-7 of a value) puts variances of about 1e-14 of the largest
into the null space of a rank-deficient layer (e.g. a linear layer wider than its input). Kept,
their huge precision turned that rounding noise into distances that differed by whole units
between a batch and its rows.

and the score of f is min_c (f − μ_c)ᵀ P (f − μ_c), higher = more anomalous.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

RTOL = 1e-9  # relative cut-off of the pseudo-inverse (see the module docstring)

def mahalanobis_distances(features: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """d_c(f) = (f − μ_c)ᵀ P (f − μ_c) for features [B, D], means [K, D], precision [D, D] -> [B, K]."""
    diff = features[:, None, :] - means[None, :, :]  # [B, K, D]
    return torch.einsum("bkd,de,bke->bk", diff, precision, diff)


def mahalanobis_min_distance(features: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """min_c (f − μ_c)ᵀ P (f − μ_c): [B]; the Mahalanobis score (higher = more anomalous)."""
    return mahalanobis_distances(features, means, precision).amin(dim=1)


@dataclass
class TiedGaussian:
    """Fitted state: ``classes`` [K] int64, ``means`` [K, D] and ``precision`` [D, D] float64."""

    classes: torch.Tensor
    means: torch.Tensor
    precision: torch.Tensor

    @classmethod
    def fit(cls, features: torch.Tensor, labels: torch.Tensor) -> TiedGaussian:
        f = torch.as_tensor(features).to("cpu", torch.float64)
        y = torch.as_tensor(labels).to("cpu", torch.int64)
        if f.dim() != 2 or y.dim() != 1 or len(f) != len(y):
            raise ValueError(f"need features [n, D] and labels [n], got {tuple(f.shape)} and {tuple(y.shape)}")
        if len(f) < 2:
            raise ValueError(f"a tied Gaussian needs at least 2 samples, got {len(f)}")
        if not torch.isfinite(f).all():
            raise ValueError("features contain NaN or inf")
        classes, inverse = torch.unique(y, return_inverse=True)
        counts = torch.bincount(inverse, minlength=classes.numel()).to(torch.float64)
        sums = torch.zeros(classes.numel(), f.shape[1], dtype=torch.float64).index_add_(0, inverse, f)
        means = sums / counts[:, None]
        centered = f - means[inverse]
        cov = centered.T @ centered / len(f)
        return cls(classes, means, torch.linalg.pinv(cov, hermitian=True, rtol=RTOL))

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def score(self, features: torch.Tensor) -> torch.Tensor:
        f = torch.as_tensor(features).to("cpu", torch.float64)
        if f.dim() != 2 or f.shape[1] != self.dim:
            raise ValueError(f"features must be [B, {self.dim}], got {tuple(f.shape)}")
        return mahalanobis_min_distance(f, self.means, self.precision)

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        return {f"{prefix}classes": self.classes.contiguous(), f"{prefix}means": self.means.contiguous(),
                f"{prefix}precision": self.precision.contiguous()}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], prefix: str = "") -> TiedGaussian:
        try:
            g = cls(state[f"{prefix}classes"].long(), state[f"{prefix}means"].double(),
                    state[f"{prefix}precision"].double())
        except KeyError as exc:
            raise ValueError(f"tied Gaussian state is missing {exc}") from exc
        k, d = g.means.shape
        if g.classes.shape != (k,) or g.precision.shape != (d, d):
            raise ValueError(f"tied Gaussian state has inconsistent shapes: classes {tuple(g.classes.shape)}, "
                             f"means {(k, d)}, precision {tuple(g.precision.shape)}")
        if not (torch.isfinite(g.means).all() and torch.isfinite(g.precision).all()):
            raise ValueError("tied Gaussian state contains NaN or inf")
        return g
