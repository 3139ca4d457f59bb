"""The numbers of a ``gga-eval`` report, every one from :mod:`detectors.metrics` (scores: higher = more anomalous).

With labels, the in-distribution samples are the correctly classified clean samples (the
protocol of the project's reproduction, ``benchmarks/repro``) and the misclassification
metrics (wrong vs right: AUROC, AURC, risk at 95% coverage) and the accuracy are added;
without labels every clean sample is in-distribution. Per OOD set (positive class):
:func:`detectors.metrics.summarize` (AUROC, AUPR-In, AUPR-Out, TNR at 95% TPR), the flag
rate (share with trust < the served alpha) and the median trust.
"""

from __future__ import annotations

import numpy as np

from detectors.metrics import aurc, auroc, risk_at_coverage, summarize
from service.evaluation.data import DataSet
from service.evaluation.errors import UsageError
from service.evaluation.scoring import SetScores

TPR = 0.95  # the in-distribution acceptance of tnr_at_95_tpr (summarize's)
COVERAGE = 0.95  # of risk_at_95_coverage


def evaluate(clean: DataSet, clean_scores: SetScores, sets: list[tuple[DataSet, SetScores]]) -> dict:
    """The numbers of report.json: the clean set (and its misclassification metrics) and every OOD set."""
    out_clean = {"file": str(clean.path), "n": len(clean.x), "n_file": clean.n_file, "labels": clean.y is not None,
                 "flag_rate": float(np.mean(clean_scores.flagged)),
                 "median_trust": float(np.median(clean_scores.trust))}
    if clean.y is not None:
        right = clean_scores.label == clean.y
        n_right = int(right.sum())
        if n_right == 0:
            raise UsageError(f"{clean.path}: the model classifies none of the {len(right)} clean samples as y says: "
                             "check that y holds this model's class indices and that x is scaled like its input")
        s_in = clean_scores.score[right]
        wrong = clean_scores.score[~right]
        out_clean.update(positives="correctly classified clean samples", n_positives=n_right,
                         accuracy=n_right / len(right), flag_rate_right=float(np.mean(clean_scores.flagged[right])),
                         flag_rate_wrong=(float(np.mean(clean_scores.flagged[~right])) if wrong.size else None))
        if wrong.size:
            out_clean["misclassification"] = {
                "auroc": auroc(s_in, wrong), "aurc": aurc(s_in, wrong),
                "risk_at_95_coverage": risk_at_coverage(s_in, wrong, COVERAGE), "n_right": n_right,
                "n_wrong": int(wrong.size)}
        else:
            out_clean["misclassification"] = None
    else:
        s_in = clean_scores.score
        out_clean.update(positives="all clean samples", n_positives=len(s_in))
    out_clean["decisions"] = decisions(clean, clean_scores)
    out_sets = {}
    for ds, sc in sets:
        out_sets[ds.name] = {"file": str(ds.path), "n": len(ds.x), "n_file": ds.n_file,
                             **summarize(s_in, sc.score), "flag_rate": float(np.mean(sc.flagged)),
                             "median_trust": float(np.median(sc.trust))}
    return {"clean": out_clean, "sets": out_sets}


def decisions(clean: DataSet, sc: SetScores) -> dict | None:
    """The served prediction sets and accept gate on the clean set: set coverage (labels needed) and mean
    size, accepted share and selective risk (labels needed); None when the detector has neither."""
    if sc.prediction_set is None and sc.accept is None:
        return None
    out: dict = {}
    if sc.prediction_set is not None:
        sizes = np.array([len(s) for s in sc.prediction_set])
        out["mean_set_size"] = float(sizes.mean())
        out["empty_set_share"] = float((sizes == 0).mean())
        if clean.y is not None:
            out["set_coverage"] = float(np.mean([int(t) in s for s, t in zip(sc.prediction_set, clean.y, strict=True)]))
    if sc.accept is not None:
        out["accept_rate"] = float(np.mean(sc.accept))
        if clean.y is not None:
            acc = sc.accept & (sc.label != clean.y)
            out["accepted_errors"] = int(acc.sum())
            out["selective_risk"] = float(acc.sum() / max(int(sc.accept.sum()), 1))
    return out
