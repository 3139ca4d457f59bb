"""Choose the composite detector's configuration on VALIDATION data only.

    python -m benchmarks.select_composite --dataset mnist --data-dir ../shared/data
    python -m benchmarks.select_composite --dataset cifar10 --data-dir ../shared/data

Uses the reproduction's fit data and its validation split (``benchmarks.splits``
builds and caches it; the test split is never read here). The signals of every input
are computed once (full CSM, every candidate layer); each configuration is then fitted
and scored from them:

- combiners: Fisher, minimum p-value, sum of standardised scores, LODA over the joint
  vector;
- ablations: without GGA, GGA alone, without logit signals, without layer distances;
- the CSM's top-N (3, 5, all classes) and the candidate layer sets.

Per configuration: AUROC and TNR at 95% TPR of clean (correctly classified) validation
inputs against each validation type, their means, the flag rate on all clean
validation inputs at alpha 0.05, and the misclassification AUROC (wrong vs right).
Writes ``<out>/select_<dataset>.json`` and prints a table sorted by mean AUROC.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import reproduce as R
from benchmarks.splits import DEFAULT_CACHE, load_split, split_key
from detectors.composite import CompositeConfig, CompositeDetector, Signals
from detectors.features import csm_features
from detectors.metrics import auroc, tnr_at_tpr
from detectors.signals import default_layers

CANDIDATE_LAYERS = {
    "mnist": {
        "convs+fc1": ["features.1", "features.3", "features.6", "features.8", "act"],
        "convs": ["features.1", "features.3", "features.6", "features.8"],
        "default": None,
    },
    "cifar10": {
        "stages": ["relu", "layer1", "layer2", "layer3"],
        "blocks": ["relu"] + [f"layer{s}.{i}" for s in (1, 2, 3) for i in range(9)],
        "default": None,
    },
}


def all_layers(model, dataset: str, example: torch.Tensor) -> list[str]:
    names = []
    for key, layers in CANDIDATE_LAYERS[dataset].items():
        if layers is None:
            layers = CANDIDATE_LAYERS[dataset][key] = default_layers(model, example)
        names += layers
    return list(dict.fromkeys(names))


def compute(det: CompositeDetector, x: torch.Tensor, batch: int) -> Signals:
    parts = [det.signals(x[s:s + batch], return_csm=True) for s in range(0, len(x), batch)]
    return Signals.cat(parts)


def flatten(named: dict[str, Signals]) -> dict[str, torch.Tensor]:
    """Signals as a flat dict of tensors (saved without pickle)."""
    out = {}
    for key, sig in named.items():
        out.update({f"{key}|logits": sig.logits, f"{key}|classes": sig.classes, f"{key}|csm": sig.csm})
        out.update({f"{key}|layer|{n}": v for n, v in sig.layers.items()})
    return {k: v.contiguous() for k, v in out.items()}


def unflatten(flat: dict[str, torch.Tensor]) -> dict[str, Signals]:
    keys = {k.split("|")[0] for k in flat}
    return {key: Signals(flat[f"{key}|logits"], flat[f"{key}|classes"], None,
                         {k.split("|", 2)[2]: v for k, v in flat.items() if k.startswith(f"{key}|layer|")},
                         flat[f"{key}|csm"]) for key in keys}


def with_top_n(sig: Signals, n: int | None) -> Signals:
    csm = sig.csm if n is None else sig.csm[:, :n, :n]
    return dataclasses.replace(sig, csm_features=csm_features(csm).double(), csm=None)


def evaluate(det, sets: dict[str, Signals], ood: tuple[str, ...], types: tuple[str, ...],
             clean_all: Signals, clean_y: torch.Tensor) -> dict:
    """``det``: a fitted composite, or a function Signals -> scores [B] (a baseline, no flags)."""
    score = det if callable(det) else (lambda sig: det.score_signals(sig).score)
    scores = {k: score(v).numpy() for k, v in sets.items()}
    s_in = scores["clean"]
    out = {}
    for t in types:
        s_out = np.concatenate([scores[k] for k in ood]) if t == "ood" else scores.get(t)
        if s_out is None or len(s_out) == 0:
            continue
        out[t] = {"auroc": 100 * auroc(s_in, s_out), "tnr": 100 * tnr_at_tpr(s_in, s_out), "n": int(len(s_out))}
    s_all = score(clean_all).numpy()
    wrong = (clean_all.classes[:, 0] != clean_y).numpy()
    mis = 100 * auroc(s_all[~wrong], s_all[wrong]) if wrong.any() else None
    flag = None if callable(det) else float(det.score_signals(clean_all).flagged.float().mean())
    valid = [v for v in out.values()]
    return {
        "types": out,
        "mean_auroc_with_misclassification": float(np.mean([v["auroc"] for v in valid] + [mis]))
        if mis is not None else None,
        "mean_auroc": float(np.mean([v["auroc"] for v in valid])),
        "mean_tnr": float(np.mean([v["tnr"] for v in valid])),
        "min_tnr": float(np.min([v["tnr"] for v in valid])),
        "clean_flag_rate": flag,
        "misclassification_auroc": mis,
        "n_wrong": int(wrong.sum()),
    }


def configurations(dataset: str) -> list[dict]:
    """Every configuration compared; each names all the options it sets (the rest: the class defaults)."""
    layer_sets = list(CANDIDATE_LAYERS[dataset])
    first = layer_sets[0]
    plain = {"two_sided": ["margin", "energy"], "truncation": 1.0}  # the first round: plain Fisher, both tails
    cfgs = []
    for comb in ("fisher", "min", "sum", "loda"):
        for ls in layer_sets:
            cfgs.append({"combine": comb, "layers": ls, "top_n": 5, **plain})
    for n in (3, None):
        cfgs.append({"combine": "fisher", "layers": first, "top_n": n, **plain})
    for comb in ("fisher", "sum"):
        cfgs += [
            {"combine": comb, "layers": first, "top_n": 5, "use_gga": False, **plain},
            {"combine": comb, "layers": first, "top_n": 5, "use_logits": False, **plain},
            {"combine": comb, "layers": None, "top_n": 5, "use_layers": False, **plain},
        ]
    cfgs.append({"combine": "fisher", "layers": None, "top_n": 5, "use_layers": False, "use_logits": False, **plain})
    cfgs.append({"combine": "sum", "layers": first, "top_n": 5, "use_gga": False, "use_logits": False, **plain})
    # the second round: misclassifications (wrong vs right) ranked far below max softmax; one-sided margin,
    # weights, and the truncated product
    for ls in layer_sets[:2]:
        one = {"combine": "fisher", "layers": ls, "top_n": 5, "two_sided": ["energy"]}
        cfgs += [
            {**one, "truncation": 1.0},
            {**plain, "combine": "fisher", "layers": ls, "top_n": 5, "layer_weight": "shared"},
            {**one, "truncation": 1.0, "layer_weight": "shared"},
            {**one, "truncation": 1.0, "layer_weight": "shared", "two_sided": []},
            {**plain, "combine": "sum", "layers": ls, "top_n": 5, "layer_weight": "shared"},
        ]
        cfgs += [{**one, "truncation": 1.0, "margin_weight": w} for w in (2.0, 3.0, 5.0)]
        for tau in (0.1, 0.01):
            cfgs += [{**one, "truncation": tau}, {**one, "truncation": tau, "use_gga": False},
                     {**one, "truncation": tau, "margin_weight": 2.0}]
        cfgs += [{**one, "truncation": 0.1, "top_n": n} for n in (3, None)]
        cfgs += [{**one, "truncation": 0.1, "use_logits": False}, {**one, "truncation": 0.1, "use_layers": False}]
    return cfgs


def baselines() -> dict:
    from detectors.energy import energy_score
    from detectors.signals import logit_margin

    # max softmax ranks exactly as the logit margin (a monotone map of it)
    return {"msp": lambda s: -logit_margin(s.logits), "energy": lambda s: energy_score(s.logits)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--match", default="", help="only the configurations whose JSON contains this text")
    p.add_argument("--summarize", action="store_true", help="write SELECTION.md from both data sets' JSON")
    own, rest = p.parse_known_args(argv)
    if own.summarize:
        print(summarize())
        return {}
    args = R.parse_args(rest)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = R.resolve_sizes(args)
    log = R.Log()
    setup = (R.load_mnist if args.dataset == "mnist" else R.load_cifar)(args, sizes)
    model = setup.model
    for prm in model.parameters():
        prm.requires_grad_(False)
    val = load_split(own.cache_dir, args.dataset, "val", split_key(args, sizes, "val"))
    if val is None:
        raise SystemExit(f"no cached validation split: run python -m benchmarks.splits --split val {' '.join(rest)}")
    batch = 250 if args.dataset == "mnist" else 50
    probe = CompositeDetector(model, top_n=None, layers=all_layers(model, args.dataset, setup.fit_x[:2]))
    log.stage("signals (full CSM, every candidate layer)")
    clean_x, clean_y = setup.val_src
    cache = own.cache_dir / f"{args.dataset}_val_signals.pt"
    if cache.exists():
        stored = unflatten(torch.load(cache, weights_only=True))
    else:
        stored = {"fit": compute(probe, setup.fit_x, batch), "clean_all": compute(probe, clean_x, batch)}
        if setup.heldout_x is not None:
            stored["cal"] = compute(probe, setup.heldout_x, batch)
        stored.update({f"set:{k}": compute(probe, v, batch) for k, v in val.sets.items() if len(v)})
        torch.save(flatten(stored), cache)
    fit_sig, cal_sig, clean_all = stored["fit"], stored.get("cal"), stored["clean_all"]
    sets = {k[4:]: v for k, v in stored.items() if k.startswith("set:")}
    types = R.VAL_TYPES
    results = []
    log.stage("configurations")
    for cfg in [c for c in configurations(args.dataset) if own.match in json.dumps(c)]:
        layers = CANDIDATE_LAYERS[args.dataset].get(cfg.get("layers")) if cfg.get("layers") else None
        kw = {k: v for k, v in cfg.items() if k not in ("layers", "top_n")}
        if "two_sided" in kw:
            kw["two_sided"] = tuple(kw["two_sided"])
        use_layers = cfg.get("use_layers", True)
        det = CompositeDetector(model, top_n=cfg["top_n"], layers=layers if use_layers else None, **kw)
        n = det.config.top_n
        det.fit_signals(with_top_n(fit_sig, n), setup.fit_y,
                        with_top_n(cal_sig, n) if cal_sig is not None else None)
        row = evaluate(det, {k: with_top_n(v, n) for k, v in sets.items()}, setup.ood_sets, types,
                       with_top_n(clean_all, n), clean_y)
        row["config"] = {**cfg, "layer_names": list(det.config.layers or ())}
        results.append(row)
        t = row["types"]
        log.info(f"{json.dumps(cfg):<95} meanAUROC {row['mean_auroc']:6.2f} meanTNR {row['mean_tnr']:6.2f} "
                 f"minTNR {row['min_tnr']:6.2f} flag {100 * row['clean_flag_rate']:5.2f}% "
                 f"mis {row['misclassification_auroc'] or float('nan'):6.2f} "
                 f"with-mis {row['mean_auroc_with_misclassification'] or float('nan'):6.2f} | "
                 + " ".join(f"{k}:{v['auroc']:.1f}/{v['tnr']:.0f}" for k, v in t.items()))
    for name, fn in baselines().items():
        row = evaluate(fn, sets, setup.ood_sets, types, clean_all, clean_y)
        row["config"] = {"baseline": name}
        results.append(row)
        log.info(f"{name:<95} meanAUROC {row['mean_auroc']:6.2f} meanTNR {row['mean_tnr']:6.2f} "
                 f"mis {row['misclassification_auroc'] or float('nan'):6.2f} "
                 f"with-mis {row['mean_auroc_with_misclassification'] or float('nan'):6.2f}")
    results.sort(key=lambda r: (-r["mean_auroc"], -r["mean_tnr"]))
    served = dataclasses.asdict(CompositeConfig())
    out = {"dataset": args.dataset, "command": "python -m benchmarks.select_composite " + " ".join(argv or []),
           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "runtime_s": log.finish(),
           "validation_counts": {k: len(v) for k, v in val.sets.items()},
           "served_defaults": {k: served[k] for k in ("combine", "two_sided", "truncation", "margin_weight",
                                                       "layer_weight", "top_n")},
           "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"select_{args.dataset}{'_' + own.match if own.match else ''}.json"
    (args.out / name).write_text(json.dumps(R._clean_json(out), indent=1) + "\n")
    return out



def summarize(out_dir: Path = R.DEFAULT_OUT) -> str:
    """SELECTION.md from both data sets' JSON: the joint ranking that chose the served defaults.

    Configurations are matched across data sets by their options, the first candidate layer
    set of each data set standing for "the declared layers" and the second for the
    alternative. Criterion: the mean over both data sets of the mean validation AUROC over
    the six types and the misclassification AUROC (wrong vs right) as a seventh.
    """
    runs = {d: json.loads((out_dir / f"select_{d}.json").read_text()) for d in ("mnist", "cifar10")}
    role = {d: {name: i for i, name in enumerate(CANDIDATE_LAYERS[d])} for d in runs}
    rows: dict[str, dict] = {}
    for d, run in runs.items():
        for r in run["results"]:
            cfg = {k: v for k, v in r["config"].items() if k != "layer_names"}
            if "baseline" in cfg:
                key = cfg["baseline"]
            else:
                cfg["layers"] = None if cfg.get("layers") is None else f"set{role[d][cfg['layers']]}"
                key = json.dumps(cfg, sort_keys=True)
            rows.setdefault(key, {})[d] = r
    both = {k: v for k, v in rows.items() if len(v) == 2}

    def joint(v):
        return float(np.mean([v[d]["mean_auroc_with_misclassification"] for d in v]))

    ranked = sorted(both.items(), key=lambda kv: -joint(kv[1]))
    lines = ["# Choosing the composite on validation data", "",
             "Generated by `python -m benchmarks.select_composite --summarize` from `select_mnist.json` and "
             "`select_cifar10.json` (validation splits only; the test splits are never read).", "",
             "Criterion: mean over both data sets of the mean validation AUROC over noise, PGD, PGD-L2, rotation, "
             "T-SCE and pooled OOD, with the misclassification AUROC (wrong vs right on clean validation "
             "images) as a seventh term. Layer set 0 = the declared layers (MNIST: the four convolutions and "
             "the 100-unit layer; CIFAR-10: the stem and the three stages), set 1 = the alternative (MNIST: "
             "convolutions only; CIFAR-10: the stem and all 27 blocks).", "",
             f"Served defaults: `{json.dumps(runs['mnist']['served_defaults'])}`", "",
             "| rank | configuration | joint | MNIST mean AUROC | MNIST mis. AUROC | CIFAR mean AUROC | "
             "CIFAR mis. AUROC |", "|---|---|---|---|---|---|---|"]
    for i, (k, v) in enumerate(ranked, 1):
        m, c = v["mnist"], v["cifar10"]
        lines.append(f"| {i} | `{k}` | {joint(v):.2f} | {m['mean_auroc']:.2f} | "
                     f"{m['misclassification_auroc']:.2f} | {c['mean_auroc']:.2f} | "
                     f"{c['misclassification_auroc']:.2f} |")
    text = "\n".join(lines) + "\n"
    (out_dir / "SELECTION.md").write_text(text)
    return text


if __name__ == "__main__":
    main()
