"""Maximum softmax probability (Hendrycks & Gimpel, ICLR 2017)."""

from __future__ import annotations

import torch

from detectors.base import LogitDetector, logits_of

__all__ = ["MSP", "msp_score"]


def msp_score(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """−max_i softmax(z / T)_i for logits [B, C]; float64 [B], in [−1, −1/C]."""
    return -torch.softmax(logits.double() / temperature, dim=1).amax(dim=1)


class MSP(LogitDetector):
    """Maximum softmax probability (Hendrycks & Gimpel, ICLR 2017).

    score(x) = −max_i softmax(F(x))_i ∈ [−1, −1/C]; higher = more anomalous.
    """

    def _score_batch(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return msp_score(logits_of(self.model, x))
