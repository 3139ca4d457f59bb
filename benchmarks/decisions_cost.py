"""What prediction sets and the accept gate add to /predict's compute: in process, same run, same batches.

    python -m benchmarks.decisions_cost --data-dir ../shared/data [--batch 64] [--rounds 30]

The served path of one batch, ``PredictWorker.compute`` (the detector's pass plus the rows of the JSON
answer and the metrics), on the bundled default detector with its decisions and on the same detector with
``decisions = None`` (the path without sets and gate), alternating A/B per round so that both see the same
machine load. Prints the median seconds per batch of each and their ratio. One torch thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from prometheus_client import CollectorRegistry
from safetensors.torch import load_file

from detectors.datasets import load_idx_split
from detectors.persist import load_detector
from detectors.zoo import MnistCNN
from service.metrics import ServiceMetrics
from service.models import ModelCard
from service.worker import DetectorSlot, PredictPayload, PredictWorker

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=30)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    mdir = REPO / "service" / "default_model"
    model = MnistCNN()
    model.load_state_dict(load_file(str(mdir / "model.safetensors")))
    model.eval()
    card = ModelCard.from_dict(json.loads((mdir / "model_card.json").read_text()), "bundled")
    with_sets = load_detector(mdir / "detector", model)
    without = load_detector(mdir / "detector", model)
    without.decisions = None
    x, _ = load_idx_split(args.data_dir / "mnist", "t10k")
    workers = {}
    for name, det in (("with sets and gate", with_sets), ("without", without)):
        w = PredictWorker(DetectorSlot(det, "v0"), card, ServiceMetrics(CollectorRegistry()), torch.device("cpu"))
        workers[name] = w
    times = {name: [] for name in workers}
    for r in range(args.rounds + 2):
        batch = np.ascontiguousarray(x[(r * args.batch) % 9000:][: args.batch])
        items = [SimpleNamespace(payload=PredictPayload(batch), rows=len(batch))]  # what compute reads of a Chunk
        order = list(workers) if r % 2 == 0 else list(workers)[::-1]
        for name in order:
            t0 = time.perf_counter()
            workers[name].compute(items)
            if r >= 2:  # two warm-up rounds
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(v) for name, v in times.items()}
    for name, v in med.items():
        print(f"{name}: median {v * 1000:.2f} ms per batch of {args.batch} ({args.rounds} rounds)")
    print(f"ratio with/without: {med['with sets and gate'] / med['without']:.4f}")


if __name__ == "__main__":
    main()
