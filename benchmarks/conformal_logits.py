"""Logits (and the served detector's trust) of the conformal benchmark, computed once and cached as .npy.

    python -m benchmarks.conformal_logits --data-dir ../shared/data [--cache-dir benchmarks/results/tmp]

Writes ``<cache>/conformal_<dataset>_{logits,labels}.npy`` for the whole test set of each data set
(MNIST t10k, 10,000 images, with the bundled model ``service/default_model``; the JPEG-q75 CIFAR-10
test copy, 10,000 images, with the pretrained ResNet56), and for MNIST also
``conformal_mnist_trust.npy``: the bundled composite detector's trust (its conformal p-value) of each
test image. Logits are the model's float32 outputs; every later computation turns them into float64.
One CPU thread by default (the machine is shared); an existing file is kept, not recomputed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from detectors.datasets import load_cifar_npz, load_idx_split

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = REPO / "benchmarks" / "results" / "tmp"
MODEL_DIR = REPO / "service" / "default_model"


def cache_path(cache: Path, dataset: str, what: str) -> Path:
    """``<cache>/conformal_<dataset>_<what>.npy``; what is logits, labels or trust."""
    return Path(cache) / f"conformal_{dataset}_{what}.npy"


def _logits(model: torch.nn.Module, x: np.ndarray, batch: int = 500) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([model(torch.from_numpy(x[i:i + batch])) for i in range(0, len(x), batch)]).numpy()


def mnist(data_dir: Path, cache: Path, with_trust: bool) -> None:
    from safetensors.torch import load_file

    from detectors.zoo.mnist_cnn import MnistCNN

    model = MnistCNN()
    model.load_state_dict(load_file(str(MODEL_DIR / "model.safetensors")))
    model.eval()
    x, y = load_idx_split(data_dir / "mnist", "t10k")
    if not cache_path(cache, "mnist", "logits").exists():
        np.save(cache_path(cache, "mnist", "logits"), _logits(model, x))
        np.save(cache_path(cache, "mnist", "labels"), y)
    if with_trust and not cache_path(cache, "mnist", "trust").exists():
        from detectors.persist import load_detector

        det = load_detector(MODEL_DIR / "detector", model)
        trust = [det.score(torch.from_numpy(x[i:i + 250])).trust.numpy() for i in range(0, len(x), 250)]
        np.save(cache_path(cache, "mnist", "trust"), np.concatenate(trust))


def cifar10(data_dir: Path, cache: Path) -> None:
    from detectors.zoo.cifar_resnet import resnet56
    from service.models import read_state_dict

    if cache_path(cache, "cifar10", "logits").exists():
        return
    model = resnet56(normalize=True)
    model.load_state_dict(read_state_dict(data_dir / "cifar10_resnet" / "resnet56-4bfd9763.th"))
    model.eval()
    x, y = load_cifar_npz(data_dir / "cifar10_jpeg_q75" / "cifar10_test_jpegq75.npz")
    np.save(cache_path(cache, "cifar10", "logits"), _logits(model, x))
    np.save(cache_path(cache, "cifar10", "labels"), y)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--dataset", nargs="+", choices=("mnist", "cifar10"), default=["mnist", "cifar10"])
    p.add_argument("--no-trust", action="store_true", help="skip the MNIST detector's trust (the slow part)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    for name in args.dataset:
        t0 = time.perf_counter()
        if name == "mnist":
            mnist(args.data_dir, args.cache_dir, not args.no_trust)
        else:
            cifar10(args.data_dir, args.cache_dir)
        print(f"{name}: {time.perf_counter() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
