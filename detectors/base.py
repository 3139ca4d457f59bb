"""The detector contract shared by every method of the package, and its helpers.

Every detector (GGA, MSP, energy, ODIN, Mahalanobis, the composite) follows one small
protocol, :class:`Detector`:

- ``fit(x, y, ...) -> Self`` on labelled in-distribution data x [n, *input_shape];
- ``score(x)``: per-sample anomaly scores, **higher = more anomalous** (the plain
  baselines return a float64 tensor [B]; GGA and the composite return a result with the
  prediction, the raw ``score``, ``trust`` and ``flagged``);
- ``state_dict()`` / ``load_state_dict(state)``: the fitted state as tensors.

:class:`Calibrated` puts the same conformal calibration
(:class:`detectors.calibration.ConformalCalibration`) behind any of them: scores of
held-out in-distribution data become ``trust`` (a conformal p-value) and ``flagged``
(trust < alpha).

Common behaviour of the logit baselines: ``x`` is processed in batches of
``batch_size`` on the model's device and the scores come back on the CPU; input
gradients use ``torch.autograd.grad(..., inputs=x)`` (no gradient reaches the
parameters, and it works under ``torch.no_grad()`` / ``inference_mode``); the model's
train/eval mode is never changed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol, Self, runtime_checkable

import torch
from torch import nn

from detectors.calibration import ConformalCalibration

# How a fit runs one batch's model pass: ``run(fn)`` calls ``fn()`` (somewhere: on a serving
# worker thread between its batches, say) and returns its result.
BatchRunner = Callable[[Callable[[], Any]], Any]


@runtime_checkable
class Detector(Protocol):
    def fit(self, x, y, *args, **kwargs) -> Self: ...

    def score(self, x, *args, **kwargs): ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> Self: ...


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter; CPU for a model without parameters."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def as_inputs(x) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() < 1:
        raise ValueError(f"x must be a batch [B, *input_shape], got a scalar of shape {tuple(x.shape)}")
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    return x


def batches(x: torch.Tensor, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    for start in range(0, x.shape[0], batch_size):
        yield x[start : start + batch_size].to(device)


def logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    z = model(x)
    if z.dim() != 2:
        raise ValueError(f"the model must return logits [B, C], got shape {tuple(z.shape)}")
    return z


def check_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0 (e.g. 1.0 or 1000.0), got {temperature!r}")
    return float(temperature)


def check_epsilon(epsilon: float) -> float:
    if isinstance(epsilon, bool) or not isinstance(epsilon, int | float) or not epsilon >= 0:
        raise ValueError(f"epsilon must be a number >= 0 (0 disables input pre-processing), got {epsilon!r}")
    return float(epsilon)


class LogitDetector:
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
        check_batch_size(batch_size)
        x = as_inputs(x)
        device = model_device(self.model)
        out = [self._score_batch(xb).detach().cpu() for xb in batches(x, batch_size, device)]
        return torch.cat(out) if out else torch.empty(0, dtype=torch.float64)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Nothing fitted: an empty state (kept for the common detector contract)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> Self:
        return self



class Calibrated:
    """A detector with scores [B] plus the conformal calibration of :mod:`detectors.calibration`.

    ``Calibrated(MSP(model), alpha=0.05).fit(x, y, calibration=x_cal)``: fits the
    detector on (x, y), then keeps the scores of the held-out ``x_cal`` (at least
    1/alpha − 1 of them, else ValueError). ``trust(x)`` is the conformal p-value of each
    sample, ``flagged(x) = trust(x) < alpha``.
    """

    def __init__(self, detector: Detector, alpha: float = 0.05) -> None:
        self.detector = detector
        self.calibration = ConformalCalibration(alpha)

    @property
    def alpha(self) -> float:
        return self.calibration.alpha

    def fit(self, x, y=None, *, calibration, batch_size: int = 256) -> Self:
        self.detector.fit(x, y, batch_size=batch_size)
        self.calibration.fit(self.detector.score(calibration, batch_size=batch_size))
        return self

    def score(self, x, batch_size: int = 256) -> torch.Tensor:
        return self.detector.score(x, batch_size=batch_size)

    def trust(self, x, batch_size: int = 256) -> torch.Tensor:
        return self.calibration.trust(self.score(x, batch_size))

    def flagged(self, x, batch_size: int = 256) -> torch.Tensor:
        return self.trust(x, batch_size) < self.alpha

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**{f"detector.{k}": v for k, v in self.detector.state_dict().items()},
                **self.calibration.state_dict()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> Self:
        self.detector.load_state_dict({k[9:]: v for k, v in state.items() if k.startswith("detector.")})
        self.calibration.load_state_dict(state)
        return self
