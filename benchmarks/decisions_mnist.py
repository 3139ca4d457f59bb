"""The bundled default's prediction sets and accept gate on the MNIST test set (10,000 digits, never seen by
the fit): coverage and mean size of the sets, accepted share and selective risk of the gate.

    python -m benchmarks.decisions_mnist --data-dir ../shared/data

Writes benchmarks/results/decisions_mnist.json. One torch thread.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from detectors.datasets import load_idx_split
from detectors.persist import load_detector
from detectors.zoo import MnistCNN

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    mdir = REPO / "service" / "default_model"
    model = MnistCNN()
    model.load_state_dict(load_file(str(mdir / "model.safetensors")))
    model.eval()
    det = load_detector(mdir / "detector", model)
    x, y = load_idx_split(args.data_dir / "mnist", "t10k")
    x, y = torch.from_numpy(x), torch.from_numpy(y).long()
    out = det.score(x, batch_size=500)
    covered = out.prediction_set.gather(1, y[:, None])[:, 0]
    wrong = out.label != y
    acc = out.accept
    res = {"n": len(y), "set_alpha": det.decisions.config.set_alpha, "coverage": float(covered.double().mean()),
           "mean_set_size": float(out.prediction_set.sum(1).double().mean()),
           "empty_sets": float((out.prediction_set.sum(1) == 0).double().mean()),
           "accuracy": float((~wrong).double().mean()), "flag_rate": float(out.flagged.double().mean()),
           "accept_rate": float(acc.double().mean()), "accepted_errors": int((acc & wrong).sum()),
           "selective_risk": float((acc & wrong).sum()) / max(int(acc.sum()), 1),
           "coverage_unflagged": float(covered[~out.flagged].double().mean()),
           "decisions": det.decisions.info(), "seconds": round(time.perf_counter() - t0, 1)}
    out_path = REPO / "benchmarks" / "results" / "decisions_mnist.json"
    out_path.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
