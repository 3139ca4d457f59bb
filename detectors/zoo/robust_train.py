"""PGD adversarial training of a small MNIST CNN, as a resumable job with checkpoints.

    python -m detectors.zoo.robust_train --data-dir ../shared/data/mnist \\
        --out detectors/zoo/weights/robust_mnist [--resume]

Recipe (Madry et al., ICLR 2018, with the usual MNIST remedies):

- every training batch is replaced by its L-inf PGD adversarial: a uniform random start
  in the eps-ball, then k steps x <- clip_[0,1](Pi_eps(x + a * sign(grad_x CE(f(x), y))))
  with a = ``step_scale`` * eps / k (2.5 eps / k: the attack can cross the ball from any
  start), and the loss is CE(f(x_adv), y);
- eps ramps linearly from eps / R to eps over the first R = ``ramp_epochs`` epochs of
  steps (at eps 0.3 from the first step, PGD training of MNIST often stays at chance);
- Adam, lr ``lr`` divided by 10 at 70% and again at 90% of ``epochs``;
- 5,000 images of the training set (seeded permutation) are held out for validation and
  never trained on; each epoch reports clean accuracy on them and accuracy under the
  training attack (at the full eps) on the first ``val_attack_n``.

Exact resumption: every random draw is a function of (seed, epoch) or (seed, step) (the
epoch's batch order, each step's random start), so a checkpoint needs no RNG state, only
the weights, the optimizer state and the position (epoch, batch). A checkpoint is three
files written to temporary names and moved into place (``os.replace``): model.safetensors
(the weights, servable alone), optimizer.safetensors (Adam's moments) and progress.json
(position, configuration, per-epoch history); all three carry the step and a resume
refuses files whose steps differ. With one torch thread the resumed run is bit-identical
to an uninterrupted one (tests/detectors/test_robust_train.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from detectors.datasets import _find, load_idx_split, sha256_files
from detectors.zoo.robust_mnist_cnn import RobustMnistCNN

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
PROGRESS_FILE = "progress.json"
CARD_FILE = "model_card.json"
_EPOCH_SEED = 1_000_003
_STEP_SEED = 10_000_019


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained weights; a resume must use the same values."""

    epochs: int = 20
    eps: float = 0.3
    pgd_steps: int = 10
    step_scale: float = 2.5
    ramp_epochs: float = 2.0
    lr: float = 1e-3
    batch_size: int = 128
    seed: int = 0
    val_attack_n: int = 1000

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.pgd_steps < 1 or self.batch_size < 1:
            raise ValueError(f"epochs, pgd_steps and batch_size must be >= 1, got {self}")
        if not 0.0 < self.eps <= 1.0:
            raise ValueError(f"eps must be in (0, 1] (pixels are in [0, 1]), got {self.eps}")
        if self.ramp_epochs < 0 or self.lr <= 0 or self.step_scale <= 0:
            raise ValueError(f"ramp_epochs must be >= 0, lr and step_scale > 0, got {self}")


def pgd_linf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int, step_size: float,
             generator: torch.Generator | None, random_start: bool = True) -> torch.Tensor:
    """L-inf PGD on cross-entropy, the training attack; returns the last iterate, detached.

    x0 = clip_[0,1](x + U(-eps, eps)) (``random_start``) or x; then ``steps`` times
    x <- clip_[0,1](clamp(x + step_size * sign(grad_x CE(f(x), y)), x - eps, x + eps)).
    Every iterate lies in the ball ||x' - x||_inf <= eps and in [0, 1]. The model's
    parameter gradients are left untouched (gradients are taken w.r.t. the input only).
    """
    if x.dim() != 4 or y.shape != (x.shape[0],):
        raise ValueError(f"x must be [B, C, H, W] and y [B], got {tuple(x.shape)} and {tuple(y.shape)}")
    lo, hi = (x - eps).clamp(min=0.0), (x + eps).clamp(max=1.0)
    if random_start:
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype) * (2 * eps) - eps
        x_adv = (x + noise).clamp(0.0, 1.0)
    else:
        x_adv = x.clone()
    with torch.enable_grad():
        for _ in range(steps):
            xa = x_adv.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(model(xa), y, reduction="sum"), xa)
            x_adv = torch.minimum(torch.maximum(xa.detach() + step_size * g.sign(), lo), hi)
    return x_adv.detach()


