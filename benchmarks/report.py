"""Render ``REPORT.md`` and the figures from the JSON / npz files of :mod:`benchmarks.reproduce`.

    python -m benchmarks.report [--results benchmarks/results] [--no-figures]

Every ``<dataset>.json`` found in the results folder (mnist, cifar10) gets a section;
the paper's numbers (Tables 1–3 of Schwinn et al., UAI 2021, copied from the paper text)
sit beside ours. Figures need matplotlib (the optional ``eval`` extra); without it the
report says so and skips them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

DATASETS = ("mnist", "cifar10")
TITLES = {"mnist": "MNIST", "cifar10": "CIFAR-10"}

# ---------------------------------------------------------------- the paper's numbers (in %)
T1_COLS = ("Noise", "PGD", "Rotation", "B&B", "B&B L2", "OOD", "AUROC", "AUPR-In", "AUPR-Out")
PAPER_T1 = {
    "mnist": {
        "Baseline": (45.8, 3.3, 59.7, 99.9, 99.3, 55.0, 86.1, 46.7, 97.8),
        "ODIN": (97.2, 2.5, 92.0, 93.6, 89.1, 69.4, 88.2, 39.9, 98.1),
        "Maha": (100.0, 12.4, 93.5, 98.4, 99.0, 97.9, 92.4, 88.3, 99.9),
        "Ours": (100.0, 98.9, 98.2, 100.0, 100.0, 98.1, 99.5, 97.7, 99.9),
    },
    "cifar10": {
        "Baseline": (10.5, 0.0, 55.1, 97.5, 95.4, 77.2, 82.7, 30.2, 97.4),
        "ODIN": (25.3, 0.0, 45.1, 14.0, 14.5, 83.6, 81.2, 29.7, 96.8),
        "Maha": (93.1, 85.9, 73.2, 90.8, 91.3, 88.2, 90.0, 72.1, 99.0),
        "Ours": (95.6, 92.6, 84.5, 93.2, 93.3, 84.2, 96.3, 83.7, 99.4),
    },
}
PAPER_T2 = {"mnist": (95.4, 97.3, 72.1), "cifar10": (90.3, 91.5, 69.7), "cifar100": (96.9, 97.8, 71.6)}
PAPER_CSA = {"mnist": "561 of 10,000", "cifar10": "1,354 of 10,000", "cifar100": "857 of 10,000"}
PAPER_T3_CIFAR100 = {"top-100 (all)": (98.0, 87.5, 99.7), "top-10": (98.0, 86.9, 99.7), "top-5": (97.7, 85.6, 99.7)}
PAPER_NAME = {"msp": "Baseline", "odin": "ODIN", "mahalanobis": "Maha", "gga": "Ours"}
T1_KEYS = ("noise", "pgd", "rotation", "bb", "bb_l2", "ood")
ADAPTIVE = (("t_sce", "T-SCE"), ("t_mse", "T-MSE"), ("csa", "CSA"))
METHOD_ORDER = ("msp", "odin", "energy", "mahalanobis", "layers_sum", "neg_s1_mean", "composite", "composite_no_gga",
                "composite_no_logits", "composite_no_layers", "gga_in_composite", "gga", "gga_selected",
                "gga_rescale", "gga_chmax", "gga_official", "gga_naive", "gga_precise", "gga_softmax", "gga_margin",
                "gga_bins500", "gga_bins100", "gga_nostd", "gga_heldout", "gga_train_matched", "gga_top5", "gga_top3")
COMPOSITE_ROWS = ("composite", "composite_no_gga", "composite_no_logits", "composite_no_layers", "gga_in_composite",
                  "layers_sum", "gga", "gga_selected")
TABLE2_ROWS = ("composite", "composite_no_gga", "gga_in_composite", "layers_sum", "gga", "gga_selected",
               "gga_rescale", "gga_naive", "gga_precise", "msp", "mahalanobis", "neg_s1_mean")


def _pct(v, digits: int = 1) -> str:
    return "–" if v is None else f"{100 * v:.{digits}f}"


def _num(v, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _methods(r: dict) -> list[str]:
    known = [m for m in METHOD_ORDER if m in r["methods"]]
    return known + [m for m in r["methods"] if m not in known]


def _table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out)


# ---------------------------------------------------------------- sections


def _caveat(r: dict) -> str:
    return " (JPEG-q75 CIFAR-10 test copy, not the standard test set; cross-data-set OOD, not SVHN)" \
        if r["dataset"] == "cifar10" else ""


def section_run(r: dict) -> str:
    m = r["machine"]
    s = r["samples"]
    lines = [
        f"- command: `{r['command']}`",
        f"- seed {r['seed']}, {'quick' if r['quick'] else 'full'} mode, runtime {r['runtime_s']:.0f} s "
        f"({r['runtime_s'] / 60:.1f} min), started {r['started']}",
        f"- machine: {m['cpu']} ({m['cpu_count']} CPUs, torch threads {m['torch_threads']}, load average at "
        f"start {m.get('load_avg_at_start')}), {m['platform']}, Python {m['python']}, torch {r['torch_version']}",
        "- stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in r["stage_seconds"].items()),
        f"- model: {r['notes']['model']}; accuracy on the clean samples used here: validation "
        f"{_pct(r['model_accuracy']['val'], 2)}%, test {_pct(r['model_accuracy']['test'], 2)}%",
        f"- fit data: {r['notes']['fit']} ({s['fit']} images; held-out fit images: {s['heldout_fit']})",
        f"- validation: {r['notes']['validation']}",
        f"- OOD: {r['notes']['ood']}",
    ]
    if r.get("splits_cache", {}).get("dir"):
        c = r["splits_cache"]
        lines.append(f"- splits: validation {c.get('val')}, test {c.get('test')} (cache `{c['dir']}`; attacks, "
                     "seeds and sizes as without the cache)")
    if "caveat" in r["notes"]:
        lines.append(f"- **caveat: {r['notes']['caveat']}**")
    counts = []
    for split in ("val", "test"):
        c = s[split]
        counts.append([split] + [str(c.get(k, "–")) for k in
                                 ("clean_total", "clean_correct", "misclassified", *r["ood_sets"],
                                  "gaussian_unclipped", "noise",
                                  "pgd", "pgd_l2", "rotation", "bb", "bb_l2", "t_sce", "t_mse", "csa")])
    header = ["split", "clean", "clean correct", "misclassified", *r["ood_sets"], "gauss. unclipped", "noise", "PGD",
              "PGD L2",
              "rotation", "B&B", "B&B L2", "T-SCE", "T-MSE", "CSA"]
    return "\n".join(lines) + "\n\nSample counts (attacks: successful ones only):\n\n" + _table(header, counts)


def section_attacks(r: dict) -> str:
    rows = []
    for split in ("val", "test"):
        for k, a in r["attacks"][split].items():
            if a.get("not_run"):
                rows.append([split, k, "0", "0", "–", f"not run: {a['not_run']}"])
                continue
            p = ", ".join(f"{pk}={pv}" for pk, pv in a["params"].items())
            rows.append([split, k, str(a["tried"]), str(a["successful"]), _pct(a["success_rate"]),
                         f"{p}; {a['seconds']:.0f} s"])
    return _table(["split", "attack", "tried", "successful", "success %", "parameters; time"], rows)


def section_table1(r: dict) -> str:
    ds = r["dataset"]
    rows = []
    paper = PAPER_T1.get(ds, {})
    t1 = r["tables"]["table1"]
    for m in _methods(r):
        row = t1[m]
        vals = [_pct(row.get(k)) for k in T1_KEYS] + [_pct(row.get(k)) for k in ("auroc", "aupr_in", "aupr_out")]
        if m in PAPER_NAME and PAPER_NAME[m] in paper:
            rows.append([f"{PAPER_NAME[m]} (paper)", *[f"{v:.1f}" for v in paper[PAPER_NAME[m]]]])
        rows.append([f"**{m}** (ours)", *vals])
    n = r["samples"]["test"]
    n_ood = sum(n.get(k, 0) for k in r["ood_sets"])
    rows.append(["n (ours)", *[str(n.get(k, 0)) for k in T1_KEYS[:-1]], str(n_ood),
                 f"{t1['gga'].get('n_pooled', '–')} vs {n['clean']} clean", "", ""])
    cap = (f"TNR [%] at 95% TPR per type, pooled AUROC / AUPR-In / AUPR-Out [%] over all Table 1 types{_caveat(r)}. "
           "In-distribution = correctly classified clean test images. Noise = uniform noise in the ε-ball "
           "(successful only), OOD = the OOD sets pooled (" + ", ".join(r["ood_sets"]) + "). "
           "'–' = no sample of that type (see the counts).")
    return cap + "\n\n" + _table(["method", *T1_COLS], rows)


def section_per_type(r: dict) -> str:
    types = [*r["ood_sets"], "gaussian_unclipped", "noise", "pgd", "pgd_l2", "rotation", "bb", "bb_l2", "t_sce",
             "t_mse", "csa"]
    types = [t for t in types if any(r["methods"][m]["per_type"].get(t) for m in r["methods"])]
    rows = []
    for m in _methods(r):
        pt = r["methods"][m]["per_type"]
        rows.append([m] + [_pct(pt[t]["auroc"]) if pt.get(t) else "–" for t in types])
    return (f"Test AUROC [%] per type{_caveat(r)}:\n\n" + _table(["method", *types], rows))


def section_table2(r: dict) -> str:
    ds = r["dataset"]
    t2 = r["tables"]["table2"]
    rows = []
    if ds in PAPER_T2:
        rows.append(["GGA (paper)", *[f"{v:.1f}" for v in PAPER_T2[ds]]])
    for m in TABLE2_ROWS:
        if m in t2:
            rows.append([f"{m} (ours)", *[_pct(t2[m].get(k)) for k, _ in ADAPTIVE]])
    att = r["attacks"]["test"]
    counts = [f"{att[k]['successful']} of {att[k]['tried']}" if k in att else "–" for k, _ in ADAPTIVE]
    rows.append(["successful attacks (ours)", *counts])
    if ds in PAPER_CSA:
        rows.append(["successful attacks (paper)", "10,000 of 10,000", "10,000 of 10,000", PAPER_CSA[ds]])
    return (f"Detection rate [%] of successful adaptive attacks at 95% TPR on clean test images{_caveat(r)}:\n\n"
            + _table(["method", "T-SCE", "T-MSE", "CSA"], rows))


def section_table3(r: dict) -> str:
    rows = [[k, _pct(v["auroc"]), _pct(v["aupr_in"]), _pct(v["aupr_out"]),
             *[_pct(v.get(a)) for a, _ in ADAPTIVE]] for k, v in r["tables"]["table3"].items()]
    paper = [[f"CIFAR-100 {k} (paper)", *[f"{x:.1f}" for x in v], "", "", ""] for k, v in PAPER_T3_CIFAR100.items()]
    return (f"GGA (paper configuration otherwise) with top-N partial CSMs: pooled AUROC / AUPR-In / AUPR-Out [%] "
            f"over the Table 1 types and adaptive-attack detection rates [%]{_caveat(r)}. The paper's Table 3 is "
            "CIFAR-100 only (not available here); its rows are shown for the trend.\n\n"
            + _table(["CSM", "AUROC", "AUPR-In", "AUPR-Out", "T-SCE", "T-MSE", "CSA"], rows + paper))


def _pts(v, digits: int = 1) -> str:
    return "–" if v is None else f"{100 * v:+.{digits}f}"


def section_misclassification(r: dict) -> str:
    """Wrong vs right predictions on the clean test images, every method."""
    mis = r["tables"].get("misclassification", {})
    rows, ref = [], None
    for m in _methods(r):
        x = mis.get(m)
        if not x:
            continue
        ref = x
        flag = r["methods"][m].get("clean_all_flag_rate_at_alpha_0.05", {}).get("test")
        rows.append([f"**{m}**" if m in ("composite", "msp") else m, _pct(x["auroc"]), _num(100 * x["aurc"], 2),
                     _num(100 * x["risk_at_95_coverage"], 2), _pct(flag)])
    if not rows:
        return "No misclassified clean test image in this run: nothing to measure."
    rows.append(["perfect ranking", "100.0", _num(100 * ref["aurc_optimal"], 2),
                 _num(100 * ref["risk_at_95_coverage_optimal"], 2), ""])
    return (f"Telling wrong predictions from right ones on the clean test images{_caveat(r)}: "
            f"{ref['n_wrong']} misclassified vs {ref['n_right']} correctly classified (error rate "
            f"{_pct(ref['error_rate'], 2)}%). AUROC [%] of the score (wrong = positive); AURC [%] and risk at 95% "
            "coverage [%] accept the lowest scores first (lower is better); 'flag %' = share of ALL clean test "
            "images (right and wrong) with trust < 0.05, for the methods with a calibrated trust. The misclassified "
            "images are not part of the pooled AUROC of Table 1.\n\n"
            + _table(["method", "AUROC", "AURC", "risk @ 95% cov.", "flag %"], rows))


def section_composite(r: dict) -> str:
    """The composite detector vs its ablations vs GGA alone vs the best single baseline per column."""
    ab = r["tables"].get("ablation")
    c = r.get("composite")
    if not ab or not c:
        return "No composite in this run."
    cols = ab["columns"]
    names = {"noise": "Noise", "pgd": "PGD", "rotation": "Rotation", "bb": "B&B", "bb_l2": "B&B L2", "ood": "OOD",
             "pooled_auroc": "AUROC", "t_sce": "T-SCE", "t_mse": "T-MSE", "csa": "CSA",
             "misclassification_auroc": "mis. AUROC"}
    flags = c.get("clean_test_flag_rate_all", {})
    rows = []
    for m, vals in ab["rows"].items():
        flag = flags.get(m, r["methods"][m].get("clean_all_flag_rate_at_alpha_0.05", {}).get("test"))
        rows.append([f"**{m}**" if m == "composite" else m, *[_pct(vals[k]) for k in cols], _pct(flag)])
    for key, label in (("best_baseline", "best single baseline"), ("best_single_method", "best single method")):
        best = ab[key]
        rows.append([label, *[("–" if best[k] is None else f"{100 * best[k]['value']:.1f} ({best[k]['method']})")
                              for k in cols], ""])
    rows.append(["what GGA adds (composite − composite_no_gga, points)", *[_pts(ab["gga_adds"][k]) for k in cols],
                 ""])
    comp = ab["rows"].get("composite", {})
    gap = {k: comp[k] - ab["best_single_method"][k]["value"] for k in cols
           if comp.get(k) is not None and ab["best_single_method"].get(k)}
    rows.append(["composite − best single method (points)", *[_pts(gap.get(k)) for k in cols], ""])
    t = c.get("timing", {})
    ms = t.get("ms_per_sample", {})
    desc = r["methods"]["composite"]
    lines = [
        f"Composite (`CompositeDetector(model, top_n={c['top_n']}, layers=...)`, the served preset"
        f"{'' if c.get('matches_served_preset') else ' — WARNING: its config differs from the preset'}): "
        f"components {', '.join(desc.get('components', []))}; layers {', '.join(c['layers'])}; fit data: "
        f"{c['fit_data']} ({desc['fit']['n_fit']} fit, {desc['fit']['n_reference']} reference, "
        f"{desc['fit']['n_calibration']} calibration). Signals were computed once (the `plain` all-class CSM of "
        "the CSM stage + one forward pass for the layers); the detector's own pass on "
        f"{c['signals_check']['n']} test images gives the same statistic within "
        f"{c['signals_check']['max_abs_diff_statistic']:.2g}.",
        "",
        f"TNR [%] at 95% TPR per type, pooled AUROC [%] over the Table 1 types, misclassification AUROC [%] and "
        f"the flag rate [%] on all {c.get('clean_test_images', '?')} clean test images (right and wrong) at "
        f"alpha 0.05{_caveat(r)}. The ablations refit the composite without one part (same data, same "
        "calibration); `gga_in_composite` is GGA alone through the composite's calibration; `layers_sum` is the "
        "multi-layer Mahalanobis sum without OOD tuning (a baseline).",
        "",
        _table(["method", *[names.get(k, k) for k in cols], "flag %"], rows),
        "",
        f"- clean test flag rate of the composite at alpha 0.05: **{_pct(flags.get('composite'), 2)}%** of all "
        f"{c.get('clean_test_images', '?')} clean test images (target 5 ± 1%)",
    ]
    if ms:
        lines.append(f"- cost: composite {ms['composite']:.2f} ms / sample vs the `gga` preset at the same N = "
                     f"{t['top_n']} {ms['gga_preset']:.2f} ms / sample: **ratio "
                     f"{t['ratio_composite_to_gga_preset']:.3f}** (batch of {t['n_samples']}, {t['threads']} "
                     f"thread(s), best of {t['repeats_best_of']} interleaved repeats; the composite without GGA "
                     f"{ms.get('composite_no_gga', float('nan')):.2f} ms / sample)")
    for k, d in ((k, r["methods"][k]["description"]) for k in ab["rows"] if k in r["methods"]):
        lines.append(f"- `{k}`: {d}")
    lines += ["", "Against the targets of the composite's issue (test split, computed once):", "",
              _targets(r, gap, flags.get("composite"), t)]
    return "\n".join(lines)


def _targets(r: dict, gap: dict, flag, timing: dict) -> str:
    m = r["methods"]
    comp, t1, t2 = m["composite"], m["composite"]["table1"], m["composite"]["table2"]
    pt = comp["per_type"]

    def tnr(k):
        return _pct((pt.get(k) or {}).get("tnr_at_95_tpr"))

    rows = []
    if r["dataset"] == "mnist":
        rows += [["pooled AUROC", _pct(t1.get("auroc")), "≥ 99"],
                 ["Fashion-MNIST TNR at 95% TPR", tnr("fashion"), "≥ 99"],
                 ["PGD TNR", _pct(t1.get("pgd")), "≥ 95"]]
    else:
        rows += [["pooled AUROC", _pct(t1.get("auroc")), "≥ 98"],
                 ["PGD / T-SCE / CSA TNR", " / ".join(_pct(x) for x in (t1.get("pgd"), t2.get("t_sce"), t2.get("csa"))),
                  "≥ 95 / 90 / 90"]]
    t1_gaps = {k: v for k, v in gap.items() if k in T1_KEYS}
    if t1_gaps:
        worst = min(t1_gaps, key=t1_gaps.get)
        rows.append(["largest gap below the best single method over the Table 1 types",
                     f"{_pts(t1_gaps[worst])} ({worst})", "no more than 2 points below"])
    rows.append(["clean test flag rate at alpha 0.05", _pct(flag, 2), "5 ± 1"])
    mis_c, mis_m = (m["composite"].get("misclassification") or {}), (m["msp"].get("misclassification") or {})
    rows.append(["misclassification AUROC (composite vs MSP)",
                 f"{_pct(mis_c.get('auroc'))} vs {_pct(mis_m.get('auroc'))}", "≥ MSP's"])
    if timing:
        rows.append(["cost vs the gga preset (same N)", f"{timing['ratio_composite_to_gga_preset']:.3f}×", "≤ 1.1×"])
    return _table(["target", "composite", "target value"], rows)


def section_timing(r: dict) -> str:
    t = r["timing_ms_per_sample"]
    rows = [[k, f"{v:.2f}"] for k, v in t.items() if k not in ("n_samples", "repeats_best_of", "threads", "load_avg")]
    return (f"Wall time per sample [ms], batch of {t['n_samples']} clean test images, best of {t['repeats_best_of']}, "
            f"{t['threads']} torch thread(s), CPU ({r['machine']['cpu']}), on a machine shared with other work "
            f"(load average when timing: {t.get('load_avg')}; treat ratios as indicative):\n\n"
            + _table(["method", "ms / sample"], rows) + _composite_timing(r))


def _composite_timing(r: dict) -> str:
    t = r.get("composite", {}).get("timing")
    if not t:
        return ""
    rows = [[k, f"{v:.2f}"] for k, v in t["ms_per_sample"].items()]
    return (f"\n\nComposite vs the `gga` preset at the same N = {t['top_n']} (real `score` of each detector, batch of "
            f"{t['n_samples']}, {t['threads']} thread(s), best of {t['repeats_best_of']} repeats taken in turns; load "
            f"average {t.get('load_avg')}): ratio composite / gga preset = "
            f"**{t['ratio_composite_to_gga_preset']:.3f}**.\n\n" + _table(["detector", "ms / sample"], rows))


def section_validation(r: dict) -> str:
    v = r["validation"]
    out = [f"Criterion: {v['criterion']}. {r.get('validation_note', '')}", ""]
    ab = v["ablation"]["from_paper_config"]
    c = ab["center"]
    types = list(c["auroc"])
    rows = [["paper config: " + c["label"], _num(c["mean_auroc"]), "", *[_num(c["auroc"][t]) for t in types],
             _pct(c.get("clean_flag_rate"))]]
    for k, row in ab.items():
        if k == "center":
            continue
        rows.append([k, _num(row["mean_auroc"]), f"{row['delta_mean_auroc']:+.3f}",
                     *[_num(row["auroc"].get(t)) for t in types], _pct(row.get("clean_flag_rate"))])
    out += ["**One factor at a time from the paper configuration** (validation AUROC; flag rate = share of clean "
            "validation images with trust < 0.05, ideal 5%):", "",
            _table(["variant", "mean AUROC", "Δ", *types, "clean flag %"], rows), ""]
    sel = v["selected"]
    abs_ = v["ablation"]["from_selected"]
    c = abs_["center"]
    rows = [["selected: " + c["label"], _num(c["mean_auroc"]), "", *[_num(c["auroc"].get(t)) for t in types],
             _pct(c.get("clean_flag_rate"))]]
    for k, row in abs_.items():
        if k == "center":
            continue
        rows.append([k, _num(row["mean_auroc"]), f"{row['delta_mean_auroc']:+.3f}",
                     *[_num(row["auroc"].get(t)) for t in types], _pct(row.get("clean_flag_rate"))])
    out += [f"**One factor at a time from the validation-selected configuration** `{sel['label']}`:", "",
            _table(["variant", "mean AUROC", "Δ", *types, "clean flag %"], rows), ""]
    rows = []
    for factor, levels in v["ablation"]["main_effects"].items():
        for lv, st in levels.items():
            rows.append([factor, lv, _num(st["mean_of_mean_auroc"]), _num(st["best"]), str(st["cells"])])
    out += ["**Main effects over the whole factorial** (mean and best of the mean validation AUROC over all "
            "cells with that level):", "", _table(["factor", "level", "mean", "best", "cells"], rows), ""]
    rows = [[f["label"], _num(f["mean_auroc"]), _num(f["mean_tnr"]), _num(f.get("pooled_auroc")),
             _pct(f.get("clean_flag_rate"))] for f in v["factorial"][:12]]
    out += [f"**Top 12 of {len(v['factorial'])} factorial cells**:", "",
            _table(["configuration", "mean AUROC", "mean TNR@95", "pooled AUROC", "clean flag %"], rows), ""]
    rows = [[k, _num(x["mean_auroc"]), _num(x["mean_tnr"]), *[_num(x["auroc"].get(t)) for t in types]]
            for k, x in v["references"].items()]
    out += ["**Reference scores on the same validation sets**:", "",
            _table(["score", "mean AUROC", "mean TNR@95", *types], rows), ""]
    for fam, feats in v["single_feature_auroc"].items():
        rows = [[f, *[_num(a.get(t)) for t in types]] for f, a in feats.items()]
        out += [f"**Single features as scores, family `{fam}`** (validation AUROC with the raw feature as the "
                "score; < 0.5 means the feature is LOWER on anomalies):", "", _table(["feature", *types], rows), ""]
    rows = [[_num(c["calibration_fraction"], 1), str(c["n_fit"]), str(c["n_calibration"]), _num(c["mean_auroc"]),
             _pct(c.get("clean_flag_rate"))] for c in v["calibration_fraction"]]
    out += ["**Calibration fraction** for the selected configuration (validation):", "",
            _table(["calibration fraction", "LODA fit", "calibration", "mean AUROC", "clean flag %"], rows), ""]
    return "\n".join(out)


def section_diagnostics(r: dict) -> str:
    d = r["diagnostics"]
    sat = d["saturated_fraction"]
    rows = [[k, _pct(v)] for k, v in sat.items()]
    out = ["**Softmax saturation**: share of inputs whose float32 max softmax probability is exactly 1.0. For "
           "them a naive float32 predicted-class cotangent p − e_k̂ has p_k̂ − 1 = 0, so the predicted-class "
           "saliency loses its −(1 − p_k̂)∇z_k̂ term and S2 is computed from the wrong direction (the official "
           "code, and this library before its fix; family `naive` here). The library's cotangents are "
           f"cancellation-free in this run: **{'yes' if r.get('library_cotangents_precise') else 'no'}**.",
           "", _table(["set", "saturated %"], rows), ""]
    names = ["s1_mean", "s1_max", "s1_min", "s1_std", "s1_en", "s2_mean", "s2_max", "s2_min", "s2_std", "s2_en"]
    for fam, per in d["mean_features"].items():
        rows = [[k, *[f"{x:.3f}" for x in v]] for k, v in per.items()]
        out += [f"Mean features, family `{fam}`:", "", _table(["set", *names], rows), ""]
    return "\n".join(out)


def section_findings(r: dict) -> str:
    """Numbers-driven statements (true for any run), then the recommendation."""
    v = r["validation"]
    ab = v["ablation"]["from_paper_config"]
    base = ab["center"]["mean_auroc"]
    lines = [f"Validation mean AUROC of the paper configuration: {base:.3f}. Changing one factor at a time:"]
    deltas = sorted(((k, x["delta_mean_auroc"]) for k, x in ab.items() if k != "center"), key=lambda kv: -kv[1])
    for k, d in deltas:
        lines.append(f"- `{k}`: {d:+.3f}")
    refs = v["references"]
    best_ref = max(refs.items(), key=lambda kv: kv[1]["mean_auroc"])
    lines.append(f"- best non-GGA reference on validation: `{best_ref[0]}` {best_ref[1]['mean_auroc']:.3f}; "
                 f"`neg_s1_mean[plain]` {refs.get('neg_s1_mean[plain]', {}).get('mean_auroc', float('nan')):.3f}")
    sel = v["selected"]
    test = r["methods"]["gga_selected"]
    paper = r["methods"]["gga"]
    lines += ["", f"Selected on validation: `{sel['label']}` (mean AUROC {sel['summary']['mean_auroc']:.3f}, "
                  f"clean flag rate {_pct(sel['summary'].get('clean_flag_rate'))}%). On test (computed once): "
                  f"pooled AUROC {_pct(test['table1'].get('auroc'))}% vs {_pct(paper['table1'].get('auroc'))}% "
                  f"for the paper configuration; clean test flag rate "
                  f"{_pct(test['clean_flag_rate_at_alpha_0.05']['test'])}% (paper config "
                  f"{_pct(paper['clean_flag_rate_at_alpha_0.05']['test'])}%)."]
    return "\n".join(lines)


def section_notes(r: dict) -> str:
    common = [
        "Gaussian noise: the paper says 'each pixel value is drawn i.i.d. from a uniform distribution with unit "
        "variance', which is self-contradictory. We use N(0.5, 1) per pixel, clipped to [0, 1] (`gaussian`, pooled "
        "into OOD; about 62% of the pixels end up exactly 0 or 1), and report the unclipped N(0.5, 1) "
        "(`gaussian_unclipped`) separately (not pooled).",
        "Table 1 'Noise' is read as the uniform-noise attack in the ε-ball (section 4.2.4), successful (label-"
        "changing) samples only; with ε = 0.3 on MNIST very few are successful, so that column rests on a handful "
        "of samples (see the counts). The noise OOD sets are in the 'OOD' column.",
        "Pooled AUROC / AUPR: all samples of the Table 1 types (noise, PGD ℓ∞, rotation, B&B ℓ∞/ℓ2, OOD sets) "
        "against the clean test images. PGD ℓ2, T-SCE, T-MSE and CSA are reported separately.",
        "ODIN: T = 1000, ε = 0.0014 in [0, 1] pixel units (the model takes raw pixels; the official ODIN "
        "code divides the step by the normalisation std, i.e. a smaller step in pixel units).",
        "Mahalanobis: one layer (penultimate), no input pre-processing and no logistic-regression ensemble tuned "
        "on OOD / adversarial data, unlike the paper's 'Maha' (Lee et al.), which explains a large part of that "
        "row's gap. The pseudo-inverse of the tied covariance follows dead / near-constant ReLU units, whose tiny "
        "eigenvalues dominate the distance.",
        "The paper's numbers use 10,000 test samples per type and its own trained models; ours use the counts above "
        "(TNR of small sets has a standard error of sqrt(p(1−p)/n), e.g. ±9 points at n = 30).",
        "Misclassification: the clean test images the model gets wrong (set `misclassified`, derived from the "
        "clean sources and the model, also for cached splits) against the correctly classified ones; AUROC, AURC "
        "and risk at 95% coverage with `detectors.metrics` (ties in the score share their errors pro rata).",
        "Composite: fitted from signals computed once (fit_signals / score_signals); every variant is "
        "`CompositeDetector(model, top_n=5, layers=..., **overrides)` with the served preset's defaults, on the same "
        "fit data as GGA. Its truncated Fisher statistic is 0 for inputs whose component p-values all exceed the "
        "truncation point (tau = 0.1) except the margin's: the variants without the margin (`gga_in_composite`, "
        "`composite_no_logits`) therefore tie many clean inputs at 0, which costs AUROC but not TNR at 95% TPR.",
        "CSM 'families' (how the gradients are taken): " + "; ".join(
            f"`{k}` = {v}" for k, v in r.get("families", {}).items()) + ". The differentiable rescaling makes "
        "the predicted logit constant (= 10) whenever it holds the max |z|, so ∇z'_k̂ = 0 and the shared term "
        "that aligns the non-predicted saliencies disappears (S1 of clean inputs drops from about +0.5 to about "
        "−0.07 on MNIST).",
    ]
    return "\n".join(f"- {c}" for c in common)


# ---------------------------------------------------------------- figures


def _roc(s_in: np.ndarray, s_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.concatenate([s_in, s_out])
    lab = np.concatenate([np.zeros(len(s_in)), np.ones(len(s_out))])
    order = np.argsort(-scores, kind="stable")
    s, lab = scores[order], lab[order]
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]
    tp = np.cumsum(lab)[last]
    fp = np.cumsum(1 - lab)[last]
    return np.r_[0, fp / len(s_in)], np.r_[0, tp / len(s_out)]


def make_figures(out_dir: Path, ds: str, r: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arr = dict(np.load(out_dir / f"{ds}_arrays.npz"))
    files = []
    # ROC per type
    types = [*r["ood_sets"], "noise", "pgd", "pgd_l2", "rotation", "bb", "bb_l2", "t_sce", "t_mse", "csa"]
    types = [t for t in types if len(arr.get(f"score|gga|test|{t}", [])) > 0]
    cols = 4
    rows_ = (len(types) + cols - 1) // cols
    fig, axes = plt.subplots(rows_, cols, figsize=(3.2 * cols, 3.0 * rows_), squeeze=False)
    for ax, t in zip(axes.flat, types, strict=False):
        for m, style in (("gga", "-"), ("gga_selected", "-."), ("msp", "--"), ("neg_s1_mean", ":"),
                         ("composite", "-")):
            if f"score|{m}|test|clean" not in arr:
                continue
            s_in, s_out = arr[f"score|{m}|test|clean"], arr[f"score|{m}|test|{t}"]
            fpr, tpr = _roc(s_in.astype(np.float64), s_out.astype(np.float64))
            ax.plot(fpr, tpr, style, label=m)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.5)
        ax.axvline(0.05, color="grey", lw=0.5, ls=":")
        ax.set_title(f"{t} (n={len(arr[f'score|gga|test|{t}'])})", fontsize=9)
        ax.set_xlabel("FPR on clean", fontsize=8)
        ax.set_ylabel("detection rate", fontsize=8)
    for ax in list(axes.flat)[len(types):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{TITLES[ds]}: ROC per type, GGA (paper config / validation-selected), MSP, -mean(S1), composite"
                 + (" [JPEG-q75 test copy]" if ds == "cifar10" else ""), fontsize=10)
    fig.tight_layout()
    name = f"{ds}_roc.png"
    fig.savefig(out_dir / name, dpi=110)
    plt.close(fig)
    files.append(name)
    # example CSMs (Figure 1)
    keys = [k.split("|")[2] for k in arr if k.startswith("example|csm|")]
    if keys:
        fig, axes = plt.subplots(2, len(keys), figsize=(2.3 * len(keys), 4.8), squeeze=False)
        for i, k in enumerate(keys):
            img = arr[f"example|image|{k}"]
            img = img[0] if img.shape[0] == 1 else np.clip(img.transpose(1, 2, 0), 0, 1)
            axes[0, i].imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
            axes[0, i].set_title(f"{k}\npred {int(arr[f'example|pred|{k}'])}", fontsize=9)
            axes[0, i].axis("off")
            im = axes[1, i].imshow(arr[f"example|csm|{k}"], cmap="coolwarm", vmin=-1, vmax=1)
            axes[1, i].set_xticks(range(10))
            axes[1, i].set_yticks(range(10))
            axes[1, i].tick_params(labelsize=6)
        fig.colorbar(im, ax=axes[1, :].tolist(), shrink=0.8)
        fig.suptitle(f"{TITLES[ds]}: inputs and their CSMs (all classes, class order, plain gradients)", fontsize=10)
        name = f"{ds}_csm_examples.png"
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        files.append(name)
    # Figure 2: box plots of mean(S1) and the softmax score per data type (validation)
    sets = [k.split("|")[2] for k in arr if k.startswith("box|s1_mean|")]
    sets = [s for s in sets if len(arr[f"box|s1_mean|{s}"]) > 0]
    panels = [("s1_mean", "mean of S1"), ("softmax", "max softmax probability")]
    if f"box|margin|{sets[0]}" in arr:
        panels.append(("margin", "logit margin log(p/(1-p)), float64"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4))
    for ax, (what, title) in zip(axes, panels, strict=True):
        ax.boxplot([arr[f"box|{what}|{s}"] for s in sets], whis=(2.5, 97.5), showfliers=False)
        ax.set_xticks(range(1, len(sets) + 1))
        ax.set_xticklabels(sets, rotation=45, ha="right", fontsize=8)
        ax.set_title(title)
    fig.suptitle(f"{TITLES[ds]} validation sets: boxes = quartiles, whiskers = 2.5–97.5 percentiles (paper Fig. 2)",
                 fontsize=10)
    fig.tight_layout()
    name = f"{ds}_s1_box.png"
    fig.savefig(out_dir / name, dpi=110)
    plt.close(fig)
    files.append(name)
    return files


# ---------------------------------------------------------------- assembly


def render(out_dir: Path, figures: bool = True, discussion: str | None = None) -> str:
    results = {ds: json.loads((out_dir / f"{ds}.json").read_text()) for ds in DATASETS
               if (out_dir / f"{ds}.json").exists()}
    parts = ["# GGA reproduction report",
             "",
             "Generated by `python -m benchmarks.report` from the JSON files of `python -m benchmarks.reproduce` "
             "(Schwinn et al., 'Identifying Untrustworthy Predictions in Neural Networks by Geometric Gradient "
             "Analysis', UAI 2021). All numbers below are ours unless a row says '(paper)'. Higher score = more "
             "anomalous for every method. Model choices are made on validation data only; test numbers are "
             "computed once.", ""]
    if discussion:
        parts += [discussion, ""]
    ablation = out_dir / "adaptive_ablation.md"  # python -m benchmarks.adaptive.ablation
    if ablation.exists():
        parts += [ablation.read_text(), ""]
    for ds, r in results.items():
        t = TITLES[ds]
        parts += [f"## {t}" + (" — JPEG-q75 test copy, cross-data-set OOD (not SVHN)" if ds == "cifar10" else ""), ""]
        if r["quick"]:
            parts += ["> **Quick mode**: a few hundred samples and shortened attacks; a smoke test, not a result.", ""]
        parts += ["### Run", "", section_run(r), "",
                  "### Table 1", "", section_table1(r), "",
                  "### All types (AUROC)", "", section_per_type(r), "",
                  "### Table 2 (adaptive attacks)", "", section_table2(r), "",
                  "### Table 3 (top-N)", "", section_table3(r), "",
                  "### Composite detector and ablations", "", section_composite(r), "",
                  "### Misclassification (wrong vs right, clean test)", "", section_misclassification(r), "",
                  "### Timing", "", section_timing(r), "",
                  "### Attacks", "", section_attacks(r), "",
                  "### Investigation on the validation split", "", section_validation(r), "",
                  "### Diagnostics", "", section_diagnostics(r), "",
                  "### Summary of the validation evidence", "", section_findings(r), ""]
        if figures:
            try:
                files = make_figures(out_dir, ds, r)
                parts += ["### Figures", ""] + [f"![{f}]({f})" for f in files] + [""]
            except ImportError:
                parts += ["### Figures", "", "Figures skipped: matplotlib is not installed "
                          "(`pip install 'gga-trust[eval]'` or `pip install matplotlib`).", ""]
        parts += ["### Protocol notes", "", section_notes(r), ""]
    return "\n".join(parts)


def write_report(out_dir: Path, figures: bool = True) -> Path:
    out_dir = Path(out_dir)
    disc = out_dir / "DISCUSSION.md"
    text = render(out_dir, figures, disc.read_text() if disc.exists() else None)
    path = out_dir / "REPORT.md"
    path.write_text(text)
    print(f"wrote {path}", flush=True)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--no-figures", action="store_true")
    args = p.parse_args(argv)
    write_report(args.results, figures=not args.no_figures)


if __name__ == "__main__":
    main()
