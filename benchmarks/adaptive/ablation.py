"""One table from several adaptive-suite results: the ablation under attack.

    python -m benchmarks.adaptive.ablation --out benchmarks/results/adaptive_ablation \\
        "served default=benchmarks/results/adaptive_val_default.json" \\
        "without GGA (preset fast)=benchmarks/results/adaptive_val_fast.json" ...

Each argument is ``label=path`` of a ``python -m benchmarks.adaptive`` JSON, or ``label=path+path...``
for runs of other attacks on the same detector and inputs (merged budget by budget: an input counts
as broken when an attack of any of them broke it); ``--notes FILE`` appends
a hand-written reading of the table (kept in the results folder, so a regenerated table keeps it). Writes
``<out>.md`` and ``<out>.json``: per row the split, n, the clean flag rate, robust detection per
white-box attack, the transfer attack's and the best of all white-box attacks (transfer excluded:
it is another threat model). ``python -m benchmarks.report`` puts ``adaptive_ablation.md`` into
``REPORT.md`` when the file is in the results folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

WHITE_BOX = ("cw", "multitarget", "joint", "guided", "orthogonal", "feature_match")


def merge(results: list[dict]) -> dict:
    """One result from runs of other attacks against the same detector on the same inputs."""
    first = results[0]
    out = {**first, "settings": dict(first["settings"]), "runs": {}}
    same = ("data", "split", "n", "seed", "gga")
    steps = []
    for r in results:
        if any(r["settings"].get(k) != first["settings"].get(k) for k in same) or \
                r["detector"].get("threshold") != first["detector"].get("threshold"):
            mine = {k: r["settings"].get(k) for k in same}
            theirs = {k: first["settings"].get(k) for k in same}
            raise ValueError(f"results to merge must share the detector and {same}: {mine} vs {theirs}")
        steps.append(r["settings"]["steps_for"])
        for budget, run in r["runs"].items():
            into = out["runs"].get(budget)
            if into is None:
                out["runs"][budget] = {**run, "attacks": dict(run["attacks"]),
                                       "broken_index": dict(run.get("broken_index", {}))}
                continue
            if (into["n"], into["n_correct"]) != (run["n"], run["n_correct"]):
                raise ValueError(f"{budget}: the runs attacked other inputs")
            into["attacks"].update(run["attacks"])
            into["broken_index"].update(run.get("broken_index", {}))
    out["settings"]["steps_for"] = "; ".join(dict.fromkeys(steps))
    out["sanity"] = next((r["sanity"] for r in reversed(results) if r.get("sanity")), None)  # later runs win
    return out


def row_of(label: str, result: dict) -> list[dict]:
    """The rows of one result (one per budget)."""
    s = result["settings"]
    rows = []
    for budget, run in result["runs"].items():
        attacks = run["attacks"]
        broken: set[int] = set()
        for name in WHITE_BOX:
            broken |= set(run["broken_index"].get(name, [])) if name in attacks else set()
        n_ok = run["n_correct"]
        rows.append({
            "label": label, "budget": budget, "split": s["split"], "n": run["n"], "n_correct": n_ok,
            "steps_for": s["steps_for"], "gga_in_surrogate": s["gga"],
            "clean_flag_rate": run["clean_flag_rate"], "components": result["detector"]["components"],
            "robust_detection": {k: v["robust_detection"] for k, v in attacks.items() if k != "best_of_all"},
            "white_box_best_of_all": 1 - len(broken) / n_ok if n_ok else None,
        })
    return rows


def render(rows: list[dict]) -> str:
    def pct(v):
        return "" if v is None else f"{100 * v:.1f}%"

    lines = ["## Under adaptive attack (`benchmarks/adaptive`)", "",
             "Robust detection = 1 − (correctly classified inputs for which an attack found a misclassified, "
             "unflagged point inside the ball) / (correctly classified inputs), at the served threshold. "
             "White-box: the attacker knows the fitted detector; *best of white-box* counts an input broken "
             "when any white-box attack broke it. Transfer: the attacker fits its own detector (same recipe "
             "and public second opinion, other seed and samples) and only the served detector judges.", "",
             "| detector | split (n correct) | budget | clean flag rate | CW | multi-targeted | joint | guided start | "
             "orthogonal | feature matching | **best of white-box** | transfer |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rd = r["robust_detection"]
        lines.append(f"| {r['label']} | {r['split']} ({r['n_correct']}) | {r['budget']} | "
                     f"{pct(r['clean_flag_rate'])} | " + " | ".join(pct(rd.get(k)) for k in WHITE_BOX)
                     + f" | **{pct(r['white_box_best_of_all'])}** | {pct(rd.get('transfer'))} |")
    steps = sorted({r["steps_for"] for r in rows})
    lines += ["", "Steps × restarts per attack: " + "; ".join(f"`{s}`" for s in steps)
              + ". Every attack but the guided one starts from the clean input (a random start is weaker here: noise "
              "is flagged); the guided attack starts from an image of the target class projected into the ball.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="label=path of a benchmarks.adaptive JSON")
    p.add_argument("--out", type=Path, required=True, help="output path without suffix")
    p.add_argument("--notes", type=Path, default=None, help="markdown appended after the table")
    args = p.parse_args(argv)
    rows = []
    for item in args.results:
        label, _, path = item.partition("=")
        if not path:
            p.error(f"expected label=path, got {item!r}")
        rows += row_of(label, merge([json.loads(Path(part).read_text()) for part in path.split("+")]))
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    text = render(rows)
    if args.notes is not None:
        text += "\n" + args.notes.read_text()
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return rows


if __name__ == "__main__":
    main()
