"""Setup of the reproduction: sizes, data sets, the model, fit / validation / test sources.

Everything here is deterministic from the seed and the data folder; nothing is attacked
or fitted yet (see :mod:`benchmarks.repro.attacks_stage` for the splits).
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from detectors.datasets import load_cifar_npz, load_idx_split

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "benchmarks" / "results"

# Table 1 columns (key, header); "ood" pools the OOD sets of the data set
TABLE1 = (("noise", "Noise"), ("pgd", "PGD"), ("rotation", "Rotation"), ("bb", "B&B"), ("bb_l2", "B&B L2"),
          ("ood", "OOD"))
ADAPTIVE = (("t_sce", "T-SCE"), ("t_mse", "T-MSE"), ("csa", "CSA"))
ATTACK_SETS = ("noise", "pgd", "pgd_l2", "rotation", "bb", "bb_l2", "t_sce", "t_mse", "csa")
# validation types that decide the model choice (each weighted equally)
VAL_TYPES = ("noise", "pgd", "pgd_l2", "rotation", "t_sce", "ood")


# ------------------------------------------------------------------------------ setup


@dataclass
class Sizes:
    n_test: int
    n_ood: int
    n_attack: int  # PGD ℓ∞ / ℓ2 sources
    n_targeted: int  # T-SCE / T-MSE sources
    n_bb: int
    n_csa: int
    n_fit: int
    n_val: int
    n_val_ood: int
    n_val_attack: int
    n_val_fit: int
    pgd_steps: int
    targeted_steps: int
    csa_steps: int
    bb_steps: int


QUICK = dict(n_test=250, n_ood=100, n_attack=60, n_targeted=30, n_bb=0, n_csa=4, n_fit=200, n_val=100,
             n_val_ood=80, n_val_attack=40, n_val_fit=100, pgd_steps=10, targeted_steps=10, csa_steps=5,
             bb_steps=20)
FULL = {
    "mnist": dict(n_test=2000, n_ood=2000, n_attack=1000, n_targeted=1000, n_bb=200, n_csa=100, n_fit=10000,
                  n_val=1000, n_val_ood=1000, n_val_attack=500, n_val_fit=5000, pgd_steps=70,
                  targeted_steps=100, csa_steps=100, bb_steps=100),
    "cifar10": dict(n_test=1000, n_ood=1000, n_attack=250, n_targeted=150, n_bb=40, n_csa=16, n_fit=3000,
                    n_val=500, n_val_ood=500, n_val_attack=150, n_val_fit=0, pgd_steps=70,
                    targeted_steps=100, csa_steps=100, bb_steps=100),
}


@dataclass
class Split:
    """Inputs of one evaluation split ("val" or "test"): set name -> [n, *input_shape].

    "clean" holds the correctly classified clean images (the positives of every metric),
    "misclassified" the clean images the model gets wrong (kept out of the pooled AUROC)."""

    name: str
    sets: dict[str, torch.Tensor] = field(default_factory=dict)
    attacks: dict[str, dict] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    clean_y: torch.Tensor | None = None
    misclassified_y: torch.Tensor | None = None  # labels of the set "misclassified" (see attacks_stage)
    cache: str = "built"  # "built", "built and saved" or "read" (from a --cache-dir)


@dataclass
class Setup:
    dataset: str
    model: nn.Module
    num_classes: int
    eps: float
    ood_sets: tuple[str, ...]
    fit_x: torch.Tensor
    fit_y: torch.Tensor
    heldout_x: torch.Tensor | None
    heldout_y: torch.Tensor | None
    val_src: tuple[torch.Tensor, torch.Tensor]  # clean validation images + labels
    val_ood_src: dict[str, torch.Tensor]
    test_src: tuple[torch.Tensor, torch.Tensor]
    test_ood_src: dict[str, torch.Tensor]
    paper_bins: int
    families: tuple[str, ...]
    channel_variants: bool
    notes: dict[str, str]
    data_info: dict
    feature_layers: tuple[str, ...] | None = None  # the composite's layers (model card / service default)


class Log:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.stage_t = self.t0
        self.stages: dict[str, float] = {}
        self.current: str | None = None

    def stage(self, name: str) -> None:
        now = time.perf_counter()
        if self.current is not None:
            self.stages[self.current] = round(self.stages.get(self.current, 0.0) + now - self.stage_t, 2)
        self.current, self.stage_t = name, now
        print(f"[{now - self.t0:7.1f}s] {name}", flush=True)

    def info(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:7.1f}s]   {msg}", flush=True)

    def bar(self, label: str, done: int, total: int) -> None:
        width = 24
        filled = int(width * done / max(total, 1))
        end = "\n" if done >= total else ""
        print(f"\r           {label:<28} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}", end=end,
              flush=True)

    def finish(self) -> float:
        self.stage("done")
        return round(time.perf_counter() - self.t0, 1)


def _gen(seed: int, *key: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.default_rng([seed, *key]).integers(2**62)))


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([seed, *key])


def gaussian_noise(n: int, shape: tuple[int, ...], gen: torch.Generator, clip: bool = True) -> torch.Tensor:
    """The paper's "Gaussian noise" set, read as N(0.5, 1) per pixel i.i.d. (unit variance, centred in the
    pixel range), clipped to [0, 1] when ``clip`` (then about 62% of the pixels are exactly 0 or 1)."""
    x = 0.5 + torch.randn((n, *shape), generator=gen)
    return x.clamp(0.0, 1.0) if clip else x


def uniform_ood(n: int, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    return torch.rand((n, *shape), generator=gen)


def fashion_as_cifar(x: np.ndarray) -> torch.Tensor:
    """Fashion-MNIST [n, 1, 28, 28] -> [n, 3, 32, 32]: bilinear resize, grey tiled to RGB."""
    t = F.interpolate(torch.from_numpy(x), size=(32, 32), mode="bilinear", align_corners=False)
    return t.clamp(0.0, 1.0).repeat(1, 3, 1, 1).contiguous()


def _mnist_ood(fashion: np.ndarray, n: int, shape: tuple[int, ...], s: int, first_seed: int) -> dict:
    """Fashion-MNIST, uniform, Gaussian and unclipped Gaussian OOD sets of one split (seeds first_seed..+3)."""
    return {
        "fashion": torch.from_numpy(fashion[_rng(s, first_seed).permutation(len(fashion))[:n]]),
        "uniform": uniform_ood(n, shape, _gen(s, first_seed + 1)),
        "gaussian": gaussian_noise(n, shape, _gen(s, first_seed + 2)),
        "gaussian_unclipped": gaussian_noise(n // 2, shape, _gen(s, first_seed + 3), clip=False),
    }


def load_mnist(args, sizes: Sizes) -> Setup:
    from safetensors.torch import load_file

    from detectors.zoo.mnist_cnn import MnistCNN

    data = Path(args.data_dir)
    model_dir = Path(args.model_dir) if args.model_dir else REPO / "service" / "default_model"
    model = MnistCNN()
    model.load_state_dict(load_file(str(model_dir / "model.safetensors")))
    model.eval()
    card = json.loads((model_dir / "model_card.json").read_text())
    x_tr, y_tr = load_idx_split(data / "mnist", "train")
    x_te, y_te = load_idx_split(data / "mnist", "t10k")
    xf_tr, _ = load_idx_split(data / "fashion_mnist", "train")
    xf_te, _ = load_idx_split(data / "fashion_mnist", "t10k")
    # the model's own split (detectors/zoo/train_mnist.py): perm[:6000] validation, the rest trained on
    perm = np.random.default_rng(card["seed"]).permutation(len(x_tr))
    n_hold = len(x_tr) // 10
    val_idx, train_idx = perm[:n_hold], perm[n_hold:]
    s = args.seed
    fit_idx = _rng(s, 1).permutation(train_idx)[: sizes.n_fit]
    v = _rng(s, 2).permutation(val_idx)
    val_eval, val_fit = v[: sizes.n_val], v[sizes.n_val: sizes.n_val + sizes.n_val_fit]
    test_idx = _rng(s, 3).permutation(len(x_te))[: sizes.n_test]
    shape = (1, 28, 28)
    t = torch.from_numpy
    return Setup(
        dataset="mnist", model=model, num_classes=10, eps=0.3, ood_sets=("fashion", "uniform", "gaussian"),
        fit_x=t(x_tr[fit_idx]), fit_y=t(y_tr[fit_idx]),
        heldout_x=t(x_tr[val_fit]) if len(val_fit) else None, heldout_y=t(y_tr[val_fit]) if len(val_fit) else None,
        val_src=(t(x_tr[val_eval]), t(y_tr[val_eval])),
        val_ood_src=_mnist_ood(xf_tr, sizes.n_val_ood, shape, s, first_seed=4),
        test_src=(t(x_te[test_idx]), t(y_te[test_idx])),
        test_ood_src=_mnist_ood(xf_te, sizes.n_ood, shape, s, first_seed=8),
        paper_bins=100, families=tuple(args.families or ()),
        channel_variants=False,
        feature_layers=tuple(card["feature_layers"]) if card.get("feature_layers") else None,
        notes={
            "model": f"reference MNIST CNN (service/default_model), trained on a seeded 90% of MNIST train "
                     f"(seed {card['seed']}); card test accuracy {card['test_accuracy']:.4f}",
            "fit": f"GGA / Mahalanobis fitted on {len(fit_idx)} images of the model's training part "
                   f"(seeded subset); held-out variants on {len(val_fit)} images of the 10% validation part",
            "validation": f"{len(val_eval)} images of the model's 10% validation part (disjoint from the held-out "
                          "fit images), Fashion-MNIST TRAIN images as OOD, fresh noise, attacks on validation images",
            "ood": "Fashion-MNIST test; uniform U[0,1]; Gaussian clip(N(0.5,1),0,1) (extra: unclipped N(0.5,1))",
        },
        data_info={"mnist": str(data / "mnist"), "fashion_mnist": str(data / "fashion_mnist"),
                   "model_dir": str(model_dir), "model_card_seed": card["seed"],
                   "validation_part": "perm[:6000] of np.random.default_rng(card seed).permutation(60000)"},
    )


def load_cifar(args, sizes: Sizes) -> Setup:
    from detectors.zoo.cifar_resnet import resnet56
    from service.models import CIFAR_RESNET_LAYERS, read_state_dict

    data = Path(args.data_dir)
    weights = data / "cifar10_resnet" / "resnet56-4bfd9763.th"
    model = resnet56(normalize=True)
    model.load_state_dict(read_state_dict(weights))
    model.eval()
    x_tr, y_tr = load_cifar_npz(data / "cifar10_jpeg_q75" / "cifar10_train10k_jpegq75.npz")
    x_te, y_te = load_cifar_npz(data / "cifar10_jpeg_q75" / "cifar10_test_jpegq75.npz")
    xf_tr, _ = load_idx_split(data / "fashion_mnist", "train")
    xf_te, _ = load_idx_split(data / "fashion_mnist", "t10k")
    s = args.seed
    p = _rng(s, 1).permutation(len(x_tr))
    fit_idx, val_idx = p[: sizes.n_fit], p[sizes.n_fit: sizes.n_fit + sizes.n_val]
    test_idx = _rng(s, 3).permutation(len(x_te))[: sizes.n_test]
    shape = (3, 32, 32)
    t = torch.from_numpy
    return Setup(
        dataset="cifar10", model=model, num_classes=10, eps=8 / 255,
        ood_sets=("cross_fashion", "uniform", "gaussian"),
        fit_x=t(x_tr[fit_idx]), fit_y=t(y_tr[fit_idx]), heldout_x=None, heldout_y=None,
        val_src=(t(x_tr[val_idx]), t(y_tr[val_idx])),
        val_ood_src={
            "cross_fashion": fashion_as_cifar(xf_tr[_rng(s, 4).permutation(len(xf_tr))[: sizes.n_val_ood]]),
            "uniform": uniform_ood(sizes.n_val_ood, shape, _gen(s, 5)),
            "gaussian": gaussian_noise(sizes.n_val_ood, shape, _gen(s, 6)),
        },
        test_src=(t(x_te[test_idx]), t(y_te[test_idx])),
        test_ood_src={
            "cross_fashion": fashion_as_cifar(xf_te[_rng(s, 8).permutation(len(xf_te))[: sizes.n_ood]]),
            "uniform": uniform_ood(sizes.n_ood, shape, _gen(s, 9)),
            "gaussian": gaussian_noise(sizes.n_ood, shape, _gen(s, 10)),
        },
        paper_bins=500, families=tuple(args.families or ()), channel_variants=True,
        feature_layers=tuple(CIFAR_RESNET_LAYERS),
        notes={
            "model": "pretrained ResNet56 (akamaster, 93.6% on the exact test set) with ImageNet normalisation "
                     "inside the model",
            "caveat": "CIFAR-10 numbers are on the JPEG-q75 copies of the test set (ResNet56: 83.2% instead of "
                      "93.6% accuracy), not on the standard test set",
            "fit": f"GGA / Mahalanobis fitted on {len(fit_idx)} images of cifar10_train10k_jpegq75.npz (seeded "
                   "subset; training images of the model, JPEG-degraded like the test copy)",
            "validation": f"{len(val_idx)} other images of cifar10_train10k_jpegq75.npz (training images of the "
                          "model: there is no held-out CIFAR split here), Fashion-MNIST TRAIN images as the "
                          "cross-data-set OOD, fresh noise, attacks on validation images",
            "ood": "cross-data-set, not SVHN: Fashion-MNIST test resized to 32x32 (bilinear) and tiled to 3 "
                   "channels; uniform U[0,1]; Gaussian clip(N(0.5,1),0,1)",
        },
        data_info={"weights": str(weights), "train10k": "cifar10_jpeg_q75/cifar10_train10k_jpegq75.npz",
                   "test": "cifar10_jpeg_q75/cifar10_test_jpegq75.npz", "fashion_mnist": str(data / "fashion_mnist")},
    )


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _predict(model: nn.Module, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[s]) for s in _chunks(len(x), batch)]) if len(x) else torch.empty(0, 10)


def resolve_sizes(args) -> Sizes:
    base = dict(QUICK if args.quick else FULL[args.dataset])
    if args.n_test is not None:
        scale = args.n_test / base["n_test"]
        base["n_test"] = args.n_test
        for k in ("n_ood",):
            base[k] = args.n_test
        for k in ("n_attack", "n_targeted"):
            base[k] = max(1, min(args.n_test, round(base[k] * scale)))
    for k in list(base):
        v = getattr(args, k, None)
        if v is not None and k != "n_test":
            base[k] = v
    return Sizes(**base)


def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_avg_at_start": load}

