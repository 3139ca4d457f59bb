"""Outputs of the reproduction: diagnostics, the arrays behind the figures, JSON cleaning."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from benchmarks.repro.csms import CSMStore
from benchmarks.repro.setup import Setup, Split
from detectors.signals import logit_margin

FIGURE_METHODS = ("gga", "msp", "gga_selected", "neg_s1_mean", "mahalanobis", "composite", "composite_no_gga")


def _diagnostics(store: CSMStore, setup: Setup, splits: dict[str, Split]) -> dict:
    """Softmax saturation (fp32 p_max == 1, where a naive float32 predicted-class cotangent loses its
    −(1 − p_k̂) term) and mean features per set and family."""
    out: dict = {"saturated_fraction": {}, "mean_features": {}}
    keys = ["fit"] + (["heldout"] if ("plain", "heldout") in store.data else []) + \
           [f"{sp.name}/{k}" for sp in splits.values() for k in sp.sets]
    for key in keys:
        d = store.data.get(("plain", key))
        if d is None or len(d["logits"]) == 0:
            continue
        p = torch.softmax(d["logits"].float(), dim=1).amax(dim=1)
        out["saturated_fraction"][key] = round(float((p == 1.0).float().mean()), 4)
    for fam in setup.families:
        out["mean_features"][fam] = {}
        for key in keys:
            if (fam, key) in store.data and len(store.data[(fam, key)]["logits"]):
                f = store.features(fam, key)
                out["mean_features"][fam][key] = [round(float(v), 4) for v in f.mean(dim=0)]
    return out


def _save_arrays(path: Path, scores, store: CSMStore, splits: dict[str, Split], setup: Setup) -> None:
    """Scores behind the figures: ROC (test), box plots (validation), example CSMs (test)."""
    arrays = {}
    for m in FIGURE_METHODS:
        if m not in scores:
            continue
        for k, v in scores[m]["test"].items():
            arrays[f"score|{m}|test|{k}"] = v.astype(np.float32)
    for k in splits["val"].sets:
        d = store.data[("plain", f"val/{k}")]
        arrays[f"box|s1_mean|{k}"] = store.features("plain", f"val/{k}")[:, 0].numpy().astype(np.float32)
        arrays[f"box|softmax|{k}"] = torch.softmax(d["logits"].float(), 1).amax(1).numpy().astype(np.float32)
        arrays[f"box|margin|{k}"] = logit_margin(d["logits"]).numpy().astype(np.float32)
    for k in ["clean", *setup.ood_sets, "pgd", "rotation", "t_sce", "csa"]:
        sp = splits["test"]
        if k not in sp.sets or len(sp.sets[k]) == 0:
            continue
        d = store.data[("plain", f"test/{k}")]
        cls = d["classes"][0]
        inv = torch.argsort(cls)
        arrays[f"example|csm|{k}"] = d["csm"][0][inv][:, inv].numpy()  # rows/cols in class order 0..C-1
        arrays[f"example|image|{k}"] = sp.sets[k][0].numpy()
        arrays[f"example|pred|{k}"] = np.array(int(cls[0]))
    np.savez_compressed(path, **arrays)


def _clean_json(obj):
    if isinstance(obj, dict):
        return {str(k): _clean_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean_json(v) for v in obj]
    if isinstance(obj, float):
        return None if not math.isfinite(obj) else round(obj, 6)
    if isinstance(obj, np.floating | np.integer):
        return _clean_json(obj.item())
    return obj


