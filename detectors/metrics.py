"""Detection metrics on 1-D anomaly scores (higher score = more anomalous).

Every function takes ``scores_in`` (in-distribution: clean, trusted samples) and
``scores_out`` (OOD or adversarial samples), each a 1-D torch tensor, numpy array or
sequence of numbers, and returns a Python float. The math is exact and done in numpy
float64; no sampling, no interpolation:

- ``auroc``: P(s_out > s_in) + ½ P(s_out = s_in), the Mann–Whitney U statistic over all
  n_in · n_out pairs (OOD = positive class). Ties count half.
- ``aupr_out`` / ``aupr_in``: average precision AP = Σ_k (R_k − R_{k−1}) P_k over the
  distinct score thresholds, exactly as ``sklearn.metrics.average_precision_score``
  (step-wise, no trapezoid). ``aupr_out`` takes OOD as positive and ranks by score;
  ``aupr_in`` takes in-distribution as positive and ranks by −score.
- ``tnr_at_tpr``: the fraction of OOD samples rejected when the threshold accepts at
  least a fraction ``tpr`` of the in-distribution samples (see its docstring for the
  exact, tie-safe threshold rule). ``detection_rate_at_tpr`` is the same number, the
  name used for adversarial examples.

Selective prediction (telling wrong predictions from right ones), with ``scores_right``
and ``scores_wrong`` the scores of correctly and wrongly classified samples:

- ``risk_at_coverage``: accept the fraction ``coverage`` of all samples with the lowest
  scores (the most trusted); the risk is the error rate among them. Ties at the cut are
  shared pro rata (the expected risk of a random order within the tie).
- ``aurc``: the area under the risk–coverage curve, the mean of the risk at coverage
  k/n for k = 1..n (Geifman et al. 2019), with the same tie rule. Lower is better; a
  perfect ranking gives Σ_{k>r} (k − r)/k / n with r the number of right samples.

Empty inputs, inputs that are not 1-D and NaN scores raise ValueError; ±inf is a valid,
orderable score.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "auroc",
    "aupr_in",
    "aupr_out",
    "average_precision",
    "tnr_at_tpr",
    "detection_rate_at_tpr",
    "summarize",
    "aurc",
    "risk_at_coverage",
]


def _as_scores(scores, name: str) -> np.ndarray:
    if isinstance(scores, torch.Tensor):
        arr = scores.detach().to("cpu", torch.float64).numpy()
    else:
        try:
            arr = np.asarray(scores, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name} must be a 1-D array of numbers, could not convert it: {exc}") from exc
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of scores [n], got shape {arr.shape}; flatten it first")
    if arr.size == 0:
        raise ValueError(f"{name} is empty: every metric needs at least one in- and one out-sample")
    n_nan = int(np.isnan(arr).sum())
    if n_nan:
        raise ValueError(f"{name} contains {n_nan} NaN score(s); drop or fix them before computing metrics")
    return arr


def _pair(scores_in, scores_out) -> tuple[np.ndarray, np.ndarray]:
    return _as_scores(scores_in, "scores_in"), _as_scores(scores_out, "scores_out")


def auroc(scores_in, scores_out) -> float:
    """Area under the ROC curve with OOD as the positive class.

    AUROC = (1 / (n_in n_out)) Σ_{i,j} [1(s_out_j > s_in_i) + ½ 1(s_out_j = s_in_i)].
    Computed with sorted counts in integer arithmetic (2U is an integer), so it is
    exact: 1.0 for perfect separation, 0.0 for reversed, 0.5 when all scores tie.
    """
    s_in, s_out = _pair(scores_in, scores_out)
    sorted_in = np.sort(s_in)
    below = np.searchsorted(sorted_in, s_out, side="left")  # #{s_in < s_out_j}
    below_or_equal = np.searchsorted(sorted_in, s_out, side="right")  # #{s_in <= s_out_j}
    twice_u = int(below.sum()) + int(below_or_equal.sum())  # Σ 2·less + equal
    return twice_u / (2.0 * s_in.size * s_out.size)


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """AP of ``scores`` (higher = more positive) for boolean labels ``positive``.

    AP = Σ_k (R_k − R_{k−1}) P_k over the distinct thresholds t_k in decreasing order,
    with P_k, R_k the precision and recall of the rule ``score >= t_k`` and R_0 = 0;
    this is ``sklearn.metrics.average_precision_score``. Needs at least one positive.
    """
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    if scores.shape != positive.shape or scores.ndim != 1:
        raise ValueError(
            f"scores and positive must be 1-D of the same length, got {scores.shape} and {positive.shape}"
        )
    n_pos = int(positive.sum())
    if n_pos == 0:
        raise ValueError("average precision needs at least one positive sample")
    order = np.argsort(-scores, kind="stable")
    s, lab = scores[order], positive[order]
    # the last index of each run of equal scores: all tied samples enter together
    last = np.flatnonzero(np.r_[s[1:] != s[:-1], True])
    tps = np.cumsum(lab, dtype=np.int64)[last]
    seen = last + 1
    precision = tps / seen
    recall_step = np.diff(tps, prepend=0) / n_pos
    return float(np.sum(recall_step * precision))


def aupr_out(scores_in, scores_out) -> float:
    """Average precision with OOD as the positive class, ranked by score."""
    s_in, s_out = _pair(scores_in, scores_out)
    scores = np.concatenate([s_in, s_out])
    positive = np.concatenate([np.zeros(s_in.size, bool), np.ones(s_out.size, bool)])
    return average_precision(scores, positive)


def aupr_in(scores_in, scores_out) -> float:
    """Average precision with in-distribution as the positive class, ranked by −score."""
    s_in, s_out = _pair(scores_in, scores_out)
    scores = -np.concatenate([s_in, s_out])
    positive = np.concatenate([np.ones(s_in.size, bool), np.zeros(s_out.size, bool)])
    return average_precision(scores, positive)


def _accepted_count(n: int, tpr: float) -> int:
    # tpr·n rounded to 9 decimals first, so a float error such as 0.07·100 =
    # 7.000000000000001 does not demand an extra sample
    return max(1, math.ceil(round(tpr * n, 9)))


def tnr_at_tpr(scores_in, scores_out, tpr: float = 0.95) -> float:
    """Fraction of OOD samples rejected at the threshold that accepts ``tpr`` of the in-samples.

    Rule: k = ceil(tpr · n_in) (1 <= k <= n_in); the threshold t is the k-th smallest
    in-distribution score; a sample is accepted when score <= t and rejected (detected)
    when score > t. Then

        TNR = #{s_out > t} / n_out.

    Tie-safe: every in-sample tied with t is accepted, so at least k (never fewer) are
    accepted, and an OOD sample tied with t counts as accepted (not detected); the
    result does not depend on the order of the inputs. ``tpr`` must be in (0, 1].
    """
    if isinstance(tpr, bool) or not isinstance(tpr, int | float) or not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be a number in (0, 1], e.g. 0.95, got {tpr!r}")
    s_in, s_out = _pair(scores_in, scores_out)
    k = _accepted_count(s_in.size, float(tpr))
    threshold = np.partition(s_in, k - 1)[k - 1]
    return float(np.count_nonzero(s_out > threshold)) / s_out.size


def detection_rate_at_tpr(scores_in, scores_out, tpr: float = 0.95) -> float:
    """Fraction of adversarial examples detected at ``tpr`` on clean data: ``tnr_at_tpr``."""
    return tnr_at_tpr(scores_in, scores_out, tpr)


def summarize(scores_in, scores_out) -> dict[str, float]:
    """``{"auroc", "aupr_in", "aupr_out", "tnr_at_95_tpr"}`` for one pair of score sets."""
    s_in, s_out = _pair(scores_in, scores_out)
    return {
        "auroc": auroc(s_in, s_out),
        "aupr_in": aupr_in(s_in, s_out),
        "aupr_out": aupr_out(s_in, s_out),
        "tnr_at_95_tpr": tnr_at_tpr(s_in, s_out, 0.95),
    }


def _errors_by_coverage(scores_right, scores_wrong) -> np.ndarray:
    """Expected number of errors among the k most trusted samples, k = 0..n (ties shared pro rata)."""
    right = _as_scores(scores_right, "scores_right")
    wrong = _as_scores(scores_wrong, "scores_wrong") if len(np.atleast_1d(scores_wrong)) else np.empty(0)
    s = np.concatenate([right, wrong])
    err = np.concatenate([np.zeros(len(right)), np.ones(len(wrong))])
    order = np.argsort(s, kind="stable")
    s, err = s[order], err[order]
    # within a run of equal scores, every sample carries the run's mean error
    _, start, counts = np.unique(s, return_index=True, return_counts=True)
    run_err = np.add.reduceat(err, start) / counts
    err = np.repeat(run_err, counts)
    return np.concatenate([[0.0], np.cumsum(err)])


def risk_at_coverage(scores_right, scores_wrong, coverage: float = 0.95) -> float:
    """Error rate among the ``coverage`` fraction of samples with the lowest scores."""
    if not 0 < coverage <= 1:
        raise ValueError(f"coverage must be in (0, 1], got {coverage!r}")
    cum = _errors_by_coverage(scores_right, scores_wrong)
    n = len(cum) - 1
    k = coverage * n
    lo = math.floor(k)
    errors = cum[lo] + (k - lo) * (cum[min(lo + 1, n)] - cum[lo])
    return float(errors / k)


def aurc(scores_right, scores_wrong) -> float:
    """Area under the risk–coverage curve: mean over k = 1..n of the risk among the k most trusted."""
    cum = _errors_by_coverage(scores_right, scores_wrong)
    k = np.arange(1, len(cum))
    return float(np.mean(cum[1:] / k))
