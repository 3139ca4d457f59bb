"""Prepare a CIFAR-10 composite and its inputs for the adaptive suite (``--data npz``).

    python -m benchmarks.adaptive.cifar_setup --data-dir ../shared/data --out /tmp/cifar_adaptive
    GGA_MODEL=cifar_resnet56 GGA_MODEL_WEIGHTS=../shared/data/cifar10_resnet/resnet56-4bfd9763.th \\
    python -m benchmarks.adaptive --data npz --detector /tmp/cifar_adaptive/detector \\
        --inputs /tmp/cifar_adaptive/inputs.npz --public /tmp/cifar_adaptive/public.npz --split test \\
        --budgets linf:0.031373 l2:0.5 --out benchmarks/results/adaptive_cifar10_composite

The served model is the pretrained ResNet56 as the server loads it (``cifar_resnet56``, ImageNet
normalisation inside). The data are the JPEG-q75 copies in ``shared/data`` (the only full test set
here): the composite (``--preset``, default the library's ``composite``, with the card's feature
layers) is fitted on ``--n-fit`` images of the 10,000 training copies and calibrated on the next
``--n-cal`` (the model trained on every CIFAR-10 training image; there is no held-out part). The
rest of the training copies are the attacker's public images (``public.npz``: guides, then the
transfer attacker's own fit); ``inputs.npz`` holds ``--n-inputs`` test images (seeded draw).
Writes ``<out>/detector/``, ``inputs.npz``, ``public.npz`` and ``setup.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from detectors.datasets import load_cifar_npz
from detectors.presets import PRESETS, build_detector


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, required=True, help="the shared data folder")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--preset", choices=PRESETS, default="composite")
    p.add_argument("--n-fit", type=int, default=1500)
    p.add_argument("--n-cal", type=int, default=800)
    p.add_argument("--n-inputs", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from service.fitcli import UsageError, load_served_model

    weights = args.data_dir / "cifar10_resnet" / "resnet56-4bfd9763.th"
    try:
        _, _, model, card = load_served_model({"model": "cifar_resnet56", "model_weights": str(weights),
                                               "device": "cpu"})
    except UsageError as exc:
        raise SystemExit(str(exc)) from exc
    jpeg = args.data_dir / "cifar10_jpeg_q75"
    x_tr, y_tr = load_cifar_npz(jpeg / "cifar10_train10k_jpegq75.npz")
    x_te, y_te = load_cifar_npz(jpeg / "cifar10_test_jpegq75.npz")
    rng = np.random.default_rng(args.seed)
    perm = rng.permutation(len(x_tr))
    fit, cal, public = np.split(perm, [args.n_fit, args.n_fit + args.n_cal])
    take = rng.permutation(len(x_te))[: args.n_inputs]
    det = build_detector(args.preset, model, num_classes=len(card.class_names),
                         layers=list(card.feature_layers or ()) or None, seed=args.seed)
    t0 = time.time()
    det.fit(torch.from_numpy(x_tr[fit]), torch.from_numpy(y_tr[fit]), batch_size=100,
            calibration=(torch.from_numpy(x_tr[cal]), torch.from_numpy(y_tr[cal])))
    seconds = round(time.time() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    det.save(args.out / "detector")
    np.savez(args.out / "inputs.npz", x=x_te[take], y=y_te[take])
    np.savez(args.out / "public.npz", x=x_tr[public], y=y_tr[public])
    info = {"model": "cifar_resnet56", "weights": str(weights), "preset": args.preset, "seed": args.seed,
            "n_fit": len(fit), "n_cal": len(cal), "n_public": len(public), "n_inputs": len(take),
            "components": det.component_names, "threshold": det.threshold, "fit_seconds": seconds}
    (args.out / "setup.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))
    return info


if __name__ == "__main__":
    main()
