"""Energy score (Liu et al., NeurIPS 2020)."""

from __future__ import annotations

import torch
from torch import nn

from detectors.base import LogitDetector, check_temperature, logits_of

__all__ = ["Energy", "energy_score"]


def energy_score(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """E(x) = −T · logsumexp(z / T) for logits [B, C]; float64 [B], higher = more anomalous."""
    return -temperature * torch.logsumexp(logits.double() / temperature, dim=1)


class Energy(LogitDetector):
    """Energy score (Liu et al., NeurIPS 2020).

    score(x) = E(x) = −T · logsumexp_i(F(x)_i / T); higher energy = more anomalous
    (the paper's detector thresholds the negative energy −E(x), its "higher = in-distribution").
    """

    def __init__(self, model: nn.Module, temperature: float = 1.0) -> None:
        super().__init__(model)
        self.temperature = check_temperature(temperature)

    def _score_batch(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return energy_score(logits_of(self.model, x), self.temperature)
