"""Model selection on the VALIDATION split: the factorial over the GGA choices (family,
top-N, channel reduction, softmax / margin feature, bins, standardisation, fit data),
single-score references, single features, the calibration fraction, and the
one-factor-at-a-time ablations. The test split is never read here.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from benchmarks.repro.csms import CSMStore
from benchmarks.repro.evaluate import val_summary
from benchmarks.repro.methods import GGABank, GGAVariant
from benchmarks.repro.setup import Log, Setup, Split


@dataclass
class Validation:
    bank: GGABank
    paper_variant: GGAVariant
    selected: GGAVariant
    best: dict
    ranked: list[dict]
    refs: dict
    single: dict
    calib: list[dict]
    ablation: dict
    top_ns: list
    other_bins: int


def run_validation(setup: Setup, splits: dict[str, Split], store: CSMStore, baseline_scores: dict, seed: int,
                   has_heldout: bool, log: Log) -> Validation:
    """``baseline_scores``: {method: {split: {set: scores}}} of the baselines (references here)."""
    C = setup.num_classes
    bank = GGABank(setup, store, seed)
    other_bins = 500 if setup.paper_bins == 100 else 100
    top_ns = [None] + [n for n in (5, 3) if n < C]
    channels = [None, "max"] if setup.channel_variants else [None]
    fits = ["train", "train_matched", "heldout"] if has_heldout else ["train"]
    grid = [GGAVariant(fam, tn, ch, sm, mg, b, st, fo)
            for fam, tn, ch, sm, mg, b, st, fo in itertools.product(
                setup.families, top_ns, channels, (False, True), (False, True), (setup.paper_bins, other_bins),
                (True, False), fits)]
    log.info(f"{len(grid)} factorial cells")
    factorial = []
    val = splits["val"]
    for i, v in enumerate(grid):
        sc, trust_clean = {}, None
        for k in val.sets:
            s, tr = bank.scores(v, "val", k)
            sc[k] = s
            if k == "clean":
                trust_clean = tr
        factorial.append({"label": v.label(), "config": v.as_dict(), **val_summary(sc, setup.ood_sets, trust_clean)})
        log.bar("factorial", i + 1, len(grid))
    # single-score references on validation
    refs = {}
    for mname, sc in baseline_scores.items():
        refs[mname] = val_summary(sc["val"], setup.ood_sets, None)
    for fam in setup.families:
        refs[f"neg_s1_mean[{fam}]"] = val_summary(
            {k: -store.features(fam, f"val/{k}")[:, 0].numpy() for k in val.sets}, setup.ood_sets, None)
    # single features: AUROC with the raw feature as the score (< 0.5: the feature drops for anomalies)
    single = {}
    fnames = ["s1_mean", "s1_max", "s1_min", "s1_std", "s1_energy", "s2_mean", "s2_max", "s2_min", "s2_std",
              "s2_energy", "softmax_max", "logit_margin"]
    for fam in setup.families:
        fv = {k: store.features(fam, f"val/{k}", softmax=True, margin=True).numpy() for k in val.sets}
        single[fam] = {}
        for j, fn in enumerate(fnames):
            single[fam][fn] = val_summary({k: a[:, j] for k, a in fv.items()}, setup.ood_sets, None)["auroc"]
    paper_variant = GGAVariant(family="plain", bins=setup.paper_bins)
    ranked = sorted(factorial, key=lambda r: (-r["mean_auroc"], -r["mean_tnr"]))
    best = ranked[0]
    selected = _variant_from(best["config"])
    # calibration fraction for the selected configuration (validation only)
    calib = []
    for cf in (0.1, 0.2, 0.3, 0.5):
        v = GGAVariant(**{**selected.__dict__, "calibration_fraction": cf})
        sc = {k: bank.scores(v, "val", k)[0] for k in val.sets}
        tr = bank.scores(v, "val", "clean")[1]
        det = bank.detector(v)
        calib.append({"calibration_fraction": cf, "n_fit": det.fit_stats.n_fit,
                      "n_calibration": det.fit_stats.n_calibration,
                      **val_summary(sc, setup.ood_sets, tr)})
    levels = {"family": list(setup.families), "top_n": top_ns, "channel": channels, "softmax": [False, True],
              "margin": [False, True],
              "bins": [setup.paper_bins, other_bins], "standardize": [True, False], "fit_on": fits}
    ablation = _ablation(factorial, paper_variant, selected, levels)
    return Validation(bank, paper_variant, selected, best, ranked, refs, single, calib, ablation, top_ns,
                      other_bins)


def _variant_from(cfg: dict) -> GGAVariant:
    return GGAVariant(family=cfg["family"], top_n=cfg["top_n"], channel=cfg["channel_reduce"],
                      softmax=cfg["include_softmax"], margin=cfg["include_margin"], bins=cfg["n_bins"],
                      standardize=cfg["standardize"],
                      fit_on=cfg["fit_on"], calibration_fraction=cfg["calibration_fraction"])


def _ablation(factorial: list[dict], base: GGAVariant, selected: GGAVariant, levels: dict[str, list]) -> dict:
    """Validation evidence per factor: one factor changed at a time from the paper configuration and
    from the selected one, and main effects (mean over all factorial cells at each level)."""
    by_label = {r["label"]: r for r in factorial}

    def one_at_a_time(center: GGAVariant) -> dict:
        c = by_label[center.label()]
        out = {"center": {"label": center.label(), "mean_auroc": c["mean_auroc"], "mean_tnr": c["mean_tnr"],
                          "auroc": c["auroc"], "clean_flag_rate": c.get("clean_flag_rate")}}
        for factor, opts in levels.items():
            for level in opts:
                if level == getattr(center, factor):
                    continue
                r = by_label.get(GGAVariant(**{**center.__dict__, factor: level}).label())
                if r is None:
                    continue
                out[f"{factor}={level}"] = {
                    "label": r["label"], "mean_auroc": r["mean_auroc"], "mean_tnr": r["mean_tnr"],
                    "auroc": r["auroc"], "delta_mean_auroc": r["mean_auroc"] - c["mean_auroc"],
                    "clean_flag_rate": r.get("clean_flag_rate")}
        return out

    fields = {"family": "family", "top_n": "top_n", "channel": "channel_reduce", "softmax": "include_softmax",
              "margin": "include_margin",
              "bins": "n_bins", "standardize": "standardize", "fit_on": "fit_on"}
    main = {}
    for factor, ck in fields.items():
        cells: dict[str, list[float]] = {}
        for r in factorial:
            cells.setdefault(str(r["config"][ck]), []).append(r["mean_auroc"])
        if len(cells) > 1:
            main[factor] = {lv: {"mean_of_mean_auroc": float(np.mean(v)), "best": float(np.max(v)), "cells": len(v)}
                            for lv, v in cells.items()}
    return {"from_paper_config": one_at_a_time(base), "from_selected": one_at_a_time(selected),
            "main_effects": main}

