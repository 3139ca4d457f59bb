"""``explain``: which of the detector's signals speaks against a prediction.

Per sample, one ``{"name", "p_value"}`` per entry of ``detector.components``, in that order:

- a detector that combines several signals (the composite) reports each component's log
  p-value against its in-distribution reference in ``Scores.features`` [B, K]; the p-value
  is its exponential. A small one (below alpha) is a signal that raised the flag; the
  combination and the conformal calibration turn them into ``trust``, so no single
  component's p-value is the trust itself;
- a single-signal detector (GGA, the baselines) has one component, whose p-value is the
  conformal one, ``trust``.

Generic over the components: a detector with a new component reports one more entry.
"""

from __future__ import annotations

import math

from detectors.base import Scores


def component_p_values(detector, out: Scores) -> list[list[dict]] | None:
    """Per sample, the components' p-values (see the module docstring); None when the detector reports none."""
    names = [str(n) for n in detector.components]
    if len(names) == 1 and out.trust is not None:
        trust = out.trust.tolist()
        return [[{"name": names[0], "p_value": _finite(t)}] for t in trust]
    feats = out.features
    if feats is None or feats.dim() != 2 or feats.shape[1] != len(names):
        return None
    log_p = feats.double().clamp(max=0.0).tolist()
    return [[{"name": n, "p_value": _finite(math.exp(v))} for n, v in zip(names, row, strict=True)] for row in log_p]


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None
