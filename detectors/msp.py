"""Maximum softmax probability (Hendrycks & Gimpel, ICLR 2017)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from detectors.base import BaselineDetector, check_alpha, logits_of

__all__ = ["MSP", "MSPConfig", "msp_score"]


def msp_score(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """−max_i softmax(z / T)_i for logits [B, C]; float64 [B], in [−1, −1/C]."""
    return -torch.softmax(logits.double() / temperature, dim=1).amax(dim=1)


@dataclass(frozen=True)
class MSPConfig:
    alpha: float = 0.05

    def __post_init__(self) -> None:
        check_alpha(self.alpha)


class MSP(BaselineDetector):
    """Maximum softmax probability (Hendrycks & Gimpel, ICLR 2017).

    score(x) = −max_i softmax(F(x))_i ∈ [−1, −1/C]; higher = more anomalous. Nothing to
    fit; ``fit(x, y, calibration=x_cal)`` calibrates (:class:`detectors.base.BaselineDetector`).
    """

    kind = "msp"

    def __init__(self, model: nn.Module, *, alpha: float = 0.05) -> None:
        self.config = MSPConfig(alpha)
        self._init_baseline(model)

    def _score_batch(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return msp_score(logits_of(self.model, x))
