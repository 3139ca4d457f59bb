"""Signals that come free with the forward pass GGA runs anyway: logit statistics and
per-layer feature statistics.

Logit signals, from logits z [B, C] with predicted class k = argmax z:

- ``logit_margin``: log(p_k / (1 − p_k)) = z_k − logsumexp_{j≠k} z_j, in float64. A
  monotone map of the max softmax probability that stays finite (and keeps ranking
  samples) where p_k rounds to 1. Two-sided as an anomaly signal: an adversarial
  example pushed deep into a class is *more* confident than clean inputs.
- ``energy_score`` (−logsumexp z, Liu et al. 2020) and ``msp_score`` (−max softmax)
  live in :mod:`detectors.msp` and :mod:`detectors.energy`.

Layer signals: :class:`LayerTap` records, during any forward pass, the channel means
of the outputs of named submodules: an output [B, C, *spatial] becomes [B, C] (the mean
over every axis after the channel axis), an output [B, D] is kept as it is. Works for
any input rank (images, series, vectors). Which layers: the model card's
``feature_layers``; without one, :func:`default_layers` takes the outputs of the
model's top-level children, except the one that returns the logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def logit_margin(logits: torch.Tensor) -> torch.Tensor:
    """z_k − logsumexp_{j≠k} z_j = log(p_max / (1 − p_max)) for logits [B, C]; float64 [B]."""
    z = torch.as_tensor(logits).double()
    if z.dim() != 2 or z.shape[1] < 2:
        raise ValueError(f"logits must be [B, C] with C >= 2, got {tuple(z.shape)}")
    return class_margin(z, z.argmax(dim=1))


def class_margin(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """z_t − logsumexp_{j≠t} z_j for logits [B, C] and classes t [B]; float64 [B] (the logit margin
    when t is the predicted class). Differentiable in the logits."""
    z = torch.as_tensor(logits).double()
    t = torch.as_tensor(target).long().to(z.device)[:, None]
    return z.gather(1, t)[:, 0] - torch.logsumexp(z.scatter(1, t, -torch.inf), dim=1)


def supports_hooks(model: nn.Module) -> bool:
    """False for TorchScript modules, whose layers cannot be observed during a forward pass."""
    return not isinstance(model, torch.jit.ScriptModule)


def default_layers(model: nn.Module, example: torch.Tensor) -> list[str]:
    """The model's top-level children whose outputs are features, found by one probe pass.

    Runs ``model(example)`` (a batch of one or more inputs, no gradients) with a hook on
    every top-level child and keeps, in declaration order, the children that were called
    and returned a tensor [B, ...] other than the logits themselves (the child that
    produces the model's output is the classifier head, not a feature layer).
    """
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name, child in model.named_children():
        def record(_m, _i, out, name=name):
            if isinstance(out, torch.Tensor) and out.dim() >= 2:
                seen[name] = out
        handles.append(child.register_forward_hook(record))
    try:
        with torch.no_grad():
            z = model(example)
    finally:
        for h in handles:
            h.remove()
    names = [n for n, _ in model.named_children()
             if n in seen and not (seen[n].data_ptr() == z.data_ptr() and seen[n].shape == z.shape)]
    if not names:
        raise ValueError("found no feature layer among the model's top-level children: declare 'feature_layers' "
                         "(names from model.named_modules()) in the model card")
    return names


def channel_means(out: torch.Tensor) -> torch.Tensor:
    """[B, C, *spatial] -> [B, C] (mean over the trailing axes); [B, D] as is; float64."""
    if out.dim() < 2:
        raise ValueError(f"a feature layer must output [B, ...] with at least 2 axes, got {tuple(out.shape)}")
    out = out.detach()
    if out.dim() > 2:
        out = out.flatten(2).mean(dim=2)
    return out.double()


class LayerTap:
    """Records the channel means of named submodules' outputs during a forward pass.

    ::

        with LayerTap(model, ["layer1", "layer2"]) as tap:
            logits = model(x)
        feats = tap.features(len(x))   # {"layer1": [B, 16], "layer2": [B, 32]}

    A module called more than once in a forward keeps its last call. ``features(b)``
    keeps the first b rows (a strategy that replicates the batch runs the model on
    N·b rows; the first b are the originals). Hooks are removed on exit.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str]) -> None:
        modules = dict(model.named_modules())
        missing = [name for name in layers if name not in modules]
        if missing:
            known = [n for n in modules if n][:20]
            raise ValueError(f"feature layers {missing} are not submodules of the model; names look like {known}")
        if not layers:
            raise ValueError("LayerTap needs at least one layer name")
        if not supports_hooks(model):
            raise ValueError("a TorchScript model cannot report its layers (no forward hooks on ScriptModules): "
                             "serve it as 'factory:<module>:<function>' with safetensors weights to use layer "
                             "signals, or fit without them")
        self.layers = list(layers)
        self._modules = [modules[name] for name in self.layers]
        self._out: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def _hook(self, name: str):
        def record(_module, _inputs, output):
            if isinstance(output, tuple | list):
                output = output[0]
            if not isinstance(output, torch.Tensor):
                raise ValueError(f"feature layer {name!r} returned {type(output).__name__}, not a tensor")
            self._out[name] = channel_means(output)
        return record

    def __enter__(self) -> LayerTap:
        self._out.clear()
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in zip(self.layers, self._modules,
                                                                                  strict=True)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def features(self, batch: int) -> dict[str, torch.Tensor]:
        missing = [n for n in self.layers if n not in self._out]
        if missing:
            raise ValueError(f"feature layers {missing} were not called by the model's forward pass")
        return {n: self._out[n][:batch].cpu() for n in self.layers}
