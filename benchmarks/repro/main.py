"""The reproduction pipeline: stages in order, then the JSON, the arrays and the report."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

import benchmarks.repro as package
from benchmarks.repro import composite_stage as CS
from benchmarks.repro.attacks_stage import get_split
from benchmarks.repro.csms import FAMILY_TEXT, CSMStore, default_families, library_cotangents_precise
from benchmarks.repro.evaluate import _time_ms, evaluate, val_summary
from benchmarks.repro.methods import BASELINE_TEXT, declared_variants, fit_baselines, score_baselines
from benchmarks.repro.output import _clean_json, _diagnostics, _save_arrays
from benchmarks.repro.setup import (
    ADAPTIVE,
    DEFAULT_OUT,
    TABLE1,
    VAL_TYPES,
    Log,
    load_cifar,
    load_mnist,
    machine_info,
    resolve_sizes,
)
from benchmarks.repro.validation import run_validation

# the ablation table: the composite, its ablations, the layer sum, GGA (paper / validation-selected)
ABLATION_ROWS = ("composite", *CS.ABLATIONS, "layers_sum", "gga", "gga_selected")
# single-score baselines for "the best baseline per type" (layers_sum: the multi-layer Mahalanobis sum)
BASELINES = ("msp", "odin", "energy", "mahalanobis", "layers_sum", "neg_s1_mean")
COMPOSITES = tuple(n for n in CS.VARIANTS if n != "layers_sum")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=package.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=("mnist", "cifar10"), required=True)
    p.add_argument("--data-dir", type=Path, required=True, help="the shared data folder (../shared/data)")
    p.add_argument("--quick", action="store_true", help="a few hundred samples, short attacks, no B&B")
    p.add_argument("--n-test", type=int, default=None, help="clean in-distribution test samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="read each split from <dir>/<dataset>_<split>.pt when its key (seed, sizes, mode) matches, "
                        "else build it and save it there (default: build, save nothing); "
                        "python -m benchmarks.splits builds the caches alone")
    p.add_argument("--model-dir", type=Path, default=None, help="MNIST model folder (default: service/default_model)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--families", nargs="+", choices=tuple(FAMILY_TEXT), default=None,
                   help="gradient families to compute (default: plain rescale, and naive when the library has "
                        "the cancellation-free cotangents, else precise)")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--no-report", action="store_true", help="write the JSON only")
    for name in ("n_ood", "n_attack", "n_targeted", "n_bb", "n_csa", "n_fit", "n_val", "n_val_ood", "n_val_attack",
                 "n_val_fit", "pgd_steps", "targeted_steps", "csa_steps", "bb_steps"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    return p.parse_args(argv)


def _row_values(results: dict, name: str) -> dict:
    """The values of the ablation table for one method (all "higher = better", fractions)."""
    r = results[name]
    out = {k: r["table1"].get(k) for k, _ in TABLE1}
    out["pooled_auroc"] = r["table1"].get("auroc")
    out.update({k: r["table2"].get(k) for k, _ in ADAPTIVE})
    out["misclassification_auroc"] = (r.get("misclassification") or {}).get("auroc")
    return out


def ablation_table(results: dict) -> dict:
    """Composite vs its ablations vs GGA alone vs the best single baseline / single method per column."""
    rows = {m: _row_values(results, m) for m in ABLATION_ROWS if m in results}
    cols = list(next(iter(rows.values())))

    def best(names) -> dict:
        vals = {m: _row_values(results, m) for m in names if m in results}
        out = {}
        for c in cols:
            cand = [(r[c], m) for m, r in vals.items() if r[c] is not None]
            out[c] = {"method": max(cand)[1], "value": max(cand)[0]} if cand else None
        return out

    singles = [m for m in results if m not in COMPOSITES]
    comp, no_gga = rows.get("composite"), rows.get("composite_no_gga")
    gga_adds = {c: (comp[c] - no_gga[c]) if comp and no_gga and comp[c] is not None and no_gga[c] is not None
                else None for c in cols}
    return {"columns": cols, "rows": rows, "best_baseline": best(BASELINES), "best_single_method": best(singles),
            "gga_adds": gga_adds,
            "note": "fractions; TNR at 95% TPR per type (Table 1 types and T-SCE / T-MSE / CSA), pooled AUROC over "
                    "the Table 1 types, misclassification AUROC (wrong vs right, clean test). gga_adds = composite "
                    "minus composite_no_gga. best_baseline over " + ", ".join(BASELINES) +
                    "; best_single_method over every method that is not a composite"}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    sizes = resolve_sizes(args)
    log = Log()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    machine = machine_info()
    log.stage(f"load {args.dataset} ({'quick' if args.quick else 'full'} mode)")
    setup = (load_mnist if args.dataset == "mnist" else load_cifar)(args, sizes)
    # plain is the library default: always
    setup.families = tuple(dict.fromkeys(("plain", *(args.families or default_families()))))
    model = setup.model
    for prm in model.parameters():
        prm.requires_grad_(False)

    log.stage("attacks and OOD sets" + (f" (cache {args.cache_dir})" if args.cache_dir else ""))
    splits = {name: get_split(setup, name, sizes, args, log, args.cache_dir) for name in ("val", "test")}
    has_heldout = setup.heldout_x is not None and len(setup.heldout_x) > 0
    batch = 250 if setup.dataset == "mnist" else 50

    # ---------------------------------------------------------------- CSMs, once per family
    log.stage("CSMs (one gradient pass per family and set)")
    store = CSMStore(model, setup.channel_variants, batch, log)
    for fam in setup.families:
        store.compute(fam, "fit", setup.fit_x)
        if has_heldout:
            store.compute(fam, "heldout", setup.heldout_x)
        for sp in splits.values():
            for k, v in sp.sets.items():
                store.compute(fam, f"{sp.name}/{k}", v)
    log.info("CSM seconds per family: " + ", ".join(f"{k} {v:.0f}" for k, v in store.seconds.items()))

    # ---------------------------------------------------------------- baselines
    log.stage("baselines (MSP, ODIN, energy, Mahalanobis)")
    baselines = fit_baselines(setup)
    scores = score_baselines(baselines, splits, log)

    # ---------------------------------------------------------------- validation factorial
    log.stage("validation: factorial over GGA choices")
    v = run_validation(setup, splits, store, scores, args.seed, has_heldout, log)
    bank, selected, top_ns = v.bank, v.selected, v.top_ns

    # ---------------------------------------------------------------- test: pre-declared methods + selected
    log.stage("test: methods and variants")
    variants = declared_variants(setup, v.paper_variant, selected, top_ns, v.other_bins, has_heldout)
    test = splits["test"]
    flag_rates: dict[str, dict] = {}
    flag_rates_all: dict[str, dict] = {}
    for name, (gv, _) in variants.items():
        scores[name] = {"val": {}, "test": {}}
        for sp in splits.values():
            trust = {}
            for k in sp.sets:
                s, trust[k] = bank.scores(gv, sp.name, k)
                scores[name][sp.name][k] = s
            flag_rates.setdefault(name, {})[sp.name] = float(np.mean(trust["clean"] < 0.05))
            every = np.concatenate([trust["clean"], trust.get("misclassified", np.empty(0))])
            flag_rates_all.setdefault(name, {})[sp.name] = float(np.mean(every < 0.05))
    scores["neg_s1_mean"] = {sp.name: {k: -store.features("plain", f"{sp.name}/{k}")[:, 0].numpy()
                                       for k in sp.sets} for sp in splits.values()}

    # ---------------------------------------------------------------- composite and ablations
    log.stage("composite and ablations")
    comp = CS.run_composite(setup, splits, store, args.seed, batch, log)
    scores.update(comp.scores)

    descriptions = {**BASELINE_TEXT, **{k: d for k, (_, d) in variants.items()},
                    **{k: d for k, (_, d) in CS.VARIANTS.items()}}
    results = {}
    for name in scores:
        ev_test = evaluate(scores[name]["test"], setup.ood_sets)
        results[name] = {"description": descriptions[name], **ev_test,
                         "validation": val_summary(scores[name]["val"], setup.ood_sets, None)}
        if name in variants:
            results[name]["config"] = variants[name][0].as_dict()
            results[name]["clean_flag_rate_at_alpha_0.05"] = flag_rates[name]
            results[name]["clean_all_flag_rate_at_alpha_0.05"] = flag_rates_all[name]
        if name in comp.info:
            info = comp.info[name]
            results[name]["config"] = info["config"]
            results[name]["components"] = info["components"]
            results[name]["fit"] = info["fit"]
            fr = info["clean_flag_rates"]
            results[name]["clean_flag_rate_at_alpha_0.05"] = {s: fr[s]["correct_clean"] for s in fr}
            results[name]["clean_all_flag_rate_at_alpha_0.05"] = {s: fr[s]["all_clean"] for s in fr}

    table3 = {}
    for label, tn in [("top-C (all)", None)] + [(f"top-{n}", n) for n in top_ns[1:]]:
        name = "gga" if tn is None else f"gga_top{tn}"
        r = results[name]["table1"]
        table3[label] = {"auroc": r.get("auroc"), "aupr_in": r.get("aupr_in"), "aupr_out": r.get("aupr_out"),
                         **{k: results[name]["table2"][k] for k, _ in ADAPTIVE}}

    # ---------------------------------------------------------------- timing
    log.stage("timing (ms per sample)")
    n_time = 64 if args.quick else (256 if setup.dataset == "mnist" else 32)
    xt = test.sets["clean"][:n_time]
    reps = 3 if setup.dataset == "mnist" and not args.quick else 1
    timing = {"n_samples": len(xt), "repeats_best_of": reps, "threads": torch.get_num_threads(),
              "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    with torch.no_grad():
        timing["forward_only"] = _time_ms(lambda a: model(a), xt, reps)
    for mname, det in baselines.items():
        timing[mname] = _time_ms(lambda a, det=det: det.anomaly_score(a, batch_size=len(a)), xt, reps)
    for name in ["gga", "gga_rescale", "gga_chmax"] + [f"gga_top{tn}" for tn in top_ns[1:]]:
        if name in variants:
            det = bank.detector(variants[name][0])
            timing[name] = _time_ms(lambda a, det=det: det.score(a), xt, reps)
    timing = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in timing.items()}
    log.info(", ".join(f"{k} {v}" for k, v in timing.items()))
    timing_comp = CS.time_composite(setup, comp, bank, xt, 2 if args.quick else 5, args.seed)
    timing_comp["load_avg"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    log.info(f"composite vs gga preset: {timing_comp['ms_per_sample']}, ratio "
             f"{timing_comp['ratio_composite_to_gga_preset']:.3f}")

    # ---------------------------------------------------------------- diagnostics
    diagnostics = _diagnostics(store, setup, splits)

    runtime = log.finish()
    out = {
        "dataset": args.dataset,
        "quick": args.quick,
        "command": "python -m benchmarks.reproduce " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "seed": args.seed,
        "started": started,
        "runtime_s": runtime,
        "stage_seconds": log.stages,
        "csm_seconds_per_family": {k: round(v, 1) for k, v in store.seconds.items()},
        "machine": machine,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "sizes": sizes.__dict__,
        "splits_cache": {"dir": str(args.cache_dir) if args.cache_dir else None,
                         **{sp.name: sp.cache for sp in splits.values()}},
        "notes": setup.notes,
        "data": setup.data_info,
        "model_accuracy": {sp.name: sp.counts["clean_correct"] / sp.counts["clean_total"] for sp in splits.values()},
        "samples": {sp.name: sp.counts for sp in splits.values()} | {
            "fit": len(setup.fit_x), "heldout_fit": len(setup.heldout_x) if has_heldout else 0},
        "attacks": {sp.name: sp.attacks for sp in splits.values()},
        "ood_sets": list(setup.ood_sets),
        "families": {f: FAMILY_TEXT[f] for f in setup.families},
        "library_cotangents_precise": library_cotangents_precise(),
        "validation_note": "validation has no B&B and no CSA (cost) and no T-MSE (same family as T-SCE); "
                           "choices rest on noise, PGD, PGD-L2, rotation, T-SCE and the pooled OOD sets",
        "paper_bins": setup.paper_bins,
        "methods": results,
        "tables": {
            "table1": {m: results[m]["table1"] for m in results},
            "table2": {m: results[m]["table2"] for m in results},
            "table3": table3,
            "misclassification": {m: results[m]["misclassification"] for m in results},
            "ablation": ablation_table(results),
        },
        "composite": {
            "layers": comp.layers,
            "top_n": CS.TOP_N,
            "variants": list(CS.VARIANTS),
            "ablations": list(CS.ABLATIONS),
            "matches_served_preset": comp.matches_preset,
            "fit_data": "training fit images, calibrated on the held-out validation-part images" if has_heldout
                        else "training fit images, the detector's own seeded calibration split (no held-out set)",
            "signals_check": comp.signals_check,
            "seconds": comp.seconds,
            "clean_test_flag_rate_all": {n: comp.info[n]["clean_flag_rates"]["test"]["all_clean"] for n in comp.info},
            "clean_test_images": comp.info["composite"]["clean_flag_rates"]["test"]["n_all_clean"],
            "timing": timing_comp,
        },
        "timing_ms_per_sample": timing,
        "validation": {
            "criterion": "mean AUROC over the validation types " + ", ".join(VAL_TYPES) +
                         " (ood = the OOD sets pooled); ties broken by mean TNR at 95% TPR",
            "factorial": v.ranked,
            "references": v.refs,
            "single_feature_auroc": v.single,
            "ablation": v.ablation,
            "calibration_fraction": v.calib,
            "selected": {"label": selected.label(), "config": selected.as_dict(), "summary": v.best},
        },
        "diagnostics": diagnostics,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.dataset}.json"
    path.write_text(json.dumps(_clean_json(out), indent=1) + "\n")
    _save_arrays(args.out / f"{args.dataset}_arrays.npz", scores, store, splits, setup)
    print(f"wrote {path} ({runtime:.0f}s)", flush=True)
    if not args.no_report:
        from benchmarks import report

        report.write_report(args.out, figures=not args.no_figures)
    return out
