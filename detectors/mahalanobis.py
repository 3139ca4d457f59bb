"""Mahalanobis distance on one feature layer (Lee et al., NeurIPS 2018)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Self

import torch
from torch import nn

from detectors.base import as_inputs, batches, check_batch_size, check_epsilon, model_device
from detectors.gaussian import TiedGaussian, mahalanobis_distances, mahalanobis_min_distance

__all__ = ["Mahalanobis", "mahalanobis_distances", "mahalanobis_min_distance"]

FeatureFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


class Mahalanobis:
    """Class-conditional Gaussian with a tied covariance on penultimate features (Lee et al., NeurIPS 2018).

    ``feature_fn(model, x) -> [B, D]`` extracts the features, e.g.
    ``lambda m, x: m.penultimate(x)``. It must be given explicitly: the feature layer is
    never guessed from the model's structure.

    fit(x, y): with f_i = feature_fn(model, x_i) (float64) and the classes K present in y,

        μ_c = mean_{i: y_i = c} f_i,     Σ = (1/n) Σ_i (f_i − μ_{y_i})(f_i − μ_{y_i})ᵀ,
        P = Σ⁺ (Moore–Penrose pseudo-inverse, so rank-deficient features such as dead
        ReLU units are fine: directions without variance are ignored)

    score(x) = min_c (f(x) − μ_c)ᵀ P (f(x) − μ_c), the squared Mahalanobis distance to
    the closest class mean; higher = more anomalous.

    ``epsilon > 0`` adds Lee et al.'s input pre-processing: with ĉ the closest class,
    x̃ = x − ε · sign(∇x (f(x) − μ_ĉ)ᵀ P (f(x) − μ_ĉ)) (a step that decreases the
    distance), and the score is taken at x̃. ``epsilon=0`` (default) means none.
    This is the single-layer variant (no feature ensemble or logistic regression).
    """

    def __init__(self, model: nn.Module, feature_fn: FeatureFn, epsilon: float = 0.0) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(feature_fn):
            raise ValueError(
                "feature_fn must be a callable feature_fn(model, x) -> [B, D], "
                f"e.g. lambda m, x: m.penultimate(x); got {feature_fn!r}"
            )
        self.model = model
        self.feature_fn = feature_fn
        self.epsilon = check_epsilon(epsilon)
        self.classes: torch.Tensor | None = None  # [K] labels, int64
        self.means: torch.Tensor | None = None  # [K, D] float64
        self.precision: torch.Tensor | None = None  # [D, D] float64

    @property
    def fitted(self) -> bool:
        return self.means is not None

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        f = self.feature_fn(self.model, x)
        if not isinstance(f, torch.Tensor) or f.dim() != 2 or f.shape[0] != x.shape[0]:
            shape = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
            raise ValueError(
                f"feature_fn must return features [B, D] for a batch of {x.shape[0]}, got {shape}"
            )
        return f

    def fit(self, x, y=None, batch_size: int = 256) -> Self:
        """Class means and tied covariance of the features of x [n, *input_shape] with labels y [n]."""
        check_batch_size(batch_size)
        if y is None:
            raise ValueError(
                "Mahalanobis.fit needs the class labels: call fit(x, y) with y [n] integer labels"
            )
        x = as_inputs(x)
        y = torch.as_tensor(y)
        if y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(
                f"y must be labels [n] for the {x.shape[0]} samples of x, got shape {tuple(y.shape)}"
            )
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}")
        if x.shape[0] < 2:
            raise ValueError(f"Mahalanobis needs at least 2 samples to fit, got {x.shape[0]}")
        device = model_device(self.model)
        with torch.no_grad():
            feats = torch.cat(
                [
                    self._features(xb).detach().to("cpu", torch.float64)
                    for xb in batches(x, batch_size, device)
                ]
            )
        if not torch.isfinite(feats).all():
            raise ValueError("feature_fn returned NaN or inf on the fit data")
        g = TiedGaussian.fit(feats, y)
        self.classes, self.means, self.precision = g.classes, g.means, g.precision
        return self

    def _check_fitted(self) -> None:
        if not self.fitted:
            raise RuntimeError("Mahalanobis is not fitted: call fit(x, y) on in-distribution data first")

    def perturb(self, x: torch.Tensor) -> torch.Tensor:
        """x̃ for one batch x [B, *input_shape] on the model's device (detached); x itself when epsilon = 0."""
        self._check_fitted()
        x = as_inputs(x)
        if self.epsilon == 0:
            return x.detach()
        with torch.inference_mode(False), torch.enable_grad():
            x_req = x.detach().clone().requires_grad_(True)
            f = self._features(x_req)
            means = self.means.to(device=f.device, dtype=f.dtype)
            precision = self.precision.to(device=f.device, dtype=f.dtype)
            d = mahalanobis_distances(f, means, precision)  # [B, K]
            closest = d.detach().argmin(dim=1)
            objective = d.gather(1, closest[:, None]).sum()  # samples are independent
            (grad,) = torch.autograd.grad(objective, inputs=x_req)
        return (x.detach() - self.epsilon * torch.sign(grad)).detach()

    def score(self, x, batch_size: int = 256) -> torch.Tensor:
        """min_c squared Mahalanobis distance [B] (float64, CPU), higher = more anomalous."""
        self._check_fitted()
        check_batch_size(batch_size)
        x = as_inputs(x)
        device = model_device(self.model)
        out = []
        for xb in batches(x, batch_size, device):
            xb = self.perturb(xb)
            with torch.no_grad():
                f = self._features(xb).detach().to("cpu", torch.float64)
            if f.shape[1] != self.means.shape[1]:
                raise ValueError(
                    f"feature_fn returned {f.shape[1]} features, "
                    f"Mahalanobis was fitted on {self.means.shape[1]}"
                )
            out.append(mahalanobis_min_distance(f, self.means, self.precision))
        return torch.cat(out) if out else torch.empty(0, dtype=torch.float64)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Class labels, means and precision (float64)."""
        self._check_fitted()
        return TiedGaussian(self.classes, self.means, self.precision).state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> Self:
        g = TiedGaussian.from_state_dict(state)
        self.classes, self.means, self.precision = g.classes, g.means, g.precision
        return self
