"""ODIN: temperature scaling and input pre-processing (Liang et al., ICLR 2018)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from detectors.base import BaselineDetector, as_inputs, check_alpha, check_epsilon, check_temperature, logits_of
from detectors.msp import msp_score

__all__ = ["ODIN", "ODINConfig"]


@dataclass(frozen=True)
class ODINConfig:
    temperature: float = 1000.0
    epsilon: float = 0.0014
    clip: tuple[float, float] | None = None
    alpha: float = 0.05

    def __post_init__(self) -> None:
        object.__setattr__(self, "temperature", check_temperature(self.temperature))
        object.__setattr__(self, "epsilon", check_epsilon(self.epsilon))
        clip = self.clip
        if clip is not None:
            if not isinstance(clip, tuple | list) or len(clip) != 2 or not float(clip[0]) < float(clip[1]):
                raise ValueError(
                    f"clip must be None or a pair (lo, hi) with lo < hi, e.g. (0.0, 1.0), got {clip!r}"
                )
            object.__setattr__(self, "clip", (float(clip[0]), float(clip[1])))
        check_alpha(self.alpha)


class ODIN(BaselineDetector):
    """ODIN: temperature scaling plus input pre-processing (Liang et al., ICLR 2018).

    With S(x; T) = softmax(F(x) / T) and ŷ = argmax_i F(x)_i:

        x̃ = x − ε · sign(−∇x log S_ŷ(x; T))          (a step that raises the top softmax)
        score(x) = −max_i S_i(x̃; T)                   (higher = more anomalous)

    ``clip=(lo, hi)`` clamps x̃ to the valid input range (e.g. (0, 1) for raw pixels).
    ε is in the units of the model's input: the official code divides the gradient by
    the per-channel std of its normalisation; a model that normalises inside forward()
    gets the step in raw pixel units here. ``epsilon=0`` is temperature scaling only.
    Nothing to fit; ``fit(x, y, calibration=x_cal)`` calibrates.
    """

    kind = "odin"

    def __init__(self, model: nn.Module, temperature: float = 1000.0, epsilon: float = 0.0014,
                 clip: tuple[float, float] | None = None, *, alpha: float = 0.05) -> None:
        self.config = ODINConfig(temperature, epsilon, clip, alpha)
        self._init_baseline(model)

    @property
    def temperature(self) -> float:
        return self.config.temperature

    @property
    def epsilon(self) -> float:
        return self.config.epsilon

    @property
    def clip(self) -> tuple[float, float] | None:
        return self.config.clip

    def perturb(self, x: torch.Tensor) -> torch.Tensor:
        """x̃ for one batch x [B, *input_shape] on the model's device (detached)."""
        x = as_inputs(x)
        if self.epsilon > 0:
            with torch.inference_mode(False), torch.enable_grad():
                x_req = x.detach().clone().requires_grad_(True)
                z = logits_of(self.model, x_req)
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
            return msp_score(logits_of(self.model, x_tilde), self.temperature)