def eps_at(step: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """eps * min(1, (step + 1) / (ramp_epochs * steps_per_epoch)); eps itself without a ramp."""
    ramp = cfg.ramp_epochs * steps_per_epoch
    return cfg.eps if ramp <= 0 else cfg.eps * min(1.0, (step + 1) / ramp)


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """lr / 10 ** (number of the milestones 70%, 90% of ``total`` steps already reached)."""
    frac = step / total
    return cfg.lr / 10 ** sum(frac >= m for m in (0.7, 0.9))


@torch.no_grad()
def clean_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    correct = sum((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item() for i in range(0, len(x), batch))
    return correct / max(len(x), 1)


def pgd_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, batch: int = 500) -> float:
    """Accuracy under the training attack at the full eps (fixed seed, not the training stream)."""
    gen = torch.Generator().manual_seed(cfg.seed + 7)
    a = cfg.step_scale * cfg.eps / cfg.pgd_steps
    correct = 0
    for i in range(0, len(x), batch):
        xa = pgd_linf(model, x[i:i + batch], y[i:i + batch], eps=cfg.eps, steps=cfg.pgd_steps, step_size=a,
                      generator=gen)
        correct += clean_accuracy(model, xa, y[i:i + batch]) * len(xa)
    return correct / max(len(x), 1)


# --------------------------------------------------------------------------- checkpoints


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(out: Path, model: nn.Module, opt: torch.optim.Optimizer, progress: dict) -> None:
    """Write the three checkpoint files (each atomically); all carry ``progress['step']``."""
    out.mkdir(parents=True, exist_ok=True)
    step = str(progress["step"])
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    _atomic_write(out / MODEL_FILE, lambda p: save_file(weights, str(p), metadata={"step": step}))
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for name, value in st.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{idx}.{name}"] = t.detach().contiguous()
    meta = {"step": step, "param_groups": json.dumps(sd["param_groups"])}
    _atomic_write(out / OPTIMIZER_FILE, lambda p: save_file(tensors, str(p), metadata=meta))
    _atomic_write(out / PROGRESS_FILE, lambda p: p.write_text(json.dumps(progress, indent=1) + "\n"))


def load_checkpoint(out: Path, model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Restore weights and optimizer state from ``out``; return progress.json's contents."""
    for name in (MODEL_FILE, OPTIMIZER_FILE, PROGRESS_FILE):
        if not (out / name).exists():
            raise FileNotFoundError(f"--resume needs {name} in {out}; it is missing")
    progress = json.loads((out / PROGRESS_FILE).read_text())
    with safe_open(str(out / MODEL_FILE), "pt") as f:
        model_step = f.metadata().get("step")
        weights = {k: f.get_tensor(k) for k in f.keys()}
    with safe_open(str(out / OPTIMIZER_FILE), "pt") as f:
        meta = f.metadata()
        flat = {k: f.get_tensor(k) for k in f.keys()}
    steps = {MODEL_FILE: model_step, OPTIMIZER_FILE: meta.get("step"), PROGRESS_FILE: str(progress["step"])}
    if len(set(steps.values())) != 1:
        raise ValueError(f"checkpoint files in {out} are from different steps: {steps}")
    model.load_state_dict(weights)
    state: dict[int, dict] = {}
    for key, t in flat.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = t
    opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    return progress


# --------------------------------------------------------------------------- training


def train(model: nn.Module, x_tr: torch.Tensor, y_tr: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
          cfg: TrainConfig, out: Path, *, resume: bool = False, stop_at_step: int | None = None,
          checkpoint_seconds: float = 180.0, log: Callable[[str], None] = print) -> dict:
    """Run (or continue) PGD training; checkpoint every ``checkpoint_seconds`` and at each epoch end.

    ``stop_at_step`` ends the run after that many optimizer steps in all (a checkpoint is
    written), as an interruption would. Returns the final progress dict.
    """
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    spe = math.ceil(len(x_tr) / cfg.batch_size)
    total = spe * cfg.epochs
    config = dataclasses.asdict(cfg)
    if resume:
        progress = load_checkpoint(out, model, opt)
        if progress["config"] != config:
            raise ValueError(f"--resume with another configuration: checkpoint {progress['config']}, now {config}")
        log(f"resumed at epoch {progress['epoch'] + 1} batch {progress['batch']} (step {progress['step']})")
    else:
        progress = {"config": config, "step": 0, "epoch": 0, "batch": 0, "loss_sum": 0.0, "correct": 0,
                    "seen": 0, "elapsed_s": 0.0, "history": []}
    t_start, elapsed0 = time.time(), progress["elapsed_s"]
    last_ckpt = time.time()
    a_scale = cfg.step_scale / cfg.pgd_steps

    def checkpoint() -> None:
        progress["elapsed_s"] = round(elapsed0 + time.time() - t_start, 1)
        save_checkpoint(out, model, opt, progress)

    while progress["epoch"] < cfg.epochs:
        epoch = progress["epoch"]
        order = torch.randperm(len(x_tr), generator=torch.Generator().manual_seed(cfg.seed * _EPOCH_SEED + epoch))
        for b in range(progress["batch"], spe):
            if stop_at_step is not None and progress["step"] >= stop_at_step:
                checkpoint()
                return progress
            step = progress["step"]
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            xb, yb = x_tr[idx], y_tr[idx]
            eps = eps_at(step, spe, cfg)
            gen = torch.Generator().manual_seed(cfg.seed * _STEP_SEED + step)
            xa = pgd_linf(model, xb, yb, eps=eps, steps=cfg.pgd_steps, step_size=a_scale * eps, generator=gen)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, cfg)
            logits = model(xa)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            progress["loss_sum"] += loss.item() * len(yb)
            progress["correct"] += int((logits.argmax(1) == yb).sum().item())
            progress["seen"] += len(yb)
            progress["step"] = step + 1
            progress["batch"] = b + 1
            if (step + 1) % 50 == 0:
                log(f"epoch {epoch + 1} step {step + 1}/{total} eps {eps:.3f} lr {g['lr']:.1e} "
                    f"adv loss {progress['loss_sum'] / progress['seen']:.4f} "
                    f"adv acc {progress['correct'] / progress['seen']:.4f} "
                    f"{elapsed0 + time.time() - t_start:.0f}s")
            if time.time() - last_ckpt >= checkpoint_seconds:
                checkpoint()
                last_ckpt = time.time()
        n_att = min(cfg.val_attack_n, len(x_val))
        record = {
            "epoch": epoch + 1, "step": progress["step"], "eps": eps_at(progress["step"] - 1, spe, cfg),
            "train_adv_loss": progress["loss_sum"] / max(progress["seen"], 1),
            "train_adv_accuracy": progress["correct"] / max(progress["seen"], 1),
            "val_clean_accuracy": clean_accuracy(model, x_val, y_val),
            "val_pgd_accuracy": pgd_accuracy(model, x_val[:n_att], y_val[:n_att], cfg),
            "elapsed_s": round(elapsed0 + time.time() - t_start, 1),
        }
        progress["history"].append(record)
        progress.update(epoch=epoch + 1, batch=0, loss_sum=0.0, correct=0, seen=0)
        checkpoint()
        last_ckpt = time.time()
        log("EPOCH " + json.dumps(record))
    return progress


def split_train(x_all: np.ndarray, y_all: np.ndarray, seed: int, n_val: int = 5000):
    """(x_tr, y_tr, x_val, y_val) tensors: ``n_val`` images held out by a seeded permutation."""
    perm = np.random.default_rng(seed).permutation(len(x_all))
    val, tr = perm[:n_val], perm[n_val:]
    t = torch.from_numpy
    return t(x_all[tr]), t(y_all[tr]), t(x_all[val]), t(y_all[val])


def write_card(out: Path, progress: dict, data_dir: Path, test_accuracy: float) -> None:
    files = [_find(data_dir, f"{s}-{k}") for s in ("train", "t10k") for k in ("images-idx3-ubyte", "labels-idx1-ubyte")]
    card = {
        "name": "robust_mnist_cnn",
        "architecture": "robust_mnist_cnn",
        "description": "Strided CNN (conv 32/64/64 stride 2, FC 256, FC 10), L-inf PGD adversarial training.",
        "input_shape": list(RobustMnistCNN.input_shape),
        "preprocessing": "grey-scale 28x28 pixels divided by 255 (range [0, 1]); no mean/std normalisation",
        "test_clean_accuracy": test_accuracy,
        "recipe": progress["config"],
        "history": progress["history"],
        "training_data_sha256": sha256_files(files),
        "torch_version": torch.__version__,
        "note": "robust accuracy claims live in benchmarks/robust_eval.py's reports, not here",
    }
    (out / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, required=True, help="folder with the MNIST IDX files")
    p.add_argument("--out", type=Path, required=True, help="checkpoint folder")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps the run reproducible)")
    p.add_argument("--checkpoint-seconds", type=float, default=180.0)
    p.add_argument("--stop-at-step", type=int, default=None, help="stop after this many steps in all (timing)")
    for f in dataclasses.fields(TrainConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    if not args.resume and (args.out / PROGRESS_FILE).exists():
        raise FileExistsError(f"{args.out} already holds a checkpoint; pass --resume or choose another --out")
    x_all, y_all = load_idx_split(args.data_dir, "train")
    x_tr, y_tr, x_val, y_val = split_train(x_all, y_all, cfg.seed)
    torch.manual_seed(cfg.seed)
    model = RobustMnistCNN()
    progress = train(model, x_tr, y_tr, x_val, y_val, cfg, args.out, resume=args.resume,
                     stop_at_step=args.stop_at_step, checkpoint_seconds=args.checkpoint_seconds,
                     log=lambda s: print(s, flush=True))
    if progress["epoch"] >= cfg.epochs:
        x_te, y_te = load_idx_split(args.data_dir, "t10k")
        acc = clean_accuracy(model, torch.from_numpy(x_te), torch.from_numpy(y_te))
        write_card(args.out, progress, args.data_dir, acc)
        print(json.dumps({"test_clean_accuracy": acc}), flush=True)


if __name__ == "__main__":
    main()
