"""A robust second opinion: a small adversarially trained classifier served beside the user's model.

The composite's ``disagreement`` component is the second opinion's float64 logit margin *for the
served label*, negated: −(r_ŷ − logsumexp_{j≠ŷ} r_j) with r the second opinion's logits and ŷ
the served model's prediction (higher = the robust model disagrees more). On clean inputs the
two models agree almost always; an adversarial example that fools the served model must also
move the robust model to the same wrong class inside the ball to go unflagged, which is as
hard as attacking the robust model itself (its robust accuracy bounds the robust detection
from below). The served model and its predictions are never changed.

A second opinion is named by an architecture of :data:`SECOND_OPINIONS`; its weights come from
the package (``detectors/zoo/weights/...``) or are given, and a fitted detector saves them in
its own state, so that a saved detector keeps judging with the weights it was calibrated with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from detectors.zoo.robust_mnist_cnn import RobustMnistCNN

STATE_PREFIX = "second_opinion.model."
WEIGHTS_DIR = Path(__file__).resolve().parent / "zoo" / "weights"


@dataclass(frozen=True)
class SecondOpinionSpec:
    """An architecture (``build() -> nn.Module``), its input shape and the packaged weights."""

    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    weights: Path
    description: str


SECOND_OPINIONS: dict[str, SecondOpinionSpec] = {
    "robust_mnist_cnn": SecondOpinionSpec(
        RobustMnistCNN, RobustMnistCNN.input_shape, WEIGHTS_DIR / "robust_mnist" / "model.safetensors",
        "strided MNIST CNN, 10-step PGD adversarial training at L-inf 0.3 (detectors/zoo/robust_train.py)"),
}


def check_name(name: str | None) -> str | None:
    if name is not None and name not in SECOND_OPINIONS:
        raise ValueError(f"second_opinion must be None or one of {sorted(SECOND_OPINIONS)}, got {name!r}")
    return name


def build_second_opinion(name: str, weights: str | Path | dict[str, torch.Tensor] | None = None) -> nn.Module:
    """The second opinion ``name`` in eval mode with ``weights`` (a safetensors file or a state dict;
    default: the packaged weights). Its parameters never require gradients."""
    spec = SECOND_OPINIONS[check_name(name)]
    model = spec.build()
    if weights is None:
        weights = spec.weights
    state = weights if isinstance(weights, dict) else load_file(str(weights))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"the weights do not fit the {name} second opinion: {exc}") from exc
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def check_input_shape(name: str, sample: torch.Tensor) -> None:
    """Refuse a served model whose inputs the second opinion cannot read."""
    shape = tuple(SECOND_OPINIONS[name].input_shape)
    if tuple(sample.shape[1:]) != shape:
        raise ValueError(f"the {name} second opinion reads inputs of shape {shape}, the served model's "
                         f"are {tuple(sample.shape[1:])}")


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {STATE_PREFIX + k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def weights_in(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The second opinion's weights in a detector state (empty when it has none)."""
    return {k[len(STATE_PREFIX):]: v for k, v in state.items() if k.startswith(STATE_PREFIX)}
