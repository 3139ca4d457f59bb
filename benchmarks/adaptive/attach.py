"""Write what the adaptive suite measured into a saved detector's JSON (shown by ``/info``).

    python -m benchmarks.adaptive.attach --detector service/default_model/detector \\
        --result benchmarks/results/adaptive_mnist_default.json [more results ...]

Adds ``evaluation`` to ``detector.json`` (the fitted state in ``detector.safetensors`` is not
touched): the threat models, the budget, split and n, robust detection per attack and for the
best of all, the clean flag rate, and where the report is. Several results (runs of other
attacks or budgets on the same inputs) are merged attack by attack; the best of all is then the
union of the inputs any attack broke. Refuses a result that was measured on another fitted
state (the detector's threshold and components must be the result's).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from benchmarks.adaptive.ablation import merge
from benchmarks.adaptive.run import sanity_by_attack
from detectors.storage import META_FILE

THREAT_MODELS = {
    "white_box": "the attacker knows the model, the detector's fitted state and threshold (and attacks the "
                 "surrogate of its statistic, GGA left out or by BPDA, from the clean input or, guided, from a "
                 "public image of another class projected into the ball); success = inside the ball, "
                 "misclassified, not flagged by the served detector",
    "transfer": "the attacker knows the recipe, the model and the public second opinion, fits its own detector "
                "on other samples with another seed, attacks that; the served detector judges",
}


def evaluation_of(result: dict, report: str | list[str]) -> dict:
    """The ``evaluation`` entry from an adaptive-suite result (``benchmarks.adaptive`` JSON, or several
    merged by :func:`benchmarks.adaptive.ablation.merge`): the best of all attacks is the union of the
    inputs any attack broke, recomputed where the result lists them."""
    s = result["settings"]
    budgets = {}
    for budget, run in result["runs"].items():
        attacks = {name: round(a["robust_detection"], 4) for name, a in run["attacks"].items()}
        index = run.get("broken_index")
        if index and run["n_correct"]:
            broken = set().union(*(set(v) for v in index.values()))
            attacks["best_of_all"] = round(1 - len(broken) / run["n_correct"], 4)
        budgets[budget] = {"n": run["n"], "n_correct": run["n_correct"],
                           "clean_flag_rate": round(run["clean_flag_rate"], 4), "robust_detection": attacks}
    out_sanity = None
    if result.get("sanity"):
        checks = sanity_by_attack(result["sanity"])
        per_attack = {name: {"unbounded_success": float(c["unbounded"]["success"]),
                             "eps_sweep_success": {k: v["success"] for k, v in c["eps_sweep"].items()}}
                      for name, c in checks.items()}
        unbounded = max(a["unbounded_success"] for a in per_attack.values())
        out_sanity = {"unbounded_success": unbounded, "attacks": per_attack}
        if unbounded < 1.0:
            out_sanity["caveat"] = (f"the unbounded attack succeeded on only {unbounded:.0%} of the sanity inputs: "
                                    "the attacks are weaker than an ideal attacker, so robust detection is an upper "
                                    "bound")
        weak = sorted(name for name, a in per_attack.items() if a["unbounded_success"] < 1.0)
        if unbounded == 1.0 and weak:
            out_sanity["note"] = (f"unbounded, {', '.join(weak)} (from the clean input) did not always succeed; "
                                  "an attack that did shows that only the budget stops the suite, not that every "
                                  "attack is as strong as an ideal one")
    return {
        "kind": "adaptive attacks (benchmarks/adaptive)",
        "sanity": out_sanity,
        "threat_models": THREAT_MODELS,
        "data": s["data"], "split": s["split"], "steps_for": s["steps_for"], "gga_in_surrogate": s["gga"],
        "budgets": budgets,
        "metric": "robust detection = 1 - (correctly classified inputs with a misclassified, unflagged point "
                  "inside the ball) / (correctly classified inputs), at the served threshold",
        "report": report,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--detector", type=Path, required=True, help="a saved detector folder")
    p.add_argument("--result", type=Path, nargs="+", required=True,
                   help="the suite's JSON for that detector (several: merged attack by attack)")
    args = p.parse_args(argv)
    meta_path = args.detector / META_FILE
    meta = json.loads(meta_path.read_text())
    results = []
    for path in args.result:
        result = json.loads(path.read_text())
        measured = result["detector"]
        if measured["components"] != meta["components"] or not math.isclose(
                measured["threshold"], meta["fit"]["threshold"], rel_tol=0, abs_tol=1e-12):
            raise SystemExit(f"{path} was measured on another fitted state (threshold {measured['threshold']}, "
                             f"components {measured['components']}) than {args.detector} "
                             f"(threshold {meta['fit']['threshold']}, components {meta['components']})")
        results.append(result)
    try:
        merged = merge(results)
    except ValueError as exc:
        raise SystemExit(f"the results cannot be merged: {exc}") from exc
    reports = [str(p.with_suffix(".md")) for p in args.result]
    evaluation = evaluation_of(merged, reports[0] if len(reports) == 1 else reports)
    meta["evaluation"] = evaluation
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta["evaluation"], indent=2))


if __name__ == "__main__":
    main()
