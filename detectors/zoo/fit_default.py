"""Fit the detector that ships with the reference MNIST model.

    python -m detectors.zoo.fit_default --data-dir ../shared/data/mnist --model-dir service/default_model

The detector is the ``--preset`` (default: the composite, see ``detectors/presets.py``)
with the feature layers of the model card. It is fitted on a seeded subset of
``--n-samples`` images of the model's own training part (the seeded 90% of MNIST train);
the calibration scores come from the 10% validation part the model never trained on
(``--calibration-samples`` of it), so that they are exchangeable with fresh inputs (on
its training images the model is more confident, and calibrating there flags more than
alpha of fresh clean inputs). The test set is not touched. Writes
``<model-dir>/detector/``, with its prediction sets (set_alpha 0.1) and selective gate (risk 0.01,
delta 0.05), fitted on the same calibration part (``detectors/decisions.py``). The configuration
was chosen on validation data, see ``benchmarks/results/REPORT.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from detectors.datasets import load_idx_split
from detectors.presets import PRESETS, build_detector
from detectors.zoo.mnist_cnn import MnistCNN


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--n-samples", type=int, default=20000)
    # 4,000: the robust second opinion (detectors/zoo/robust_train.py) held out only the first 5,000
    # of the same seeded permutation and trained on the rest of this validation part, so calibrating
    # past 5,000 would make its disagreement look too small; images 4,000-5,000 stay new to the model,
    # the detector and the second opinion (the adaptive attack suite's validation split)
    p.add_argument("--calibration-samples", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", choices=PRESETS, default="composite")
    p.add_argument("--top-n", type=int, default=None, help="classes in the CSM (default: the preset's choice)")
    p.add_argument("--guard-share", type=float, default=None,
                   help="composite with a second opinion: the flag budget share of its guard (default 0.3)")
    p.add_argument("--without", choices=("logits", "layers"), action="append", default=[],
                   help="composite: leave out the logit components (margin, energy) or the layer distances "
                        "(the ablation under attack, benchmarks/adaptive/ablation.py); repeatable")
    args = p.parse_args(argv)

    model = MnistCNN()
    model.load_state_dict(load_file(str(args.model_dir / "model.safetensors")))
    model.eval()
    x_all, y_all = load_idx_split(args.data_dir, "train")
    card = json.loads((args.model_dir / "model_card.json").read_text())
    perm = np.random.default_rng(card["seed"]).permutation(len(x_all))
    n_val = len(x_all) // 10
    val_idx, train_idx = perm[:n_val], perm[n_val:]  # the split of train_mnist.py
    pick = np.random.default_rng(args.seed).permutation(train_idx)[: args.n_samples]
    cal = val_idx[: args.calibration_samples]
    x, y = torch.from_numpy(x_all[pick]), torch.from_numpy(y_all[pick])
    x_cal, y_cal = torch.from_numpy(x_all[cal]), torch.from_numpy(y_all[cal])
    t0 = time.time()

    def progress(done: int, total: int) -> None:
        print(f"\rfeatures {done}/{total} {time.time() - t0:.0f}s", end="", flush=True)

    det = build_detector(args.preset, model, num_classes=len(card["class_names"]), top_n=args.top_n,
                         layers=card.get("feature_layers"), seed=args.seed,
                         second_opinion=card.get("second_opinion"))
    if args.guard_share is not None:
        if getattr(det.config, "second_opinion", None) is None:
            p.error("--guard-share needs a composite (or fast) preset and a model card that names a second_opinion")
        det.config = replace(det.config, guard_share=args.guard_share)
    if args.without:
        if args.preset not in ("composite", "fast"):
            p.error("--without needs the composite or fast preset")
        no_layers = "layers" in args.without
        det.config = replace(det.config, use_logits="logits" not in args.without,
                             use_layers=det.config.use_layers and not no_layers,
                             layers=None if no_layers else det.config.layers)
    det.fit(x, y, batch_size=500, progress=progress, calibration=(x_cal, y_cal))
    print()
    det.save(args.model_dir / "detector")
    print(json.dumps(det.metadata()["fit"], indent=2))
    print(json.dumps(det.decisions.info(), indent=2))  # prediction sets and gate (detectors/decisions.py)


if __name__ == "__main__":
    main()
