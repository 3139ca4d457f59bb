"""Fit the GGA detector that ships with the reference MNIST model.

    python -m detectors.zoo.fit_default --data-dir ../shared/data/mnist --model-dir service/default_model

Uses the training split only (the same seeded 90% the model was trained on; the 10%
validation part and the test set are not touched), a seeded subset of
``--n-samples`` images, and writes ``<model-dir>/detector/``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from detectors.datasets import load_idx_split
from detectors.gga import GGADetector
from detectors.zoo.mnist_cnn import MnistCNN


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--n-samples", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top-n", type=int, default=None)
    p.add_argument("--n-bins", type=int, default=100)
    p.add_argument("--calibration-fraction", type=float, default=0.3)
    p.add_argument("--include-softmax", action="store_true")
    args = p.parse_args(argv)

    model = MnistCNN()
    model.load_state_dict(load_file(str(args.model_dir / "model.safetensors")))
    model.eval()
    x_all, y_all = load_idx_split(args.data_dir, "train")
    card = json.loads((args.model_dir / "model_card.json").read_text())
    perm = np.random.default_rng(card["seed"]).permutation(len(x_all))
    train_idx = perm[len(x_all) // 10:]  # the model's own training part (validation excluded)
    pick = np.random.default_rng(args.seed).permutation(train_idx)[: args.n_samples]
    x, y = torch.from_numpy(x_all[pick]), torch.from_numpy(y_all[pick])
    t0 = time.time()

    def progress(done: int, total: int) -> None:
        print(f"\rfeatures {done}/{total} {time.time() - t0:.0f}s", end="", flush=True)

    det = GGADetector(model, top_n=args.top_n, n_bins=args.n_bins, seed=args.seed,
                      calibration_fraction=args.calibration_fraction,
                      include_softmax=args.include_softmax).fit(x, y, batch_size=500, progress=progress)
    print()
    det.save(args.model_dir / "detector")
    print(json.dumps(det.metadata()["fit"], indent=2))


if __name__ == "__main__":
    main()
