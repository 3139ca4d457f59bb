"""Cost of scoring with one saved detector against another, side by side on the same batches.

    python -m benchmarks.detector_cost --model-dir service/default_model \\
        --detectors service/default_model/detector OTHER_DIR [--batch 64] [--reps 15] [--threads 1]

Alternates the detectors (ABAB...) on the same batch of MNIST test digits, ``--reps`` calls
each, and prints the median milliseconds per call of each and the ratio of each to the first
(what serving one instead of the other costs per batch, the worker's whole pass: GGA's gradient
passes, the layers, the second opinion and the decisions).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from detectors.datasets import load_idx_split
from detectors.persist import load_detector
from detectors.zoo.mnist_cnn import MnistCNN


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--detectors", type=Path, nargs="+", required=True)
    p.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/mnist")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = MnistCNN()
    model.load_state_dict(load_file(str(args.model_dir / "model.safetensors")))
    model.eval()
    dets = [load_detector(d, model, strategy="loop") for d in args.detectors]
    x, _ = load_idx_split(args.data_dir, "t10k")
    x = torch.from_numpy(x[:args.batch])
    for det in dets:  # warm-up
        det.score(x)
    times: list[list[float]] = [[] for _ in dets]
    for _ in range(args.reps):
        for i, det in enumerate(dets):
            t0 = time.perf_counter()
            det.score(x)
            times[i].append((time.perf_counter() - t0) * 1000)
    medians = [statistics.median(t) for t in times]
    out = {"batch": args.batch, "reps": args.reps, "threads": args.threads,
           "detectors": [{"path": str(d), "components": det.components, "median_ms": round(m, 2),
                          "ratio_to_first": round(m / medians[0], 3)}
                         for d, det, m in zip(args.detectors, dets, medians, strict=True)]}
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
