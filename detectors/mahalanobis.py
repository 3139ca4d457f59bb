"""Mahalanobis distance on one feature layer (Lee et al., NeurIPS 2018)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from detectors.base import BaselineDetector, as_inputs, check_alpha, check_epsilon, model_device
from detectors.fitting import BatchRunner, Progress, map_batches
from detectors.gaussian import TiedGaussian, mahalanobis_distances, mahalanobis_min_distance

__all__ = ["Mahalanobis", "MahalanobisConfig", "mahalanobis_distances", "mahalanobis_min_distance"]

FeatureFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class MahalanobisConfig:
    epsilon: float = 0.0
    alpha: float = 0.05

    def __post_init__(self) -> None:
        object.__setattr__(self, "epsilon", check_epsilon(self.epsilon))
        check_alpha(self.alpha)


class Mahalanobis(BaselineDetector):
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
    ``fit(x, y, calibration=x_cal)`` also calibrates (:class:`detectors.base.BaselineDetector`);
    the feature function is code, not state: loading a saved one needs it again,
    ``load_detector(directory, model, feature_fn=...)``.
    """

    kind = "mahalanobis"

    def __init__(self, model: nn.Module, feature_fn: FeatureFn, epsilon: float = 0.0, *,
                 alpha: float = 0.05) -> None:
        if not callable(feature_fn):
            raise ValueError(
                "feature_fn must be a callable feature_fn(model, x) -> [B, D], "
                f"e.g. lambda m, x: m.penultimate(x); got {feature_fn!r}"
            )
        self.config = MahalanobisConfig(epsilon, alpha)
        self._init_baseline(model)
        self.feature_fn = feature_fn
        self.classes: torch.Tensor | None = None  # [K] labels, int64
        self.means: torch.Tensor | None = None  # [K, D] float64
        self.precision: torch.Tensor | None = None  # [D, D] float64

    @classmethod
    def _from_config(cls, model: nn.Module, config: dict, *, feature_fn: FeatureFn | None = None,
                     **options) -> Mahalanobis:
        if feature_fn is None:
            raise ValueError("a saved Mahalanobis detector needs its feature function again: "
                             "load_detector(directory, model, feature_fn=lambda m, x: m.penultimate(x))")
        return cls(model, feature_fn, **config, **options)

    @property
    def epsilon(self) -> float:
        return self.config.epsilon

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        f = self.feature_fn(self.model, x)
        if not isinstance(f, torch.Tensor) or f.dim() != 2 or f.shape[0] != x.shape[0]:
            shape = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
            raise ValueError(
                f"feature_fn must return features [B, D] for a batch of {x.shape[0]}, got {shape}"
            )
        return f

    def _fit_state(self, x, y, batch_size: int, progress: Progress | None, run: BatchRunner | None,
                   total: int) -> None:
        """Class means and tied covariance of the features of x [n, *input_shape] with labels y [n]."""
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

        def features(xb: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return self._features(xb.to(device)).detach().to("cpu", torch.float64)

        feats = torch.cat(map_batches(features, x, batch_size, progress=progress, run=run, total=total))
        if not torch.isfinite(feats).all():
            raise ValueError("feature_fn returned NaN or inf on the fit data")
        g = TiedGaussian.fit(feats, y)
        self.classes, self.means, self.precision = g.classes, g.means, g.precision

    def _check_state(self) -> None:
        if self.means is None:
            raise RuntimeError("Mahalanobis is not fitted: call fit(x, y) on in-distribution data first")

    def perturb(self, x: torch.Tensor) -> torch.Tensor:
        """x̃ for one batch x [B, *input_shape] on the model's device (detached); x itself when epsilon = 0."""
        self._check_state()
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

    def _score_batch(self, x: torch.Tensor) -> torch.Tensor:
        """min_c squared Mahalanobis distance [B] (float64, CPU) of one batch, higher = more anomalous."""
        x = self.perturb(x)
        with torch.no_grad():
            f = self._features(x).detach().to("cpu", torch.float64)
        if f.shape[1] != self.means.shape[1]:
            raise ValueError(
                f"feature_fn returned {f.shape[1]} features, "
                f"Mahalanobis was fitted on {self.means.shape[1]}"
            )
        return mahalanobis_min_distance(f, self.means, self.precision)

    def anomaly_score(self, x, batch_size: int = 256) -> torch.Tensor:
        self._check_state()
        return super().anomaly_score(x, batch_size)

    def _state(self) -> dict[str, torch.Tensor]:
        """Class labels, means and precision (float64)."""
        self._check_state()
        return TiedGaussian(self.classes, self.means, self.precision).state_dict()

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        g = TiedGaussian.from_state_dict(state)
        self.classes, self.means, self.precision = g.classes, g.means, g.precision
