"""Metrics of the reproduction: per-type detection metrics, the Table 1 / Table 2 rows,
misclassification detection (wrong vs right on clean data), validation summaries, timing.

Every score is "higher = more anomalous"; the positives of the detection metrics are the
correctly classified clean images ("clean").
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from benchmarks.repro.setup import ADAPTIVE, TABLE1, VAL_TYPES
from detectors.metrics import aupr_in, aupr_out, aurc, auroc, risk_at_coverage, tnr_at_tpr

# sets that are not anomalies of a type: the positives, and the clean images the model gets wrong
NOT_A_TYPE = ("clean", "misclassified")


def _metrics(s_in: np.ndarray, s_out: np.ndarray) -> dict | None:
    if len(s_out) == 0 or len(s_in) == 0:
        return None
    return {"auroc": auroc(s_in, s_out), "aupr_in": aupr_in(s_in, s_out), "aupr_out": aupr_out(s_in, s_out),
            "tnr_at_95_tpr": tnr_at_tpr(s_in, s_out, 0.95), "n": int(len(s_out))}


def misclassification(s_right: np.ndarray, s_wrong: np.ndarray | None) -> dict | None:
    """Telling wrong predictions from right ones on clean data: AUROC (right = negatives, wrong =
    positives), AURC and the risk at 95% coverage (accept the lowest scores first), with the
    values of a perfect ranking for reference. None without any misclassified image."""
    if s_wrong is None or len(s_wrong) == 0 or len(s_right) == 0:
        return None
    n_r, n_w = len(s_right), len(s_wrong)
    best_r, best_w = np.zeros(n_r), np.ones(n_w)
    return {"auroc": auroc(s_right, s_wrong), "aurc": aurc(s_right, s_wrong),
            "risk_at_95_coverage": risk_at_coverage(s_right, s_wrong, 0.95),
            "aurc_optimal": aurc(best_r, best_w), "risk_at_95_coverage_optimal": risk_at_coverage(best_r, best_w, 0.95),
            "error_rate": n_w / (n_r + n_w), "n_right": int(n_r), "n_wrong": int(n_w)}


def evaluate(scores: dict[str, np.ndarray], ood_sets: tuple[str, ...]) -> dict:
    """Per-type metrics against the clean scores, the Table 1 row, the Table 2 row and the
    misclassification metrics (the set "misclassified" is kept out of the types and the pooled AUROC)."""
    s_in = scores["clean"]
    per_type = {k: _metrics(s_in, v) for k, v in scores.items() if k not in NOT_A_TYPE}
    ood = np.concatenate([scores[k] for k in ood_sets if k in scores])
    per_type["ood"] = _metrics(s_in, ood)
    pooled_parts = [scores[k] for k, _ in TABLE1 if k != "ood" and k in scores] + [ood]
    pooled = _metrics(s_in, np.concatenate(pooled_parts))
    row = {k: (per_type[k]["tnr_at_95_tpr"] if per_type.get(k) else None) for k, _ in TABLE1}
    if pooled:
        row.update(auroc=pooled["auroc"], aupr_in=pooled["aupr_in"], aupr_out=pooled["aupr_out"], n_pooled=pooled["n"])
    t2 = {k: (per_type[k]["tnr_at_95_tpr"] if per_type.get(k) else None) for k, _ in ADAPTIVE}
    return {"per_type": per_type, "table1": row, "table2": t2,
            "misclassification": misclassification(s_in, scores.get("misclassified"))}


def val_summary(scores: dict[str, np.ndarray], ood_sets: tuple[str, ...], trust_clean: np.ndarray | None,
                alpha: float = 0.05) -> dict:
    ev = evaluate(scores, ood_sets)
    types = [t for t in VAL_TYPES if ev["per_type"].get(t)]
    out = {
        "mean_auroc": float(np.mean([ev["per_type"][t]["auroc"] for t in types])),
        "mean_tnr": float(np.mean([ev["per_type"][t]["tnr_at_95_tpr"] for t in types])),
        "pooled_auroc": ev["table1"].get("auroc"),
        "auroc": {t: round(ev["per_type"][t]["auroc"], 4) for t in types},
        "tnr": {t: round(ev["per_type"][t]["tnr_at_95_tpr"], 4) for t in types},
    }
    if ev["misclassification"] is not None:
        out["misclassification_auroc"] = ev["misclassification"]["auroc"]
    if trust_clean is not None:
        out["clean_flag_rate"] = float(np.mean(trust_clean < alpha))
    return out


def _time_ms(fn, x: torch.Tensor, repeats: int) -> float:
    fn(x[: min(8, len(x))])
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - t0)
    return 1000.0 * best / len(x)


def time_interleaved(fns: dict, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` ms per sample of each fn(x), the fns taking turns in every repeat
    (a load change on a shared machine then hits all of them alike)."""
    for fn in fns.values():
        fn(x[: min(8, len(x))])
    best = {k: math.inf for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn(x)
            best[k] = min(best[k], time.perf_counter() - t0)
    return {k: 1000.0 * v / len(x) for k, v in best.items()}

