"""Energy score (Liu et al., NeurIPS 2020)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from detectors.base import BaselineDetector, check_alpha, check_temperature, logits_of

__all__ = ["Energy", "EnergyConfig", "energy_score"]


def energy_score(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """E(x) = −T · logsumexp(z / T) for logits [B, C]; float64 [B], higher = more anomalous."""
    return -temperature * torch.logsumexp(logits.double() / temperature, dim=1)


@dataclass(frozen=True)
class EnergyConfig:
    temperature: float = 1.0
    alpha: float = 0.05

    def __post_init__(self) -> None:
        object.__setattr__(self, "temperature", check_temperature(self.temperature))
        check_alpha(self.alpha)


class Energy(BaselineDetector):
    """Energy score (Liu et al., NeurIPS 2020).

    score(x) = E(x) = −T · logsumexp_i(F(x)_i / T); higher energy = more anomalous
    (the paper's detector thresholds the negative energy −E(x), its "higher = in-distribution").
    Nothing to fit; ``fit(x, y, calibration=x_cal)`` calibrates.
    """

    kind = "energy"

    def __init__(self, model: nn.Module, temperature: float = 1.0, *, alpha: float = 0.05) -> None:
        self.config = EnergyConfig(temperature, alpha)
        self._init_baseline(model)

    @property
    def temperature(self) -> float:
        return self.config.temperature

    def _score_batch(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return energy_score(logits_of(self.model, x), self.temperature)
