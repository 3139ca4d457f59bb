"""Detector presets: the configurations a deployment chooses from.

- ``paper``: the paper's configuration exactly (Schwinn et al. 2021): the full CSM over
  all classes, the ten CSM features, LODA with 100 projections × 100 bins. For
  reproduction.
- ``gga``: GGA as selected on validation data before the composite existed: the top-5
  partial CSM, the ten features plus the max softmax, LODA 100 × 100.
- ``composite`` (the default): GGA CSM features (top-5) + logit signals + per-layer
  Mahalanobis distances, combined by a truncated Fisher product over reference
  p-values and calibrated conformally (:mod:`detectors.composite`, whose defaults are
  the configuration chosen on validation data, ``benchmarks/select_composite.py``),
  plus, where the model card names one, a robust second opinion whose disagreement with
  the served label is thresholded on its own (:mod:`detectors.second_opinion`).
- ``fast``: the composite without GGA (no gradient passes: about a fifth of the
  composite's compute on the bundled model), same API and calibration; what it gives up
  is measured in ``benchmarks/results/`` (README, "What the trust protects against").

For a TorchScript model (its layers cannot be observed) the composite leaves out the
layer distances. ``top_n`` None means the preset's own choice (all classes for ``paper``, 5 otherwise,
never more than the model's classes).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from detectors.base import Detector
from detectors.composite import CompositeDetector
from detectors.gga import GGADetector
from detectors.signals import supports_hooks

PRESETS = ("paper", "gga", "composite", "fast")
DEFAULT_PRESET = "composite"


def build_detector(preset: str, model: nn.Module, *, num_classes: int, top_n: int | None = None,
                   alpha: float = 0.05, layers: Sequence[str] | None = None, seed: int = 0,
                   strategy: str = "auto", second_opinion: str | None = None):
    """An unfitted detector of ``preset`` for ``model`` (``num_classes`` outputs). ``second_opinion``
    (``composite`` and ``fast``; the others ignore it; e.g. the model card's ``second_opinion``): a robust classifier of
    :data:`detectors.second_opinion.SECOND_OPINIONS` whose disagreement with the served label is
    thresholded on its own (see :mod:`detectors.second_opinion`)."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    if num_classes < 3:
        raise ValueError(f"GGA needs at least 3 classes, the model has {num_classes}")
    if top_n is not None and not 3 <= top_n <= num_classes:
        raise ValueError(f"top_n must be between 3 and the model's {num_classes} classes, got {top_n}")
    partial = top_n if top_n is not None else min(5, num_classes)
    if preset == "paper":
        det = GGADetector(model, top_n=top_n, alpha=alpha, n_bins=100, seed=seed, strategy=strategy)
    elif preset == "gga":
        det = GGADetector(model, top_n=partial, alpha=alpha, n_bins=100, seed=seed, include_softmax=True,
                          strategy=strategy)
    else:
        # a TorchScript model hides its layers (no forward hooks): the composite then runs on GGA and the logits
        use_layers = supports_hooks(model)
        det = CompositeDetector(model, top_n=partial, alpha=alpha, use_gga=preset == "composite",
                                use_layers=use_layers, layers=list(layers) if layers and use_layers else None,
                                seed=seed, strategy=strategy, second_opinion=second_opinion)
    det.preset = preset
    return det


def describe(detector: Detector) -> dict:
    """What /info shows: the detector's kind, preset (None when built without one) and the components
    it combines (:class:`detectors.base.Detector`)."""
    return {"kind": detector.kind, "preset": detector.preset, "components": list(detector.components)}
