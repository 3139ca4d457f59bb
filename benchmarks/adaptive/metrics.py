"""Robust detection and the per-input bookkeeping of the adaptive evaluation.

For n attacked inputs with labels y: ``correct`` [n] (clean prediction = y) and, per attack,
``broken`` [n] (the attack found a point inside the ball that is misclassified and not
flagged). Only correctly classified inputs can be broken (a wrong clean prediction is the
classifier's error, not the attack's):

    robust detection = 1 − #{correct and broken} / #{correct}

The best-of-all attack breaks an input when any attack did (the union).
"""

from __future__ import annotations

import torch


def robust_detection(correct: torch.Tensor, broken: torch.Tensor) -> float:
    """1 − #(correct ∧ broken) / #correct; ValueError when no input is classified correctly."""
    correct, broken = torch.as_tensor(correct, dtype=torch.bool), torch.as_tensor(broken, dtype=torch.bool)
    if correct.shape != broken.shape or correct.dim() != 1:
        raise ValueError(f"correct and broken must be [n] of one length, got {tuple(correct.shape)} "
                         f"and {tuple(broken.shape)}")
    n = int(correct.sum())
    if n == 0:
        raise ValueError("no input is classified correctly: robust detection is undefined")
    return 1.0 - int((correct & broken).sum()) / n


def union(broken: dict[str, torch.Tensor]) -> torch.Tensor:
    """Inputs broken by at least one attack, [n] bool."""
    if not broken:
        raise ValueError("union needs at least one attack's outcome")
    out = None
    for b in broken.values():
        b = torch.as_tensor(b, dtype=torch.bool)
        out = b.clone() if out is None else out | b
    return out


def summary(correct: torch.Tensor, flagged_clean: torch.Tensor, broken: dict[str, torch.Tensor]) -> dict:
    """Per attack and for the best of all: broken count and robust detection; plus the clean flag rate."""
    correct = torch.as_tensor(correct, dtype=torch.bool)
    rows = {name: {"broken": int((correct & torch.as_tensor(b, dtype=torch.bool)).sum()),
                   "robust_detection": robust_detection(correct, b)} for name, b in broken.items()}
    if broken:
        best = union(broken)
        rows["best_of_all"] = {"broken": int((correct & best).sum()),
                               "robust_detection": robust_detection(correct, best)}
    return {"n": len(correct), "n_correct": int(correct.sum()),
            "clean_flag_rate": float(torch.as_tensor(flagged_clean, dtype=torch.bool).double().mean()),
            "attacks": rows}
