"""Clean-data behaviour of a composite with a robust second opinion, beside one without.

    python -m benchmarks.second_opinion_clean --data-dir ../shared/data/mnist \\
        --model-dir service/default_model [--baseline-dir DIR] [--n 5000] [--out FILE.json]

On the first ``--n`` MNIST test digits (never used in fitting or calibration): the flag rate at
the served alpha (the target is alpha ± 1 point), which branch flags (the main statistic, the
disagreement guard, both), the clean disagreement rate (second opinion's label ≠ served label),
and misclassification detection: the share of the served model's errors that are flagged and
the AUROC of trust for "the served label is wrong". ``--baseline-dir``: a second detector
directory scored on the same digits (e.g. the composite without a second opinion).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from detectors.datasets import load_idx_split
from detectors.metrics import auroc
from detectors.persist import load_detector
from detectors.zoo.mnist_cnn import MnistCNN


def summarize(det, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> dict:
    t0 = time.perf_counter()
    parts = [det.score(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    label = torch.cat([p.label for p in parts])
    trust = torch.cat([p.trust for p in parts]).double()
    flagged = torch.cat([p.flagged for p in parts])
    log_p = torch.cat([p.features for p in parts]).double()
    wrong = label != y
    out = {
        "n": len(y), "alpha": det.alpha, "flag_rate": float(flagged.double().mean()),
        "errors": int(wrong.sum()), "errors_flagged": int((flagged & wrong).sum()),
        "error_auroc": auroc(-trust[~wrong], -trust[wrong]) if wrong.any() else None,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if "disagreement" in det.components:
        w = det.config.guard_share
        # which branch decides: the guard where log(w) − log p_dis is the larger term of the statistic
        dis_term = math.log(w) - log_p[:, -1]
        score = torch.cat([p.score for p in parts])
        guard = flagged & (dis_term >= score - 1e-12)
        second = det.second
        with torch.no_grad():
            r = torch.cat([second(x[i:i + batch_size]).argmax(dim=1) for i in range(0, len(x), batch_size)])
        out.update({"flagged_by_guard": int(guard.sum()), "flagged_by_main": int((flagged & ~guard).sum()),
                    "disagreement_rate": float((r != label).double().mean()),
                    "disagreement_rate_where_served_right": float((r != label)[~wrong].double().mean()),
                    "disagreement_rate_where_served_wrong": float((r != label)[wrong].double().mean())
                    if wrong.any() else None})
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--baseline-dir", type=Path, default=None, help="another detector directory, same model")
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    model = MnistCNN()
    model.load_state_dict(load_file(str(args.model_dir / "model.safetensors")))
    model.eval()
    x, y = load_idx_split(args.data_dir, "t10k")
    x, y = torch.from_numpy(x[:args.n]), torch.from_numpy(y[:args.n]).long()
    result = {"detector": summarize(load_detector(args.model_dir / "detector", model), x, y)}
    if args.baseline_dir is not None:
        result["baseline"] = summarize(load_detector(args.baseline_dir, model), x, y)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
