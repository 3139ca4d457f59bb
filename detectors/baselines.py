"""OOD detection baselines to compare GGA against: MSP, ODIN, energy, Mahalanobis.

Each baseline is a thin class around a classifier ``model`` (x [B, *input_shape] ->
logits [B, C]) with ``fit(x, y=None, batch_size=256) -> Self`` and
``score(x, batch_size=256) -> Tensor [B]`` (float64, CPU), **higher = more anomalous**.
The math lives in pure functions on logits / features (``msp_score``, ``energy_score``,
``mahalanobis_min_distance``).

Common behaviour:

- ``x`` is processed in batches of ``batch_size`` on the model's device
  (``next(model.parameters()).device``, CPU for a model without parameters); the
  scores come back on the CPU.
- Input gradients (ODIN, Mahalanobis with ``epsilon > 0``) use
  ``torch.autograd.grad(..., inputs=x)``: no gradient reaches the model's parameters
  (their ``.grad`` is left untouched), no graph outlives a batch, and it works under
  ``torch.no_grad()`` / ``torch.inference_mode()``.
- The model's train/eval mode is never changed: put the model in eval mode yourself
  (batch-norm in train mode couples the samples of a batch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Self

import torch
from torch import nn

__all__ = [
    "MSP",
    "ODIN",
    "Energy",
    "Mahalanobis",
    "msp_score",
    "energy_score",
    "mahalanobis_distances",
    "mahalanobis_min_distance",
    "model_device",
]

FeatureFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------- pure functions


def msp_score(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """−max_i softmax(z / T)_i for logits [B, C]; float64 [B], in [−1, −1/C]."""
    return -torch.softmax(logits.double() / temperature, dim=1).amax(dim=1)


def energy_score(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """E(x) = −T · logsumexp(z / T) for logits [B, C]; float64 [B], higher = more anomalous."""
    return -temperature * torch.logsumexp(logits.double() / temperature, dim=1)


def mahalanobis_distances(
    features: torch.Tensor, means: torch.Tensor, precision: torch.Tensor
) -> torch.Tensor:
    """d_c(f) = (f − μ_c)ᵀ P (f − μ_c) for features [B, D], means [K, D], precision [D, D] -> [B, K]."""
    diff = features[:, None, :] - means[None, :, :]  # [B, K, D]
    return torch.einsum("bkd,de,bke->bk", diff, precision, diff)


def mahalanobis_min_distance(
    features: torch.Tensor, means: torch.Tensor, precision: torch.Tensor
) -> torch.Tensor:
    """min_c (f − μ_c)ᵀ P (f − μ_c): [B]; the Mahalanobis score (higher = more anomalous)."""
    return mahalanobis_distances(features, means, precision).amin(dim=1)


# ---------------------------------------------------------------- helpers


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter; CPU for a model without parameters."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def _as_inputs(x) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() < 1:
        raise ValueError(f"x must be a batch [B, *input_shape], got a scalar of shape {tuple(x.shape)}")
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    return x


def _batches(x: torch.Tensor, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    for start in range(0, x.shape[0], batch_size):
        yield x[start : start + batch_size].to(device)


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    z = model(x)
    if z.dim() != 2:
        raise ValueError(f"the model must return logits [B, C], got shape {tuple(z.shape)}")
    return z


def _check_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0 (e.g. 1.0 or 1000.0), got {temperature!r}")
    return float(temperature)


def _check_epsilon(epsilon: float) -> float:
    if isinstance(epsilon, bool) or not isinstance(epsilon, int | float) or not epsilon >= 0:
        raise ValueError(f"epsilon must be a number >= 0 (0 disables input pre-processing), got {epsilon!r}")
    return float(epsilon)


class _LogitBaseline:
    """Scores that are a function of the logits of (a possibly perturbed) x; fit is a no-op."""

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(
                f"model must be a torch.nn.Module returning logits [B, C], got {type(model).__name__}"
            )
        self.model = model

    def fit(self, x, y=None, batch_size: int = 256) -> Self:
        """Nothing to fit; returns self (kept for the common detector contract)."""
        return self

    def _score_batch(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score(self, x, batch_size: int = 256) -> torch.Tensor:
        """Anomaly score [B] (float64, CPU), higher = more anomalous."""
        _check_batch_size(batch_size)
        x = _as_inputs(x)
        device = model_device(self.model)
        out = [self._score_batch(xb).detach().cpu() for xb in _batches(x, batch_size, device)]
        return torch.cat(out) if out else torch.empty(0, dtype=torch.float64)


# ---------------------------------------------------------------- baselines


class MSP(_LogitBaseline):
    """Maximum softmax probability (Hendrycks & Gimpel, ICLR 2017).

    score(x) = −max_i softmax(F(x))_i ∈ [−1, −1/C]; higher = more anomalous.
    """

    def _score_batch(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return msp_score(_logits(self.model, x))


class Energy(_LogitBaseline):
    """Energy score (Liu et al., NeurIPS 2020).

    score(x) = E(x) = −T · logsumexp_i(F(x)_i / T); higher energy = more anomalous
    (the paper's detector thresholds the negative energy −E(x), its "higher = in-distribution").
    """

    def __init__(self, model: nn.Module, temperature: float = 1.0) -> None:
        super().__init__(model)
        self.temperature = _check_temperature(temperature)

    def _score_batch(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return energy_score(_logits(self.model, x), self.temperature)


class ODIN(_LogitBaseline):
    """ODIN: temperature scaling plus input pre-processing (Liang et al., ICLR 2018).

    With S(x; T) = softmax(F(x) / T) and ŷ = argmax_i F(x)_i:

        x̃ = x − ε · sign(−∇x log S_ŷ(x; T))          (a step that raises the top softmax)
        score(x) = −max_i S_i(x̃; T)                   (higher = more anomalous)

    ``clip=(lo, hi)`` clamps x̃ to the valid input range (e.g. (0, 1) for raw pixels).
    ε is in the units of the model's input: the official code divides the gradient by
    the per-channel std of its normalisation; a model that normalises inside forward()
    gets the step in raw pixel units here. ``epsilon=0`` is temperature scaling only.
    """

    def __init__(
        self,
        model: nn.Module,
        temperature: float = 1000.0,
        epsilon: float = 0.0014,
        clip: tuple[float, float] | None = None,
    ) -> None:
        super().__init__(model)
        self.temperature = _check_temperature(temperature)
        self.epsilon = _check_epsilon(epsilon)
        if clip is not None:
            if not isinstance(clip, tuple | list) or len(clip) != 2 or not float(clip[0]) < float(clip[1]):
                raise ValueError(
                    f"clip must be None or a pair (lo, hi) with lo < hi, e.g. (0.0, 1.0), got {clip!r}"
                )
            clip = (float(clip[0]), float(clip[1]))
        self.clip = clip

    def perturb(self, x: torch.Tensor) -> torch.Tensor:
        """x̃ for one batch x [B, *input_shape] on the model's device (detached)."""
        x = _as_inputs(x)
        if self.epsilon > 0:
            with torch.inference_mode(False), torch.enable_grad():
                x_req = x.detach().clone().requires_grad_(True)
                z = _logits(self.model, x_req)
                y_hat = z.detach().argmax(dim=1)
                log_s = torch.log_softmax(z / self.temperature, dim=1)
                objective = log_s.gather(1, y_hat[:, None]).sum()  # samples are independent
                (grad,) = torch.autograd.grad(objective, inputs=x_req)
            x = x.detach() - self.epsilon * torch.sign(-grad)
        if self.clip is not None:
            x = x.clamp(*self.clip)
        return x.detach()

    def _score_batch(self, x: torch.Tensor) -> torch.Tensor:
        x_tilde = self.perturb(x)
        with torch.no_grad():
            return msp_score(_logits(self.model, x_tilde), self.temperature)


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
        self.epsilon = _check_epsilon(epsilon)
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
        _check_batch_size(batch_size)
        if y is None:
            raise ValueError(
                "Mahalanobis.fit needs the class labels: call fit(x, y) with y [n] integer labels"
            )
        x = _as_inputs(x)
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
                    for xb in _batches(x, batch_size, device)
                ]
            )
        if not torch.isfinite(feats).all():
            raise ValueError("feature_fn returned NaN or inf on the fit data")
        y = y.to(torch.int64).cpu()
        classes, inverse = torch.unique(y, return_inverse=True)
        counts = torch.bincount(inverse, minlength=classes.numel()).to(torch.float64)
        sums = torch.zeros(classes.numel(), feats.shape[1], dtype=torch.float64)
        sums.index_add_(0, inverse, feats)
        means = sums / counts[:, None]
        centered = feats - means[inverse]
        cov = centered.T @ centered / feats.shape[0]
        self.classes = classes
        self.means = means
        self.precision = torch.linalg.pinv(cov, hermitian=True)
        return self

    def _check_fitted(self) -> None:
        if not self.fitted:
            raise RuntimeError("Mahalanobis is not fitted: call fit(x, y) on in-distribution data first")

    def perturb(self, x: torch.Tensor) -> torch.Tensor:
        """x̃ for one batch x [B, *input_shape] on the model's device (detached); x itself when epsilon = 0."""
        self._check_fitted()
        x = _as_inputs(x)
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
        _check_batch_size(batch_size)
        x = _as_inputs(x)
        device = model_device(self.model)
        out = []
        for xb in _batches(x, batch_size, device):
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
