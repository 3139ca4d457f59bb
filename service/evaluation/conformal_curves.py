"""The decisions' curves of a ``gga-eval`` report, from what the command scored itself on the clean set.

A saved detector keeps its prediction sets' quantile at one ``set_alpha`` and its gate's threshold
at one ``risk_target``, so the curves come from the labelled clean set (``--in`` with ``y``):

- **coverage and mean set size vs α**: the clean set is split in two halves by a seeded permutation
  (:func:`split_halves`, seed :data:`SPLIT_SEED`; the first ⌊n/2⌋ indices of the permutation calibrate,
  the other ⌈n/2⌉ are measured); for every α of :data:`ALPHAS` (and the served ``set_alpha``) the
  served set score (:class:`detectors.conformal.PredictionSets` with the served score, randomisation,
  Mondrian choice and seed) is fitted on the first half and its coverage, mean size and share of
  empty sets are measured on the second;
- **risk–coverage of the served gate's score**: the gate's correctness score
  (:func:`detectors.decisions.correctness_score`, trust-gated at the detector's fit alpha, then at the
  served alpha as the server does: :func:`detectors.selective.gated_by_trust`) on the whole clean set;
  one point per distinct score (accept every sample with a score at or above it: coverage = accepted
  share, risk = error rate among the accepted); inputs the gate never accepts (score −∞) are on no
  point, so the curve ends at the unflagged share. The operating point is the detector's own
  threshold (the served ``accept``); beside it the classic max softmax
  (:func:`detectors.selective.max_softmax`, not gated by the trust) over every clean sample.

Both need the logits, which a detector scored in this process gives (``--detector``) and ``/predict``
does not: with ``--url`` the report has the served operating point (the ``accept`` rows) and the
max-softmax curve from each row's ``confidence``, and a note says the rest needs ``--detector``.

In ``report.json`` (``decision_curves``) a risk–coverage curve (``gate.curve``, ``max_softmax.curve``:
lists ``threshold``, ``accepted``, ``errors``, ``coverage``, ``risk``) keeps at most :data:`MAX_POINTS`
points, evenly spaced over its ``points`` distinct scores, always with its last point and the operating
point (``gate.operating_index``, its index in ``gate.curve``; None when the served point is on no
point of the curve, e.g. nothing accepted).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from detectors.conformal import PredictionSets
from detectors.decisions import Decisions, correctness_score
from detectors.metrics import risk_at_coverage
from detectors.selective import gated_by_trust, max_softmax
from service.evaluation.data import DataSet
from service.evaluation.scoring import SetScores

ALPHAS = tuple(round(0.01 * k, 2) for k in range(1, 21))  # 0.01, 0.02, ..., 0.20
SPLIT_SEED = 0
MAX_POINTS = 200
SHOWN_ALPHAS = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2)  # the columns of the printed table
LOGITS_NOTE = ("coverage and mean set size vs alpha and the risk-coverage curve of the gate's score need the "
               "logits, which /predict does not return: run gga-eval with --detector (in this process) for them; "
               "the report has the served operating point and the max-softmax curve (from each row's confidence)")

__all__ = ["ALPHAS", "MAX_POINTS", "SPLIT_SEED", "decision_curves", "gate_scores", "operating_point",
           "risk_coverage", "set_curves", "split_halves", "summary_lines", "thin"]


def split_halves(n: int, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(calibration indices, test indices): a seeded permutation of 0..n-1, its first ⌊n/2⌋ and the rest."""
    perm = np.random.default_rng(seed).permutation(n)
    return perm[: n // 2], perm[n // 2:]


def set_curves(logits, labels, served: PredictionSets, alphas=ALPHAS, seed: int = SPLIT_SEED) -> dict:
    """Coverage, mean size, empty share and quantile of the served set score at every α (the grid and the
    served α), calibrated on the first half of :func:`split_halves` and measured on the second."""
    z = torch.as_tensor(logits)
    y = torch.as_tensor(labels).long()
    cal, test = (torch.from_numpy(i) for i in split_halves(len(y), seed))
    grid = sorted({float(a) for a in alphas} | {served.alpha})
    out = {"score": served.score, "randomized": served.randomized, "mondrian": served.mondrian,
           "served_alpha": served.alpha, "split_seed": seed, "n_calibration": len(cal), "n_test": len(test),
           "alpha": grid, "coverage": [], "mean_size": [], "empty_share": [], "quantile": []}
    for a in grid:
        sets = PredictionSets(served.score, a, randomized=served.randomized, mondrian=served.mondrian,
                              tune_fraction=served.tune_fraction, lambda_grid=served.lambda_grid,
                              seed=served.seed).fit(z[cal], y[cal])
        mask = sets.predict(z[test])
        sizes = mask.sum(dim=1)
        out["coverage"].append(float(mask.gather(1, y[test][:, None])[:, 0].double().mean()))
        out["mean_size"].append(float(sizes.double().mean()))
        out["empty_share"].append(float((sizes == 0).double().mean()))
        q = sets.quantiles.tolist()
        out["quantile"].append(None if len(q) != 1 or math.isinf(q[0]) else q[0])
    return out


def risk_coverage(score, correct) -> dict[str, np.ndarray]:
    """The rules "accept score ≥ t" for every distinct finite score t (higher = more likely correct), in
    falling t: ``threshold``, ``accepted`` (count), ``errors``, ``coverage`` (accepted / n) and ``risk``
    (errors / accepted). Samples with score −∞ are never accepted."""
    s = np.asarray(score, dtype=np.float64)
    ok = np.asarray(correct, dtype=bool)
    if s.shape != ok.shape or s.ndim != 1 or np.isnan(s).any():
        raise ValueError(f"score and correct must be 1-D of equal length without NaN, got {s.shape}, {ok.shape}")
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    errors = np.cumsum(~ok[order])
    ends = np.flatnonzero(np.r_[s_sorted[1:] != s_sorted[:-1], True])
    ends = ends[s_sorted[ends] > -np.inf]
    accepted = ends + 1
    return {"threshold": s_sorted[ends], "accepted": accepted, "errors": errors[ends],
            "coverage": accepted / len(s), "risk": errors[ends] / accepted}


def operating_point(accept, correct) -> dict:
    """The served point: accepted share, error rate among the accepted (None when none is), counts."""
    a = np.asarray(accept, dtype=bool)
    ok = np.asarray(correct, dtype=bool)
    n_acc, n_err = int(a.sum()), int((a & ~ok).sum())
    return {"coverage": n_acc / len(a), "risk": n_err / n_acc if n_acc else None, "accepted": n_acc,
            "errors": n_err}


def gate_scores(decisions: Decisions, logits, trust, serve_alpha: float) -> np.ndarray:
    """The served gate's correctness score per sample (float64), −∞ where the detector's fit alpha or the
    served alpha flags the input (the gate never accepts it there)."""
    s = correctness_score(decisions.config.gate_score, torch.as_tensor(logits), trust, decisions.flag_alpha)
    return gated_by_trust(s, trust, serve_alpha).numpy()


def thin(curve: dict[str, np.ndarray], keep: int | None = None, max_points: int = MAX_POINTS) -> dict[str, list]:
    """At most ``max_points`` points of a :func:`risk_coverage` curve (plus ``keep``, an index that must stay),
    evenly spaced over its points, the last always kept; as lists."""
    m = len(curve["coverage"])
    idx = np.unique(np.round(np.linspace(0, m - 1, min(m, max_points))).astype(np.int64)) if m else \
        np.empty(0, np.int64)
    if keep is not None:
        idx = np.union1d(idx, [keep])
    return {k: v[idx].tolist() for k, v in curve.items()}


def _point_index(curve: dict[str, np.ndarray], accepted: int) -> int | None:
    hit = np.flatnonzero(curve["accepted"] == accepted)
    return int(hit[0]) if hit.size else None


def decision_curves(clean: DataSet, sc: SetScores, decisions: Decisions | None,
                    serve_alpha: float) -> tuple[dict | None, list[str]]:
    """(``decision_curves`` of report.json or None, notes): the curves of the module docstring for the
    clean set ``clean`` and its scores ``sc`` (``sc.logits`` None: only what the served answers allow)."""
    if clean.y is None:
        return None, ["no decision curves: they need labels y in the clean set (--in)"]
    y = clean.y
    correct = sc.label == y
    notes: list[str] = []
    out: dict = {"n": len(y), "serve_alpha": serve_alpha, "sets": None, "gate": None, "max_softmax": None}
    if sc.logits is not None:
        msp = max_softmax(torch.from_numpy(sc.logits)).numpy()
    elif sc.confidence is not None:
        msp = np.asarray(sc.confidence, dtype=np.float64)
    else:
        msp = None
    op = operating_point(sc.accept, correct) if sc.accept is not None else None
    if sc.logits is None:
        notes.append(LOGITS_NOTE)
    elif decisions is None:
        notes.append("no decision curves of the sets and the gate: the detector was saved without decisions "
                     "(refit it to get prediction sets and the accept gate)")
    else:
        out["sets"] = set_curves(sc.logits, y, decisions.sets)
        if decisions.gate is None:
            notes.append(f"no risk-coverage curve of the gate: the detector has no gate ({decisions.gate_error})")
        else:
            curve = risk_coverage(gate_scores(decisions, sc.logits, sc.trust, serve_alpha), correct)
            at = _point_index(curve, op["accepted"]) if op is not None else None
            kept = thin(curve, at)
            out["gate"] = {"score": decisions.config.gate_score, "threshold": decisions.gate.threshold,
                           "risk_target": decisions.config.risk_target, "delta": decisions.config.delta,
                           "points": len(curve["coverage"]), "curve": kept,
                           "operating_index": None if at is None else kept["accepted"].index(op["accepted"])}
    if op is not None:
        if msp is not None and op["accepted"] and correct.any():
            op["max_softmax_risk_at_coverage"] = risk_at_coverage(-msp[correct], -msp[~correct], op["coverage"])
        out["operating_point"] = op
    if msp is not None:
        curve = risk_coverage(msp, correct)
        out["max_softmax"] = {"source": "logits" if sc.logits is not None else "confidence",
                              "points": len(curve["coverage"]), "curve": thin(curve)}
    return out, notes


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def summary_lines(curves: dict) -> list[str]:
    """The compact table ``gga-eval`` prints on stderr (and report.md shows)."""
    lines = []
    sets = curves.get("sets")
    if sets:
        cols = [i for i, a in enumerate(sets["alpha"]) if a in SHOWN_ALPHAS or a == sets["served_alpha"]]
        lines.append(f"set curves ({sets['score']}; calibrated on {sets['n_calibration']} clean samples, measured "
                     f"on the other {sets['n_test']}, split seed {sets['split_seed']}):")
        lines.append("  alpha     " + " ".join(f"{sets['alpha'][i]:>7.2f}" for i in cols))
        lines.append("  coverage  " + " ".join(f"{sets['coverage'][i]:>7.4f}" for i in cols))
        lines.append("  mean size " + " ".join(f"{sets['mean_size'][i]:>7.3f}" for i in cols))
    op, gate, msp = curves.get("operating_point"), curves.get("gate"), curves.get("max_softmax")
    if op is not None:
        what = (f"gate ({gate['score']}, threshold {gate['threshold']:.6g})" if gate else "served gate")
        line = f"risk-coverage: {what} accepts {_num(op['coverage'])} at risk {_num(op['risk'])}"
        if "max_softmax_risk_at_coverage" in op:
            line += f"; max softmax at that coverage: risk {_num(op['max_softmax_risk_at_coverage'])}"
        lines.append(line)
    elif msp is not None:
        lines.append("risk-coverage: max softmax only (the detector has no gate)")
    return lines
