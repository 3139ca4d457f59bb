"""The files of a ``gga-eval`` report: ``report.md`` (the table, the command, the date, the detector,
the figures), ``report.json`` (every number, unrounded; non-finite numbers as null) and
``scores.npz`` (per set ``<set>.score``, ``.trust``, ``.flagged``, ``.label``, and ``clean.y``; with
``--explain`` also ``<set>.p_values``, (n, K) in the order of the report's ``explain.components``; with
``--detector`` also ``<set>.logits``, (n, C), the logits the detector's decisions saw).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from service.evaluation.conformal_curves import summary_lines
from service.evaluation.data import CLEAN, DataSet
from service.evaluation.scoring import SetScores

POSITIVES_LABELLED = ("in-distribution = the correctly classified samples of the clean set (as in the project's "
                      "reproduction, benchmarks/repro); the misclassified ones are evaluated separately")
POSITIVES_UNLABELLED = "in-distribution = every sample of the clean set (no labels y in the file)"


def _f(v) -> str:
    return "—" if v is None else f"{v:.4f}"


def render_markdown(doc: dict) -> str:
    """report.md of the report document ``doc`` (what report.json holds)."""
    det, clean, sets = doc["detector"], doc["clean"], doc["sets"]
    alpha = det["alpha"]
    n_clean = f"{clean['n']} ({clean['n_positives']} right)" if clean["labels"] else str(clean["n"])
    where = f"in this process from {det['path']}" if doc["mode"] == "detector" else f"by the service at {det['url']}"
    lines = [
        "# gga-eval report", "",
        f"- date: {doc['date']}",
        f"- command: `{doc['command']}`",
        f"- detector: kind {det['kind']}, preset {det.get('preset')}, version {det.get('version')}, "
        f"alpha {alpha:g} ({det['alpha_source']}); components {', '.join(det.get('components') or [])}",
        f"- scored {where} (model {doc['model']}, device {doc['device']}), batch size {doc['batch_size']}, "
        f"{doc['wall_seconds']:.1f} s",
        f"- {POSITIVES_LABELLED if clean['labels'] else POSITIVES_UNLABELLED}; scores: higher = more anomalous; "
        "OOD = positive class of AUROC and AUPR-Out; TNR at 95% TPR = share of the set flagged at the score "
        "threshold that accepts 95% of the in-distribution samples",
        "",
        f"| set | file | n | AUROC | AUPR-In | AUPR-Out | TNR at 95% TPR | flag rate (trust < {alpha:g}) |",
        "|---|---|---|---|---|---|---|---|",
        f"| {CLEAN} (in-distribution) | `{clean['file']}` | {n_clean} | — | — | — | — | {clean['flag_rate']:.4f} |",
    ]
    for name, r in sets.items():
        lines.append(f"| {name} | `{r['file']}` | {r['n']} | {_f(r['auroc'])} | {_f(r['aupr_in'])} | "
                     f"{_f(r['aupr_out'])} | {_f(r['tnr_at_95_tpr'])} | {r['flag_rate']:.4f} |")
    lines.append("")
    lines.append(f"On in-distribution data the expected flag rate is at most alpha = {alpha:g} (trust is a conformal "
                 "p-value, not the probability that a prediction is right).")
    if clean["labels"]:
        m = clean.get("misclassification")
        lines += ["", "## Misclassification (clean set, wrong vs right predictions)", "",
                  f"Accuracy {clean['accuracy']:.4f} ({clean['n_positives']} of {clean['n']} right); flag rate "
                  f"{clean['flag_rate_right']:.4f} on the right ones"
                  + (f", {clean['flag_rate_wrong']:.4f} on the wrong ones." if clean["flag_rate_wrong"] is not None
                     else "."), ""]
        if m is None:
            lines.append("No clean sample is misclassified: the misclassification metrics are undefined.")
        else:
            lines += ["| accuracy | AUROC wrong vs right | AURC | risk at 95% coverage | right | wrong |",
                      "|---|---|---|---|---|---|",
                      f"| {clean['accuracy']:.4f} | {m['auroc']:.4f} | {m['aurc']:.4f} | "
                      f"{m['risk_at_95_coverage']:.4f} | {m['n_right']} | {m['n_wrong']} |", "",
                      "AURC and risk: accept the lowest scores first; lower is better."]
    dec = clean.get("decisions")
    if dec:
        lines += ["", "## Prediction sets and the accept gate (clean set)", "",
                  "| set coverage | mean set size | empty sets | accept rate | selective risk | accepted errors |",
                  "|---|---|---|---|---|---|",
                  "| " + " | ".join([_f(dec.get("set_coverage")), _f(dec.get("mean_set_size")),
                                   _f(dec.get("empty_set_share")), _f(dec.get("accept_rate")),
                                   _f(dec.get("selective_risk")), str(dec.get("accepted_errors", "—"))]) + " |",
                  "", "Coverage holds for inputs exchangeable with the calibration data (set_alpha, risk_target and "
                  "delta: the detector's /info)."]
    lines += _curves_section(doc.get("decision_curves"), set(doc["figures"]))
    lines += ["", "## Figures", "", "ROC curves of every set against the in-distribution samples:", "",
              "![ROC curves](roc.png)", ""]
    figs = set(doc["figures"])
    if f"csm_{CLEAN}.png" in figs:
        lines += [f"### {CLEAN}", "", f"![CSM example {CLEAN}](csm_{CLEAN}.png)", ""]
    for name in sets:
        lines += [f"### {name}", "", f"![trust {CLEAN} vs {name}](trust_{name}.png)"]
        if f"csm_{name}.png" in figs:
            lines += ["", f"![CSM example {name}](csm_{name}.png)"]
        lines.append("")
    lines.append("CSM examples: the first sample of each set, rows and columns in the order of the predicted "
                 "classes (the predicted class first).")
    if doc["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in doc["notes"]]
    lines += ["", "Every number, unrounded, is in `report.json`; the per-sample scores are in `scores.npz`.", ""]
    return "\n".join(lines)


def _curves_section(curves: dict | None, figs: set[str]) -> list[str]:
    """report.md's section on the decisions' curves (:mod:`service.evaluation.conformal_curves`)."""
    if curves is None:
        return []
    lines = ["", "## Decision curves (clean set)", "", "```", *summary_lines(curves), "```", ""]
    if "sets_vs_alpha.png" in figs:
        lines += ["![coverage and mean set size vs alpha](sets_vs_alpha.png)", ""]
    if "risk_coverage.png" in figs:
        lines += ["![risk-coverage curves and the served operating point](risk_coverage.png)", ""]
    lines.append("Every alpha and every curve point is in `report.json` (`decision_curves`).")
    return lines


def json_safe(obj):
    """``obj`` with numpy scalars as Python numbers and non-finite floats as None (strict JSON)."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    return obj


def write_report(out: Path, doc: dict, clean: DataSet, clean_scores: SetScores,
                 scored: list[tuple[DataSet, SetScores]]) -> Path:
    """scores.npz, report.json and report.md into the folder ``out`` (which exists); returns report.md's path.
    Raises ``OSError`` when a file cannot be written."""
    arrays = {}
    for name, sc in ((CLEAN, clean_scores), *((ds.name, sc) for ds, sc in scored)):
        arrays.update({f"{name}.score": sc.score, f"{name}.trust": sc.trust, f"{name}.flagged": sc.flagged,
                       f"{name}.label": sc.label})
        if sc.p_values is not None:
            arrays[f"{name}.p_values"] = sc.p_values
        if sc.logits is not None:
            arrays[f"{name}.logits"] = sc.logits
    if clean.y is not None:
        arrays[f"{CLEAN}.y"] = clean.y
    np.savez(out / "scores.npz", **arrays)
    (out / "report.json").write_text(json.dumps(json_safe(doc), indent=2) + "\n")
    (out / "report.md").write_text(render_markdown(doc))
    return out / "report.md"
