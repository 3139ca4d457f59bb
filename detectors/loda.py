"""LODA, the lightweight on-line detector of anomalies (Pevný, Mach. Learn. 2016).

k sparse random projections w_j ∈ R^d, each with ceil(sqrt(d)) non-zero N(0, 1)
weights at random positions. Each projection z_j = w_jᵀ x gets an equal-width
histogram with ``n_bins`` bins over the fitted range [min_j, max_j]; its density in a
bin is count / (n · width). The score of x is

    score(x) = (1/k) Σ_j −log p_j(w_jᵀ x)            (higher = more anomalous)

A value outside the fitted range, or in an empty bin, gets the floor density
``floor_count / (n · width)``, a fraction of one sample's mass (PyOD gives
out-of-range values the edge bin's density instead). Bin lookup is exact: bin b holds
min + b·width <= z < min + (b+1)·width, the last bin also holds z = max (PyOD's lookup
is shifted by one bin). All state is float64 so scores do not depend on the device.
"""

from __future__ import annotations

import math
from typing import Self

import torch

_STATE_KEYS = ("projections", "mins", "maxs", "widths", "log_density", "floor_log_density")


class LODA:
    def __init__(self, n_projections: int = 100, n_bins: int = 100, seed: int = 0, floor_count: float = 0.01):
        if not isinstance(n_projections, int) or n_projections < 1:
            raise ValueError(f"n_projections must be a positive integer, got {n_projections!r}")
        if not isinstance(n_bins, int) or n_bins < 1:
            raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
        if not floor_count > 0:
            raise ValueError(f"floor_count must be > 0 (a fraction of one sample), got {floor_count!r}")
        self.n_projections = n_projections
        self.n_bins = n_bins
        self.seed = seed
        self.floor_count = float(floor_count)
        self.projections: torch.Tensor | None = None

    @property
    def fitted(self) -> bool:
        return self.projections is not None

    def _make_projections(self, d: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        nnz = math.ceil(math.sqrt(d))
        w = torch.zeros(self.n_projections, d, dtype=torch.float64)
        for j in range(self.n_projections):
            idx = torch.randperm(d, generator=gen)[:nnz]
            w[j, idx] = torch.randn(nnz, generator=gen, dtype=torch.float64)
        return w

    def fit(self, X: torch.Tensor) -> Self:
        """Fit on X [n, d] (n >= 2); returns self."""
        X = _as_matrix(X, "X")
        n, d = X.shape
        if n < 2:
            raise ValueError(f"LODA needs at least 2 samples to fit, got {n}")
        w = self._make_projections(d).to(X.device)
        z = self._project(X, w)  # [n, k]
        mins, maxs = z.amin(dim=0), z.amax(dim=0)
        widths = (maxs - mins) / self.n_bins
        widths = torch.where(widths > 0, widths, torch.full_like(widths, 1.0 / self.n_bins))
        idx = self._bin_index(z, mins, widths)
        counts = torch.zeros(self.n_projections, self.n_bins, dtype=torch.float64, device=X.device)
        counts.scatter_add_(1, idx.T, torch.ones_like(idx.T, dtype=torch.float64))
        norm = n * widths[:, None]
        self.projections = w
        self.mins, self.maxs, self.widths = mins, maxs, widths
        self.log_density = torch.where(counts > 0, torch.log(counts / norm), -math.inf)
        self.floor_log_density = torch.log(self.floor_count / (n * widths))
        return self

    @staticmethod
    def _project(X: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """X [n, d] @ w.T as an explicit product-and-sum: each value is summed in the same
        order whatever the batch size (a GEMM may pick another kernel for another n), so a
        sample's bins, and hence its score, do not depend on its batch neighbours."""
        return (X[:, None, :] * w[None, :, :]).sum(dim=2)

    def _bin_index(self, z: torch.Tensor, mins: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
        return torch.floor((z - mins) / widths).clamp_(0, self.n_bins - 1).long()

    def log_density_per_projection(self, X: torch.Tensor) -> torch.Tensor:
        """log p_j(w_jᵀ x) for every sample and projection: [B, k]."""
        self._check_fitted()
        X = _as_matrix(X, "X").to(self.projections.device)
        if X.shape[1] != self.projections.shape[1]:
            raise ValueError(f"X has {X.shape[1]} features, LODA was fitted on {self.projections.shape[1]}")
        z = self._project(X, self.projections)
        idx = self._bin_index(z, self.mins, self.widths)
        in_range = (z >= self.mins) & (z <= self.maxs)
        logp = torch.gather(self.log_density, 1, idx.T).T
        logp = torch.where(in_range, logp, -math.inf)
        return torch.maximum(logp, self.floor_log_density.expand_as(logp))

    def score(self, X: torch.Tensor) -> torch.Tensor:
        """Anomaly score [B] (float64), higher = more anomalous."""
        return -self.log_density_per_projection(X).mean(dim=1)

    def _check_fitted(self) -> None:
        if self.projections is None:
            raise RuntimeError("LODA is not fitted: call fit(X) first")

    def to(self, device: torch.device | str) -> Self:
        self._check_fitted()
        for key in _STATE_KEYS:
            setattr(self, key, getattr(self, key).to(device))
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        self._check_fitted()
        return {key: getattr(self, key).detach().cpu().contiguous() for key in _STATE_KEYS}

    def config(self) -> dict:
        return {"n_projections": self.n_projections, "n_bins": self.n_bins, "seed": self.seed,
                "floor_count": self.floor_count}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> Self:
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"LODA state is missing {missing}")
        k, bins = state["log_density"].shape
        if (k, bins) != (self.n_projections, self.n_bins) or state["projections"].shape[0] != k:
            raise ValueError(
                f"LODA state has {k} projections x {bins} bins, this LODA is configured for "
                f"{self.n_projections} x {self.n_bins}"
            )
        for key in _STATE_KEYS:
            setattr(self, key, state[key].to(torch.float64))
        return self


def _as_matrix(X, name: str) -> torch.Tensor:
    X = torch.as_tensor(X)
    if X.dim() != 2:
        raise ValueError(f"{name} must be a matrix [n, d], got shape {tuple(X.shape)}")
    if not torch.isfinite(X).all():
        raise ValueError(f"{name} contains NaN or inf")
    return X.to(torch.float64)
