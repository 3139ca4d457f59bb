"""Train the reference MNIST CNN with the paper's recipe and write it as safetensors.

    python -m detectors.zoo.train_mnist --data-dir ../shared/data/mnist --out service/default_model

Recipe (paper section 4.2): SGD with Nesterov momentum 0.9, batch 128, lr 0.1 divided
by 5 at 30%, 60% and 80% of 10 epochs, 10% of the training set held out for
validation. Deviation: the learning rate ramps up linearly over the first
``--warmup-steps`` steps, because a plain conv net of this shape without batch norm
can diverge at lr 0.1 from the first step. The deviation is recorded in the model card.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from detectors.datasets import _find, load_idx_split, sha256_files
from detectors.zoo.mnist_cnn import MnistCNN

CLASS_NAMES = [str(i) for i in range(10)]


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    frac = step / total
    lr = base / 5 ** sum(frac >= m for m in (0.3, 0.6, 0.8))
    if step < warmup:
        lr *= (step + 1) / warmup
    return lr


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += (model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item()
    return correct / len(x)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, required=True, help="folder with the MNIST IDX files")
    p.add_argument("--out", type=Path, required=True, help="output folder (model.safetensors, model_card.json)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--max-steps", type=int, default=0, help="stop early after this many steps (trials only)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    x_all, y_all = load_idx_split(args.data_dir, "train")
    x_test, y_test = load_idx_split(args.data_dir, "t10k")
    perm = np.random.default_rng(args.seed).permutation(len(x_all))
    n_val = len(x_all) // 10
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    x_tr, y_tr = torch.from_numpy(x_all[train_idx]), torch.from_numpy(y_all[train_idx])
    x_val, y_val = torch.from_numpy(x_all[val_idx]), torch.from_numpy(y_all[val_idx])
    x_te, y_te = torch.from_numpy(x_test), torch.from_numpy(y_test)

    model = MnistCNN()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True)
    steps_per_epoch = math.ceil(len(x_tr) / args.batch_size)
    total = steps_per_epoch * args.epochs
    gen = torch.Generator().manual_seed(args.seed)
    step, t0 = 0, time.time()
    history = []
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x_tr), generator=gen)
        running = 0.0
        for b in range(steps_per_epoch):
            idx = order[b * args.batch_size:(b + 1) * args.batch_size]
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, args.lr, args.warmup_steps)
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += loss.item()
            step += 1
            if step % 100 == 0:
                print(f"epoch {epoch + 1} step {step}/{total} loss {running / (b + 1):.4f} "
                      f"lr {opt.param_groups[0]['lr']:.4f} {time.time() - t0:.0f}s", flush=True)
            if args.max_steps and step >= args.max_steps:
                break
        val_acc = accuracy(model, x_val, y_val)
        history.append({"epoch": epoch + 1, "train_loss": running / (b + 1), "val_accuracy": val_acc})
        print(f"epoch {epoch + 1}: val accuracy {val_acc:.4f}", flush=True)
        if args.max_steps and step >= args.max_steps:
            break

    test_acc = accuracy(model, x_te, y_te)
    print(f"test accuracy {test_acc:.4f} after {time.time() - t0:.0f}s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    model.eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.out / "model.safetensors"))
    files = [_find(args.data_dir, f"{s}-{k}") for s in ("train", "t10k")
             for k in ("images-idx3-ubyte", "labels-idx1-ubyte")]
    card = {
        "name": "mnist_cnn",
        "architecture": "mnist_cnn",
        "description": "The paper's MNIST CNN (4 conv 32/64/128/128, FC 100, FC 10, ReLU).",
        "input_shape": list(MnistCNN.input_shape),
        "input_dtype": "float32",
        "class_names": CLASS_NAMES,
        "preprocessing": "grey-scale 28x28 pixels divided by 255 (range [0, 1]); no mean/std normalisation",
        "test_accuracy": test_acc,
        "validation_accuracy": history[-1]["val_accuracy"],
        "history": history,
        "seed": args.seed,
        "recipe": {
            "optimizer": "SGD, Nesterov momentum 0.9", "batch_size": args.batch_size, "lr": args.lr,
            "schedule": "divide by 5 at 30/60/80% of training", "epochs": args.epochs,
            "validation_split": "10% of train (seeded permutation), not trained on",
            "warmup_steps": args.warmup_steps,
        },
        "deviation_from_paper": (
            f"linear learning-rate warm-up over the first {args.warmup_steps} steps "
            "(the paper starts at 0.1; without warm-up this network can diverge)"
        ) if args.warmup_steps else None,
        "training_data_sha256": sha256_files(files),
        "training_seconds": round(time.time() - t0, 1),
        "torch_version": torch.__version__,
    }
    (args.out / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
    print(json.dumps({"test_accuracy": test_acc}))


if __name__ == "__main__":
    main()
