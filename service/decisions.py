"""The serving side of :mod:`detectors.decisions`: prediction sets and the accept gate in /predict and /info.

Each prediction gains ``prediction_set`` (class indices, ascending), ``prediction_set_names`` (the model
card's names of those classes) and ``accept`` (the gate's decision, False whenever ``flagged`` at the
served alpha; null when the detector has no gate, with the reason in /info's ``decisions.gate_error``).
A detector saved without decisions (fitted before they existed) gives null for all three.
"""

from __future__ import annotations

import torch

FIT_DECISION_FIELDS = {
    "set_alpha": {"type": "number", "description": "prediction sets contain the true label with probability "
                  ">= 1 - set_alpha on exchangeable inputs (default 0.1)"},
    "risk_target": {"type": "number", "description": "the accept gate's error rate among accepted predictions "
                    "(default 0.01); when given, a fit whose calibration data cannot support it fails"},
    "delta": {"type": "number", "description": "the gate's bound holds with probability >= 1 - delta over the "
              "calibration data (default 0.05); when given, as risk_target"},
}


def decisions_info(detector) -> dict | None:
    """/info's ``decisions``: set_alpha, set score, risk_target, delta, gate score and threshold; None
    without a detector or for one saved without decisions."""
    dec = getattr(detector, "decisions", None)
    return None if dec is None else dec.info()


def decision_columns(out, names: list[str], flagged: list[bool]) -> tuple[list, list, list]:
    """Per row: the set's class indices, their names, and accept (False where flagged; None without a gate).
    Without sets: three lists of None."""
    n = len(flagged)
    if out.prediction_set is None:
        return [None] * n, [None] * n, [None] * n
    mask = out.prediction_set
    rows, cols = torch.nonzero(mask, as_tuple=True)
    counts = mask.sum(dim=1).tolist()
    flat = cols.tolist()
    sets, start = [], 0
    for k in counts:
        sets.append(flat[start:start + k])
        start += k
    set_names = [[names[c] if c < len(names) else str(c) for c in s] for s in sets]
    if out.accept is None:
        return sets, set_names, [None] * n
    accept = [a and not f for a, f in zip(out.accept.tolist(), flagged, strict=True)]
    return sets, set_names, accept
