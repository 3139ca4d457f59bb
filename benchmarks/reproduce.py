"""Reproduce the paper's Tables 1–3 (Schwinn et al., UAI 2021) and find what drives GGA.

    python -m benchmarks.reproduce --dataset mnist --data-dir ../shared/data [--quick]
    python -m benchmarks.reproduce --dataset cifar10 --data-dir ../shared/data --n-test 500

One run, one data set. It writes ``<out>/<dataset>.json`` (every number, the command,
seed, runtime, machine, torch version, sample counts), ``<out>/<dataset>_arrays.npz``
(the scores behind the figures) and then renders ``<out>/REPORT.md`` and the PNG
figures with :mod:`benchmarks.report` (figures need the optional ``matplotlib``).

Protocol (details in the report):

- In-distribution: a seeded sample of the test set (MNIST test; CIFAR-10: the JPEG-q75
  test copy, see ``../shared/data/README.md``). The positives of every metric are the
  *correctly classified* clean samples; the attacks start from them too.
- OOD: Fashion-MNIST test (MNIST) or Fashion-MNIST resized to 32×32 and tiled to RGB
  (CIFAR-10, a cross-data-set stand-in: SVHN is not available), uniform noise U[0,1],
  Gaussian noise clip(N(0.5, 1), 0, 1) (and the unclipped N(0.5, 1) as an extra set).
- Attacks (``benchmarks.attacks``), only successful ones count: uniform noise in the
  ε-ball, PGD ℓ∞ and ℓ2, random rotations, B&B ℓ∞ / ℓ2, and the adaptive T-SCE, T-MSE, CSA.
- Methods, all fitted on training data only: MSP, ODIN, energy, Mahalanobis, GGA in the
  paper's configuration and its variants, −mean(S1) alone. CSMs are computed once per
  *gradient family* (``plain``: the library default; ``rescale``: logits rescaled to max |z| = 10;
  ``naive``: float32 cotangents p − e_i as in the official code and the library before its
  cancellation fix, or ``precise`` when the library lacks that fix) for all classes and
  every N-by-N top-N block, channel-max reduction, feature set and LODA setting is
  derived from them (the top-N block of the full CSM equals the top-N CSM exactly).
- Model selection: every choice (the factorial over rescale / softmax feature / bins /
  standardisation / fit data / top-N) is made on a VALIDATION split (MNIST: the
  model's held-out 10% of train, Fashion-MNIST *train* images, fresh noise, attacks on
  validation images); the test numbers are computed once, for pre-declared variants and
  the validation-selected configuration.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import attacks as A
from detectors.baselines import MSP, ODIN, Energy, Mahalanobis
from detectors.csm import _cotangents, _rescale, cosine_similarity_matrix
from detectors.datasets import load_cifar_npz, load_idx_split
from detectors.features import csm_features
from detectors.gga import GGADetector
from detectors.metrics import aupr_in, aupr_out, auroc, tnr_at_tpr

REPO = Path(__file__).resolve().parents[1]
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


QUICK = dict(n_test=120, n_ood=100, n_attack=60, n_targeted=30, n_bb=0, n_csa=4, n_fit=200, n_val=100,
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
    """Inputs of one evaluation split ("val" or "test"): set name -> [n, *input_shape]."""

    name: str
    sets: dict[str, torch.Tensor] = field(default_factory=dict)
    attacks: dict[str, dict] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    clean_y: torch.Tensor | None = None


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
        paper_bins=100, families=tuple(args.families or default_families()),
        channel_variants=False,
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
    from service.models import read_state_dict

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
        paper_bins=500, families=tuple(args.families or default_families()), channel_variants=True,
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


# ---------------------------------------------------------------------------- attacks


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _predict(model: nn.Module, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[s]) for s in _chunks(len(x), batch)]) if len(x) else torch.empty(0, 10)


def _run_attack(log: Log, label: str, fn, x: torch.Tensor, y: torch.Tensor, chunk: int) -> torch.Tensor:
    out = []
    for s in _chunks(len(x), chunk):
        out.append(fn(x[s], y[s], s))
        log.bar(label, s.stop, len(x))
    return torch.cat(out) if out else x[:0]


def build_split(setup: Setup, name: str, sizes: Sizes, args, log: Log) -> Split:
    """Clean (correctly classified) inputs, OOD sets and successful attacks of one split."""
    model, eps, seed = setup.model, setup.eps, args.seed
    key = 100 if name == "val" else 200
    x, y = setup.val_src if name == "val" else setup.test_src
    ood_src = setup.val_ood_src if name == "val" else setup.test_ood_src
    n_attack = sizes.n_val_attack if name == "val" else sizes.n_attack
    n_targeted = sizes.n_val_attack if name == "val" else sizes.n_targeted
    chunk = 250 if setup.dataset == "mnist" else 25
    sp = Split(name)
    pred = _predict(model, x).argmax(1)
    correct = pred == y
    sp.counts["clean_total"] = len(y)
    sp.counts["clean_correct"] = int(correct.sum())
    sp.sets["clean"], sp.clean_y = x[correct], y[correct]
    xs, ys = sp.sets["clean"], sp.clean_y
    for k, v in ood_src.items():
        sp.sets[k] = v
    log.info(f"{name}: {len(y)} clean, accuracy {correct.float().mean():.4f}; OOD " +
             ", ".join(f"{k} {len(v)}" for k, v in ood_src.items()))

    def record(att: str, x_adv: torch.Tensor, y_src: torch.Tensor, params: dict, seconds: float) -> None:
        ok = A.successful(model, x_adv, y_src) if len(x_adv) else torch.zeros(0, dtype=torch.bool)
        sp.sets[att] = x_adv[ok]
        sp.attacks[att] = {"tried": len(x_adv), "successful": int(ok.sum()),
                           "success_rate": round(float(ok.float().mean()), 4) if len(x_adv) else None,
                           "params": params, "seconds": round(seconds, 1)}
        log.info(f"{name} {att}: {int(ok.sum())}/{len(x_adv)} successful ({seconds:.0f}s)")

    def timed(att, fn, xx, yy, ch, params):
        t0 = time.perf_counter()
        adv = _run_attack(log, f"{name} {att}", fn, xx, yy, ch)
        record(att, adv, yy, params, time.perf_counter() - t0)

    g = _gen(seed, key, 1)
    timed("noise", lambda a, b, s: A.uniform_noise(a, eps, generator=g), xs, ys, 10**6,
          {"eps": eps, "distribution": "U(-eps, eps) per pixel, clipped to [0, 1]"})
    g_rot = _gen(seed, key, 2)
    timed("rotation", lambda a, b, s: A.rotate(a, 45.0, generator=g_rot), xs, ys, 10**6, {"max_degrees": 45.0})
    xa, ya = xs[:n_attack], ys[:n_attack]
    steps = sizes.pgd_steps
    timed("pgd", lambda a, b, s: A.pgd(model, a, b, eps=eps, norm="linf", steps=steps), xa, ya, chunk,
          {"eps": eps, "norm": "linf", "steps": steps, "step_size": eps / 4})
    timed("pgd_l2", lambda a, b, s: A.pgd(model, a, b, eps=10 * eps, norm="l2", steps=steps), xa, ya, chunk,
          {"eps": 10 * eps, "norm": "l2", "steps": steps, "step_size": 10 * eps / 4})
    xt, yt = xs[:n_targeted], ys[:n_targeted]
    with torch.no_grad():
        targets = A.default_targets(_predict(model, xt), yt, mode="random", generator=_gen(seed, key, 3)) \
            if len(xt) else yt
    tsteps = sizes.targeted_steps
    for att, loss in (("t_sce", "ce"), ("t_mse", "mse")):
        if name == "val" and att == "t_mse":
            continue  # T-MSE behaves like T-SCE; validation keeps one targeted attack
        timed(att, lambda a, b, s, loss=loss: A.pgd(model, a, b, eps=eps, norm="linf", steps=tsteps, targeted=True,
                                                     target=targets[s], loss=loss), xt, yt, chunk,
              {"eps": eps, "norm": "linf", "steps": tsteps, "step_size": eps / 4, "loss": loss,
               "target": "random class != label"})
    if name == "test":
        n_csa = min(sizes.n_csa, len(xs))
        if n_csa > 0:
            smooth = A.softplus_copy(model, 10.0)
            csteps = sizes.csa_steps
            timed("csa", lambda a, b, s: A.csa(model, a, b, eps=eps, steps=csteps, weights=(0.8, 0.2),
                                               norm="linf", smooth_model=smooth), xs[:n_csa], ys[:n_csa],
                  4 if setup.dataset == "mnist" else 1,
                  {"eps": eps, "steps": csteps, "weights": [0.8, 0.2], "softplus_beta": 10.0, "norm": "linf"})
        else:
            sp.attacks["csa"] = {"tried": 0, "successful": 0, "not_run": "n_csa = 0"}
            sp.sets["csa"] = xs[:0]
        n_bb = min(sizes.n_bb, len(xs))
        for att, norm, e in (("bb", "linf", eps), ("bb_l2", "l2", 10 * eps)):
            if n_bb == 0:
                sp.attacks[att] = {"tried": 0, "successful": 0,
                                   "not_run": "skipped in quick mode" if args.quick else "n_bb = 0"}
                sp.sets[att] = xs[:0]
                continue
            try:
                timed(att, lambda a, b, s, norm=norm, e=e: A.brendel_bethge(model, a, b, norm=norm, eps=e,
                                                                           steps=sizes.bb_steps, lr=0.001),
                      xs[:n_bb], ys[:n_bb], 20 if setup.dataset == "mnist" else 5,
                      {"eps": e, "norm": norm, "steps": sizes.bb_steps, "lr": 0.001,
                       "init": "foolbox LinearSearchBlendedUniformNoiseAttack", "projected_to_eps_ball": True})
            except ImportError as exc:
                sp.attacks[att] = {"tried": 0, "successful": 0, "not_run": f"ImportError: {exc}"}
                sp.sets[att] = xs[:0]
                log.info(f"{name} {att}: not run ({exc})")
    for k, v in sp.sets.items():
        sp.counts[k] = len(v)
    return sp


# ------------------------------------------------------------------------------- CSMs


FAMILY_TEXT = {
    "plain": "library default (detectors.csm cosine_similarity_maps, no rescaling)",
    "rescale": "logits rescaled to max |z| = 10 before the loss, differentiably (rescale_logits=True, the "
               "official code's default)",
    "naive": "float32 cotangents p − e_i computed naively, as the official code (F.cross_entropy backward) and "
             "this library before its cancellation fix: p_k − 1 rounds to 0 once softmax saturates",
    "precise": "cancellation-free float64 cotangents (the fix, implemented in benchmarks/reproduce.py)",
}


def library_cotangents_precise() -> bool:
    """Whether detectors.csm keeps the −(1 − p_k̂) term when the float32 softmax saturates."""
    z = torch.tensor([[40.0, 0.0, -5.0]])
    return bool(_cotangents(z, torch.tensor([[0, 1, 2]]))[0, 0, 0] != 0)


def default_families() -> tuple[str, ...]:
    """plain + rescale, and the other side of the cotangent fix (naive if the library has it, else precise)."""
    return ("plain", "rescale", "naive" if library_cotangents_precise() else "precise")


def _naive_cotangents(z: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(p − e_c) in the model dtype, computed the naive way: [N, B, C] (the pre-fix library / official code)."""
    p = torch.softmax(z.detach(), dim=1)
    cot = p.unsqueeze(0).repeat(classes.shape[1], 1, 1)
    rows = torch.arange(z.shape[0], device=z.device)
    for j in range(classes.shape[1]):
        cot[j, rows, classes[:, j]] -= 1.0
    return cot


def _precise_cotangents(z: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(p − e_c) per analysed class without cancellation, rescaled to max |entry| = 1: [N, B, C].

    The library's fp32 cotangent rounds p_k̂ − 1 to exactly 0 once softmax saturates
    (logit gap ≳ 17), which drops the −(1 − p_k̂)∇z_k̂ term from the predicted class's
    gradient. Here p is float64 and the c-th entry is −Σ_{j≠c} p_j (a sum of small
    positive numbers, no cancellation); sign(Jᵀ c) does not depend on the scale of c, so
    each cotangent is divided by its max |entry| before the cast back to the model dtype.
    """
    p = torch.softmax(z.detach().double(), dim=1)
    rows = torch.arange(z.shape[0], device=z.device)
    out = []
    for j in range(classes.shape[1]):
        c = classes[:, j]
        cot = p.clone()
        others = p.clone()
        others[rows, c] = 0.0
        cot[rows, c] = -others.sum(dim=1)
        cot = cot / cot.abs().amax(dim=1, keepdim=True).clamp_min(1e-300)
        out.append(cot.to(z.dtype))
    return torch.stack(out)


def family_csms(model: nn.Module, x: torch.Tensor, family: str, channel_variants: bool) -> dict[str, torch.Tensor]:
    """Full (all-class) CSMs of one gradient family from ONE set of backward passes.

    family: "plain" (the library default), "rescale" (logits scaled to max |z| = 10,
    differentiably, as ``rescale_logits=True`` and the official code), "naive" (float32
    p − e_i, see :func:`_naive_cotangents`), "precise" (see :func:`_precise_cotangents`).
    Same math as ``detectors.csm.cosine_similarity_maps(model, x, None, ...)`` with the
    "loop" strategy (``tests/benchmarks/test_reproduce.py`` checks equality), plus the
    channel-max reduction of the same sign maps when ``channel_variants``.
    Returns {"csm", "csm_chmax" (optional), "classes", "logits"}.
    """
    with torch.inference_mode(False), torch.enable_grad():
        xr = x.detach().clone().requires_grad_(True)
        z = model(xr)
        logits = z.detach()
        n = z.shape[1]
        classes = torch.topk(logits, n, dim=1).indices
        if family == "rescale":
            z = _rescale(z)
        if family == "precise":
            cot = _precise_cotangents(z, classes)
        elif family == "naive":
            cot = _naive_cotangents(z, classes)
        else:
            cot = _cotangents(z, classes)
        signs = torch.empty((n, *x.shape), dtype=x.dtype)
        for j in range(n):
            (g,) = torch.autograd.grad(z, xr, grad_outputs=cot[j], retain_graph=j < n - 1)
            torch.sign(g, out=signs[j])
    out = {"csm": cosine_similarity_matrix(signs.transpose(0, 1)), "classes": classes, "logits": logits}
    if channel_variants:
        out["csm_chmax"] = cosine_similarity_matrix(signs.amax(dim=2).transpose(0, 1))
    return out


def logit_margin(logits: torch.Tensor) -> torch.Tensor:
    """log(p_max / (1 − p_max)) = z_k̂ − logsumexp_{j≠k̂} z_j in float64: [B].

    The confidence that a float32 max softmax probability cannot resolve beyond ~17 (it
    saturates at 1.0); it keeps growing for over-confident inputs such as PGD examples.
    An experimental 12th feature (not a GGADetector option).
    """
    z = logits.double()
    top = z.amax(dim=1)
    rest = z.clone()
    rest[torch.arange(len(z)), z.argmax(dim=1)] = -math.inf
    return top - torch.logsumexp(rest, dim=1)


class CSMStore:
    """CSMs of every (family, set), computed once; features for any (top-N, channel, softmax) view."""

    def __init__(self, model: nn.Module, channel_variants: bool, batch: int, log: Log) -> None:
        self.model, self.channel_variants, self.batch, self.log = model, channel_variants, batch, log
        self.data: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        self.seconds: dict[str, float] = {}

    def compute(self, family: str, key: str, x: torch.Tensor) -> None:
        if (family, key) in self.data:
            return
        t0 = time.perf_counter()
        parts = []
        for s in _chunks(len(x), self.batch):
            parts.append(family_csms(self.model, x[s], family, self.channel_variants))
            self.log.bar(f"CSM {family} {key}", s.stop, len(x))
        if parts:
            self.data[(family, key)] = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        else:
            c = 10
            self.data[(family, key)] = {"csm": torch.empty(0, c, c), "csm_chmax": torch.empty(0, c, c),
                                        "classes": torch.empty(0, c, dtype=torch.long), "logits": torch.empty(0, c)}
        self.seconds[family] = self.seconds.get(family, 0.0) + time.perf_counter() - t0

    def features(self, family: str, key: str, top_n: int | None = None, channel: str | None = None,
                 softmax: bool = False, margin: bool = False) -> torch.Tensor:
        d = self.data[(family, key)]
        csm = d["csm_chmax"] if channel == "max" else d["csm"]
        n = csm.shape[1] if top_n is None else top_n
        f = csm_features(csm[:, :n, :n]) if len(csm) else torch.empty(0, 10)
        if softmax:
            f = torch.cat([f, torch.softmax(d["logits"].float(), dim=1).amax(dim=1, keepdim=True)], dim=1)
        if margin:
            f = torch.cat([f, logit_margin(d["logits"])[:, None].to(f.dtype)], dim=1)
        return f.double()

    def pred(self, family: str, key: str) -> torch.Tensor:
        return self.data[(family, key)]["classes"][:, 0]


# ------------------------------------------------------------------------ GGA variants


@dataclass(frozen=True)
class GGAVariant:
    """A GGADetector configuration on cached CSMs (family = how the gradients were taken)."""

    family: str = "plain"
    top_n: int | None = None
    channel: str | None = None
    softmax: bool = False
    margin: bool = False  # experimental: logit margin log(p/(1-p)) as a feature (not a GGADetector option)
    bins: int = 100
    standardize: bool = True
    # "train": the fit subset of the model's training data; "heldout": held-out images (MNIST: the model's
    # validation part); "train_matched": the first len(heldout) training fit images (same size as heldout)
    fit_on: str = "train"
    calibration_fraction: float = 0.3

    def label(self) -> str:
        parts = [self.family, f"top{self.top_n or 'C'}", f"bins{self.bins}"]
        if self.channel:
            parts.append("chmax")
        if self.softmax:
            parts.append("softmax")
        if self.margin:
            parts.append("margin")
        if not self.standardize:
            parts.append("nostd")
        parts.append(f"fit-{self.fit_on}")
        if self.calibration_fraction != 0.3:
            parts.append(f"cal{self.calibration_fraction}")
        return "/".join(parts)

    def detector_kwargs(self) -> dict:
        return dict(top_n=self.top_n, n_bins=self.bins, channel_reduce=self.channel,
                    rescale_logits=self.family == "rescale", include_softmax=self.softmax,
                    calibration_fraction=self.calibration_fraction, standardize=self.standardize)

    def as_dict(self) -> dict:
        return {"family": self.family, "top_n": self.top_n, "channel_reduce": self.channel,
                "include_softmax": self.softmax, "include_margin": self.margin, "n_bins": self.bins,
                "standardize": self.standardize,
                "fit_on": self.fit_on, "calibration_fraction": self.calibration_fraction,
                "rescale_logits": self.family == "rescale",
                "cotangents": self.family if self.family in ("naive", "precise") else "library"}


class _CachedGGA(GGADetector):
    """The real ``GGADetector.fit`` (correct samples only, seeded fit/calibration split,
    standardisation, LODA, conformal calibration) on precomputed features."""

    def __init__(self, model: nn.Module, feats: torch.Tensor, pred: torch.Tensor, **kwargs) -> None:
        super().__init__(model, **kwargs)
        self._cached = (feats.float(), pred)

    def features(self, x, batch_size=256, progress=None):  # noqa: ARG002 - same signature as the parent
        return self._cached


class GGABank:
    def __init__(self, setup: Setup, store: CSMStore, seed: int) -> None:
        self.setup, self.store, self.seed = setup, store, seed
        self._dets: dict[GGAVariant, GGADetector] = {}

    def detector(self, v: GGAVariant) -> GGADetector:
        if v not in self._dets:
            key = "heldout" if v.fit_on == "heldout" else "fit"
            y = self.setup.heldout_y if v.fit_on == "heldout" else self.setup.fit_y
            feats = self.store.features(v.family, key, v.top_n, v.channel, v.softmax, v.margin)
            pred = self.store.pred(v.family, key)
            if v.fit_on == "train_matched":
                n = len(self.setup.heldout_y)
                feats, pred, y = feats[:n], pred[:n], y[:n]
            det = _CachedGGA(self.setup.model, feats, pred, seed=self.seed, **v.detector_kwargs())
            det.fit(torch.zeros(len(y), 1), y)
            self._dets[v] = det
        return self._dets[v]

    def scores(self, v: GGAVariant, split: str, name: str) -> tuple[np.ndarray, np.ndarray]:
        det = self.detector(v)
        f = self.store.features(v.family, f"{split}/{name}", v.top_n, v.channel, v.softmax, v.margin)
        if len(f) == 0:
            return np.empty(0), np.empty(0)
        s, trust = det.score_features(f)
        return s.numpy(), trust.numpy()


# ------------------------------------------------------------------------------ metrics


def _metrics(s_in: np.ndarray, s_out: np.ndarray) -> dict | None:
    if len(s_out) == 0 or len(s_in) == 0:
        return None
    return {"auroc": auroc(s_in, s_out), "aupr_in": aupr_in(s_in, s_out), "aupr_out": aupr_out(s_in, s_out),
            "tnr_at_95_tpr": tnr_at_tpr(s_in, s_out, 0.95), "n": int(len(s_out))}


def evaluate(scores: dict[str, np.ndarray], ood_sets: tuple[str, ...]) -> dict:
    """Per-type metrics against the clean scores, the Table 1 row and the Table 2 row."""
    s_in = scores["clean"]
    per_type = {k: _metrics(s_in, v) for k, v in scores.items() if k != "clean"}
    ood = np.concatenate([scores[k] for k in ood_sets if k in scores])
    per_type["ood"] = _metrics(s_in, ood)
    pooled_parts = [scores[k] for k, _ in TABLE1 if k != "ood" and k in scores] + [ood]
    pooled = _metrics(s_in, np.concatenate(pooled_parts))
    row = {k: (per_type[k]["tnr_at_95_tpr"] if per_type.get(k) else None) for k, _ in TABLE1}
    if pooled:
        row.update(auroc=pooled["auroc"], aupr_in=pooled["aupr_in"], aupr_out=pooled["aupr_out"], n_pooled=pooled["n"])
    t2 = {k: (per_type[k]["tnr_at_95_tpr"] if per_type.get(k) else None) for k, _ in ADAPTIVE}
    return {"per_type": per_type, "table1": row, "table2": t2}


def val_summary(scores: dict[str, np.ndarray], ood_sets: tuple[str, ...], trust_clean: np.ndarray | None,
                alpha: float = 0.05) -> dict:
    ev = evaluate(scores, ood_sets)
    types = [t for t in VAL_TYPES if ev["per_type"].get(t)]
    out = {
        "mean_auroc": float(np.mean([ev["per_type"][t]["auroc"] for t in types])),
        "mean_tnr": float(np.mean([ev["per_type"][t]["tnr_at_95_tpr"] for t in types])),
        "pooled_auroc": ev["table1"].get("auroc"),
        "auroc": {t: round(ev["per_type"][t]["auroc"], 4) for t in types},
        "tnr": {t: round(ev["per_type"][t]["tnr_at_95_tpr"], 4) for t in types},
    }
    if trust_clean is not None:
        out["clean_flag_rate"] = float(np.mean(trust_clean < alpha))
    return out


# ------------------------------------------------------------------------------- timing


def _time_ms(fn, x: torch.Tensor, repeats: int) -> float:
    fn(x[: min(8, len(x))])
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - t0)
    return 1000.0 * best / len(x)


# --------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=("mnist", "cifar10"), required=True)
    p.add_argument("--data-dir", type=Path, required=True, help="the shared data folder (../shared/data)")
    p.add_argument("--quick", action="store_true", help="a few hundred samples, short attacks, no B&B")
    p.add_argument("--n-test", type=int, default=None, help="clean in-distribution test samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--model-dir", type=Path, default=None, help="MNIST model folder (default: service/default_model)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--families", nargs="+", choices=tuple(FAMILY_TEXT), default=None,
                   help="gradient families to compute (default: plain rescale, and naive when the library has "
                        "the cancellation-free cotangents, else precise)")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--no-report", action="store_true", help="write the JSON only")
    for name in ("n_ood", "n_attack", "n_targeted", "n_bb", "n_csa", "n_fit", "n_val", "n_val_ood", "n_val_attack",
                 "n_val_fit", "pgd_steps", "targeted_steps", "csa_steps", "bb_steps"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    return p.parse_args(argv)


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


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    sizes = resolve_sizes(args)
    log = Log()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    machine = machine_info()
    log.stage(f"load {args.dataset} ({'quick' if args.quick else 'full'} mode)")
    setup = (load_mnist if args.dataset == "mnist" else load_cifar)(args, sizes)
    setup.families = tuple(dict.fromkeys(("plain", *setup.families)))  # plain is the library default: always
    model = setup.model
    for prm in model.parameters():
        prm.requires_grad_(False)
    C = setup.num_classes

    log.stage("attacks and OOD sets")
    splits = {"val": build_split(setup, "val", sizes, args, log), "test": build_split(setup, "test", sizes, args, log)}
    has_heldout = setup.heldout_x is not None and len(setup.heldout_x) > 0

    # ---------------------------------------------------------------- CSMs, once per family
    log.stage("CSMs (one gradient pass per family and set)")
    store = CSMStore(model, setup.channel_variants, 250 if setup.dataset == "mnist" else 50, log)
    for fam in setup.families:
        store.compute(fam, "fit", setup.fit_x)
        if has_heldout:
            store.compute(fam, "heldout", setup.heldout_x)
        for sp in splits.values():
            for k, v in sp.sets.items():
                store.compute(fam, f"{sp.name}/{k}", v)
    log.info("CSM seconds per family: " + ", ".join(f"{k} {v:.0f}" for k, v in store.seconds.items()))

    # ---------------------------------------------------------------- baselines
    log.stage("baselines (MSP, ODIN, energy, Mahalanobis)")
    maha = Mahalanobis(model, lambda m, x: m.penultimate(x)).fit(setup.fit_x, setup.fit_y)
    baselines = {
        "msp": MSP(model),
        "odin": ODIN(model, temperature=1000.0, epsilon=0.0014, clip=(0.0, 1.0)),
        "energy": Energy(model),
        "mahalanobis": maha,
    }
    scores: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for mname, det in baselines.items():
        scores[mname] = {}
        for sp in splits.values():
            scores[mname][sp.name] = {k: (det.score(v).numpy() if len(v) else np.empty(0)) for k, v in sp.sets.items()}
        log.info(f"{mname} scored")

    # ---------------------------------------------------------------- validation factorial
    log.stage("validation: factorial over GGA choices")
    bank = GGABank(setup, store, args.seed)
    other_bins = 500 if setup.paper_bins == 100 else 100
    top_ns = [None] + [n for n in (5, 3) if n < C]
    channels = [None, "max"] if setup.channel_variants else [None]
    fits = ["train", "train_matched", "heldout"] if has_heldout else ["train"]
    grid = [GGAVariant(fam, tn, ch, sm, mg, b, st, fo)
            for fam, tn, ch, sm, mg, b, st, fo in itertools.product(
                setup.families, top_ns, channels, (False, True), (False, True), (setup.paper_bins, other_bins),
                (True, False), fits)]
    factorial = []
    val = splits["val"]
    for i, v in enumerate(grid):
        sc, trust_clean = {}, None
        for k in val.sets:
            s, tr = bank.scores(v, "val", k)
            sc[k] = s
            if k == "clean":
                trust_clean = tr
        factorial.append({"label": v.label(), "config": v.as_dict(), **val_summary(sc, setup.ood_sets, trust_clean)})
        log.bar("factorial", i + 1, len(grid))
    # single-score references on validation
    refs = {}
    for mname in baselines:
        refs[mname] = val_summary(scores[mname]["val"], setup.ood_sets, None)
    for fam in setup.families:
        refs[f"neg_s1_mean[{fam}]"] = val_summary(
            {k: -store.features(fam, f"val/{k}")[:, 0].numpy() for k in val.sets}, setup.ood_sets, None)
    # single features: AUROC with the raw feature as the score (< 0.5: the feature drops for anomalies)
    single = {}
    fnames = ["s1_mean", "s1_max", "s1_min", "s1_std", "s1_energy", "s2_mean", "s2_max", "s2_min", "s2_std",
              "s2_energy", "softmax_max", "logit_margin"]
    for fam in setup.families:
        fv = {k: store.features(fam, f"val/{k}", softmax=True, margin=True).numpy() for k in val.sets}
        single[fam] = {}
        for j, fn in enumerate(fnames):
            single[fam][fn] = val_summary({k: a[:, j] for k, a in fv.items()}, setup.ood_sets, None)["auroc"]
    paper_variant = GGAVariant(family="plain", bins=setup.paper_bins)
    ranked = sorted(factorial, key=lambda r: (-r["mean_auroc"], -r["mean_tnr"]))
    best = ranked[0]
    selected = _variant_from(best["config"])
    # calibration fraction for the selected configuration (validation only)
    calib = []
    for cf in (0.1, 0.2, 0.3, 0.5):
        v = GGAVariant(**{**selected.__dict__, "calibration_fraction": cf})
        sc = {k: bank.scores(v, "val", k)[0] for k in val.sets}
        tr = bank.scores(v, "val", "clean")[1]
        det = bank.detector(v)
        calib.append({"calibration_fraction": cf, "n_fit": det.fit_stats.n_fit,
                      "n_calibration": det.fit_stats.n_calibration,
                      **val_summary(sc, setup.ood_sets, tr)})
    levels = {"family": list(setup.families), "top_n": top_ns, "channel": channels, "softmax": [False, True],
              "margin": [False, True],
              "bins": [setup.paper_bins, other_bins], "standardize": [True, False], "fit_on": fits}
    ablation = _ablation(factorial, paper_variant, selected, levels)

    # ---------------------------------------------------------------- test: pre-declared methods + selected
    log.stage("test: methods and variants")
    variants: dict[str, tuple[GGAVariant, str]] = {
        "gga": (paper_variant, "paper configuration: all classes, 10 features, LODA 100 projections x "
                               f"{setup.paper_bins} bins, standardised, fit on training data"),
    }
    if "rescale" in setup.families:
        variants["gga_rescale"] = (GGAVariant(**{**paper_variant.__dict__, "family": "rescale"}),
                                   "logits rescaled to max |z| = 10 (official code default)")
    if setup.channel_variants:
        variants["gga_chmax"] = (GGAVariant(**{**paper_variant.__dict__, "channel": "max"}),
                                 "channel max of the sign maps (official code)")
        if "rescale" in setup.families:
            variants["gga_official"] = (GGAVariant(**{**paper_variant.__dict__, "family": "rescale", "channel": "max"}),
                                        "rescale + channel max: the official code's defaults")
    variants["gga_softmax"] = (GGAVariant(**{**paper_variant.__dict__, "softmax": True}),
                               "11th feature: max softmax probability")
    variants["gga_margin"] = (GGAVariant(**{**paper_variant.__dict__, "margin": True}),
                              "experimental 11th feature: logit margin log(p_max/(1-p_max)) in float64")
    variants[f"gga_bins{other_bins}"] = (GGAVariant(**{**paper_variant.__dict__, "bins": other_bins}),
                                         f"LODA with {other_bins} bins")
    variants["gga_nostd"] = (GGAVariant(**{**paper_variant.__dict__, "standardize": False}),
                             "features not standardised before LODA")
    if has_heldout:
        variants["gga_heldout"] = (GGAVariant(**{**paper_variant.__dict__, "fit_on": "heldout"}),
                                   f"fitted on {len(setup.heldout_x)} held-out (validation-part) images, not "
                                   "training images")
        variants["gga_train_matched"] = (GGAVariant(**{**paper_variant.__dict__, "fit_on": "train_matched"}),
                                         f"fitted on {len(setup.heldout_x)} training images (the size of the "
                                         "held-out fit set)")
    for tn in top_ns[1:]:
        variants[f"gga_top{tn}"] = (GGAVariant(**{**paper_variant.__dict__, "top_n": tn}), f"partial CSM, top-{tn}")
    if "naive" in setup.families:
        variants["gga_naive"] = (GGAVariant(**{**paper_variant.__dict__, "family": "naive"}),
                                 "float32 cotangents as in the official code / the library before the fix")
    if "precise" in setup.families:
        variants["gga_precise"] = (GGAVariant(**{**paper_variant.__dict__, "family": "precise"}),
                                   "cancellation-free cotangents (proposed fix, not in detectors/)")
    variants["gga_selected"] = (selected, f"chosen on validation: {selected.label()}")

    test = splits["test"]
    flag_rates = {}
    for name, (v, _) in variants.items():
        scores[name] = {"val": {}, "test": {}}
        for sp in splits.values():
            for k in sp.sets:
                s, tr = bank.scores(v, sp.name, k)
                scores[name][sp.name][k] = s
                if k == "clean":
                    flag_rates.setdefault(name, {})[sp.name] = float(np.mean(tr < 0.05))
    scores["neg_s1_mean"] = {sp.name: {k: -store.features("plain", f"{sp.name}/{k}")[:, 0].numpy()
                                       for k in sp.sets} for sp in splits.values()}
    descriptions = {
        "msp": "max softmax probability (Hendrycks & Gimpel 2017), the paper's 'Baseline'",
        "odin": "ODIN T=1000, eps=0.0014 in [0,1] pixel units, clipped to [0,1] (Liang et al. 2018)",
        "energy": "energy score, T=1 (Liu et al. 2020)",
        "mahalanobis": "Mahalanobis on penultimate features, class means + tied covariance fitted on the fit "
                       "set, single layer, no input pre-processing, no adversarial tuning (the paper's 'Maha' "
                       "uses Lee et al.'s tuned version)",
        "neg_s1_mean": "-mean(S1) of the plain all-class CSM as the score, no fitting (paper Figure 2 feature)",
        **{k: d for k, (_, d) in variants.items()},
    }
    results = {}
    for name in scores:
        ev_test = evaluate(scores[name]["test"], setup.ood_sets)
        results[name] = {"description": descriptions[name], **ev_test,
                         "validation": val_summary(scores[name]["val"], setup.ood_sets, None)}
        if name in variants:
            results[name]["config"] = variants[name][0].as_dict()
            results[name]["clean_flag_rate_at_alpha_0.05"] = flag_rates[name]

    table3 = {}
    for label, tn in [("top-C (all)", None)] + [(f"top-{n}", n) for n in top_ns[1:]]:
        name = "gga" if tn is None else f"gga_top{tn}"
        r = results[name]["table1"]
        table3[label] = {"auroc": r.get("auroc"), "aupr_in": r.get("aupr_in"), "aupr_out": r.get("aupr_out"),
                         **{k: results[name]["table2"][k] for k, _ in ADAPTIVE}}

    # ---------------------------------------------------------------- timing
    log.stage("timing (ms per sample)")
    n_time = 64 if args.quick else (256 if setup.dataset == "mnist" else 32)
    xt = test.sets["clean"][:n_time]
    reps = 3 if setup.dataset == "mnist" and not args.quick else 1
    timing = {"n_samples": len(xt), "repeats_best_of": reps, "threads": torch.get_num_threads(),
              "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    with torch.no_grad():
        timing["forward_only"] = _time_ms(lambda a: model(a), xt, reps)
    for mname, det in baselines.items():
        timing[mname] = _time_ms(lambda a, det=det: det.score(a, batch_size=len(a)), xt, reps)
    for name in ["gga", "gga_rescale", "gga_chmax"] + [f"gga_top{tn}" for tn in top_ns[1:]]:
        if name in variants:
            det = bank.detector(variants[name][0])
            timing[name] = _time_ms(lambda a, det=det: det.score(a), xt, reps)
    timing = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in timing.items()}
    log.info(", ".join(f"{k} {v}" for k, v in timing.items()))

    # ---------------------------------------------------------------- diagnostics
    diagnostics = _diagnostics(store, setup, splits)

    runtime = log.finish()
    out = {
        "dataset": args.dataset,
        "quick": args.quick,
        "command": "python -m benchmarks.reproduce " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "seed": args.seed,
        "started": started,
        "runtime_s": runtime,
        "stage_seconds": log.stages,
        "csm_seconds_per_family": {k: round(v, 1) for k, v in store.seconds.items()},
        "machine": machine,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "sizes": sizes.__dict__,
        "notes": setup.notes,
        "data": setup.data_info,
        "model_accuracy": {sp.name: sp.counts["clean_correct"] / sp.counts["clean_total"] for sp in splits.values()},
        "samples": {sp.name: sp.counts for sp in splits.values()} | {
            "fit": len(setup.fit_x), "heldout_fit": len(setup.heldout_x) if has_heldout else 0},
        "attacks": {sp.name: sp.attacks for sp in splits.values()},
        "ood_sets": list(setup.ood_sets),
        "families": {f: FAMILY_TEXT[f] for f in setup.families},
        "library_cotangents_precise": library_cotangents_precise(),
        "validation_note": "validation has no B&B and no CSA (cost) and no T-MSE (same family as T-SCE); "
                           "choices rest on noise, PGD, PGD-L2, rotation, T-SCE and the pooled OOD sets",
        "paper_bins": setup.paper_bins,
        "methods": results,
        "tables": {
            "table1": {m: results[m]["table1"] for m in results},
            "table2": {m: results[m]["table2"] for m in results},
            "table3": table3,
        },
        "timing_ms_per_sample": timing,
        "validation": {
            "criterion": "mean AUROC over the validation types " + ", ".join(VAL_TYPES) +
                         " (ood = the OOD sets pooled); ties broken by mean TNR at 95% TPR",
            "factorial": ranked,
            "references": refs,
            "single_feature_auroc": single,
            "ablation": ablation,
            "calibration_fraction": calib,
            "selected": {"label": selected.label(), "config": selected.as_dict(), "summary": best},
        },
        "diagnostics": diagnostics,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.dataset}.json"
    path.write_text(json.dumps(_clean_json(out), indent=1) + "\n")
    _save_arrays(args.out / f"{args.dataset}_arrays.npz", scores, store, splits, setup)
    print(f"wrote {path} ({runtime:.0f}s)", flush=True)
    if not args.no_report:
        from benchmarks import report

        report.write_report(args.out, figures=not args.no_figures)
    return out


def _variant_from(cfg: dict) -> GGAVariant:
    return GGAVariant(family=cfg["family"], top_n=cfg["top_n"], channel=cfg["channel_reduce"],
                      softmax=cfg["include_softmax"], margin=cfg["include_margin"], bins=cfg["n_bins"],
                      standardize=cfg["standardize"],
                      fit_on=cfg["fit_on"], calibration_fraction=cfg["calibration_fraction"])


def _ablation(factorial: list[dict], base: GGAVariant, selected: GGAVariant, levels: dict[str, list]) -> dict:
    """Validation evidence per factor: one factor changed at a time from the paper configuration and
    from the selected one, and main effects (mean over all factorial cells at each level)."""
    by_label = {r["label"]: r for r in factorial}

    def one_at_a_time(center: GGAVariant) -> dict:
        c = by_label[center.label()]
        out = {"center": {"label": center.label(), "mean_auroc": c["mean_auroc"], "mean_tnr": c["mean_tnr"],
                          "auroc": c["auroc"], "clean_flag_rate": c.get("clean_flag_rate")}}
        for factor, opts in levels.items():
            for level in opts:
                if level == getattr(center, factor):
                    continue
                r = by_label.get(GGAVariant(**{**center.__dict__, factor: level}).label())
                if r is None:
                    continue
                out[f"{factor}={level}"] = {
                    "label": r["label"], "mean_auroc": r["mean_auroc"], "mean_tnr": r["mean_tnr"],
                    "auroc": r["auroc"], "delta_mean_auroc": r["mean_auroc"] - c["mean_auroc"],
                    "clean_flag_rate": r.get("clean_flag_rate")}
        return out

    fields = {"family": "family", "top_n": "top_n", "channel": "channel_reduce", "softmax": "include_softmax",
              "margin": "include_margin",
              "bins": "n_bins", "standardize": "standardize", "fit_on": "fit_on"}
    main = {}
    for factor, ck in fields.items():
        cells: dict[str, list[float]] = {}
        for r in factorial:
            cells.setdefault(str(r["config"][ck]), []).append(r["mean_auroc"])
        if len(cells) > 1:
            main[factor] = {lv: {"mean_of_mean_auroc": float(np.mean(v)), "best": float(np.max(v)), "cells": len(v)}
                            for lv, v in cells.items()}
    return {"from_paper_config": one_at_a_time(base), "from_selected": one_at_a_time(selected),
            "main_effects": main}


def _diagnostics(store: CSMStore, setup: Setup, splits: dict[str, Split]) -> dict:
    """Softmax saturation (fp32 p_max == 1, where a naive float32 predicted-class cotangent loses its
    −(1 − p_k̂) term) and mean features per set and family."""
    out: dict = {"saturated_fraction": {}, "mean_features": {}}
    keys = ["fit"] + (["heldout"] if ("plain", "heldout") in store.data else []) + \
           [f"{sp.name}/{k}" for sp in splits.values() for k in sp.sets]
    for key in keys:
        d = store.data.get(("plain", key))
        if d is None or len(d["logits"]) == 0:
            continue
        p = torch.softmax(d["logits"].float(), dim=1).amax(dim=1)
        out["saturated_fraction"][key] = round(float((p == 1.0).float().mean()), 4)
    for fam in setup.families:
        out["mean_features"][fam] = {}
        for key in keys:
            if (fam, key) in store.data and len(store.data[(fam, key)]["logits"]):
                f = store.features(fam, key)
                out["mean_features"][fam][key] = [round(float(v), 4) for v in f.mean(dim=0)]
    return out


def _save_arrays(path: Path, scores, store: CSMStore, splits: dict[str, Split], setup: Setup) -> None:
    """Scores behind the figures: ROC (test), box plots (validation), example CSMs (test)."""
    arrays = {}
    for m in ("gga", "msp", "gga_selected", "neg_s1_mean", "mahalanobis"):
        for k, v in scores[m]["test"].items():
            arrays[f"score|{m}|test|{k}"] = v.astype(np.float32)
    for k in splits["val"].sets:
        d = store.data[("plain", f"val/{k}")]
        arrays[f"box|s1_mean|{k}"] = store.features("plain", f"val/{k}")[:, 0].numpy().astype(np.float32)
        arrays[f"box|softmax|{k}"] = torch.softmax(d["logits"].float(), 1).amax(1).numpy().astype(np.float32)
        arrays[f"box|margin|{k}"] = logit_margin(d["logits"]).numpy().astype(np.float32)
    for k in ["clean", *setup.ood_sets, "pgd", "rotation", "t_sce", "csa"]:
        sp = splits["test"]
        if k not in sp.sets or len(sp.sets[k]) == 0:
            continue
        d = store.data[("plain", f"test/{k}")]
        cls = d["classes"][0]
        inv = torch.argsort(cls)
        arrays[f"example|csm|{k}"] = d["csm"][0][inv][:, inv].numpy()  # rows/cols in class order 0..C-1
        arrays[f"example|image|{k}"] = sp.sets[k][0].numpy()
        arrays[f"example|pred|{k}"] = np.array(int(cls[0]))
    np.savez_compressed(path, **arrays)


def _clean_json(obj):
    if isinstance(obj, dict):
        return {str(k): _clean_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean_json(v) for v in obj]
    if isinstance(obj, float):
        return None if not math.isfinite(obj) else round(obj, 6)
    if isinstance(obj, np.floating | np.integer):
        return _clean_json(obj.item())
    return obj


if __name__ == "__main__":
    main()
