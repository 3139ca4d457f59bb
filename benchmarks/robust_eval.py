"""Checks an adversarially trained MNIST model must pass before its robustness is believed.

    python -m benchmarks.robust_eval --weights detectors/zoo/weights/robust_mnist \\
        --data-dir ../shared/data/mnist --n 500 --steps 100 --out report.json

On a seeded random subset of MNIST t10k (``--n`` digits; never used in training), at
L-inf ``--eps`` (0.3), with the attacks of :mod:`benchmarks.robust_attacks`:

- ``clean``: clean accuracy of the robust model on all of t10k, and the clean
  disagreement rate with the served model (the price of a disagreement flag);
- ``ce``: CE PGD from a random start, fixed step 2.5 eps / steps (the conventional figure);
- ``cw``: CW-margin PGD from the clean input (cosine step schedule);
- ``mt``: multi-targeted margin PGD, one run per wrong class, from the clean input;
- ``mt_restarts``: the same with ``--restarts`` runs per class (the first from x);
- ``sweep``: CW-margin accuracy at each of ``--sweep-eps``: it must fall with eps and
  reach about 0 (at eps 0.5 every digit can be moved to the all-0.5 image);
- ``served``: the served model under CW from the clean input (an undefended model: ~0);
- ``joint``: over the digits the served model classifies correctly, the fraction
  "held": no run of the joint targeted attack (every t != y, each of ``--joint-losses``,
  ``--restarts`` runs) found a point where the served and the robust model say the same
  wrong class. An upper bound on the robust detection a disagreement check can give.

A robust accuracy under ``mt`` far below ``ce`` is gradient masking: the report carries
the gap. Robust accuracy = fraction of the n digits that are correctly classified and
not broken by the attack.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from benchmarks.robust_attacks import attack_broken, joint_held, multitargeted_broken
from detectors.datasets import load_idx_split
from detectors.zoo.mnist_cnn import MnistCNN
from detectors.zoo.robust_mnist_cnn import RobustMnistCNN

PARTS = ("clean", "ce", "cw", "mt", "mt_restarts", "sweep", "served", "joint")


def load_weights(model: torch.nn.Module, path: Path) -> torch.nn.Module:
    if not path.exists():
        raise FileNotFoundError(f"weights not found: {path} (expected a safetensors file)")
    model.load_state_dict(load_file(str(path)))
    return model.eval().requires_grad_(False)


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    return torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])


def evaluate(robust: torch.nn.Module, served: torch.nn.Module, x_test: torch.Tensor, y_test: torch.Tensor, *,
             n: int, eps: float, steps: int, restarts: int, sweep_eps: list[float], joint_losses: list[str],
             parts: list[str], seed: int = 0, log=print) -> dict:
    """Run the selected ``parts`` and return the report dict (keys named after the parts)."""
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown parts {unknown}; choose from {PARTS}")
    idx = torch.from_numpy(np.random.default_rng(seed).permutation(len(x_test))[:n])
    x, y = x_test[idx], y_test[idx]
    gen = torch.Generator().manual_seed(seed)
    clean_ok = predict(robust, x) == y
    rep: dict = {"n": len(x), "eps": eps, "steps": steps, "restarts": restarts, "seed": seed,
                 "subset_clean_accuracy": clean_ok.float().mean().item()}

    def robust_acc(broken: torch.Tensor) -> float:
        return (clean_ok & ~broken).float().mean().item()

    def timed(name: str, fn):
        t0 = time.time()
        value = fn()
        rep.setdefault("seconds", {})[name] = round(time.time() - t0, 1)
        log(f"{name}: {value} ({rep['seconds'][name]} s)")
        return value

    if "clean" in parts:
        pr, ps = predict(robust, x_test), predict(served, x_test)
        rep["clean"] = {
            "robust_accuracy_t10k": (pr == y_test).float().mean().item(),
            "served_accuracy_t10k": (ps == y_test).float().mean().item(),
            "disagreement_rate_t10k": (pr != ps).float().mean().item(),
            "disagreement_rate_served_correct": (pr != ps)[ps == y_test].float().mean().item(),
            "disagreement_rate_served_wrong": (pr != ps)[ps != y_test].float().mean().item(),
        }
        log(f"clean: {rep['clean']}")
    if "ce" in parts:
        rep["ce_pgd_random_start"] = timed("ce", lambda: robust_acc(attack_broken(
            robust, x, y, loss="ce", eps=eps, steps=steps, step_size=2.5 * eps / steps, random_first=True,
            generator=gen)))
    if "cw" in parts:
        rep["cw_pgd_clean_start"] = timed("cw", lambda: robust_acc(attack_broken(
            robust, x, y, loss="cw", eps=eps, steps=steps, generator=gen)))
    if "mt" in parts:
        rep["multitargeted"] = timed("mt", lambda: robust_acc(multitargeted_broken(
            robust, x, y, eps=eps, steps=steps, generator=gen)))
    if "mt_restarts" in parts:
        rep["multitargeted_restarts"] = timed("mt_restarts", lambda: robust_acc(multitargeted_broken(
            robust, x, y, eps=eps, steps=steps, restarts=restarts, generator=gen)))
    if "ce" in parts and "mt" in parts:
        rep["masking_gap_ce_minus_mt"] = rep["ce_pgd_random_start"] - rep["multitargeted"]
    if "sweep" in parts:
        rep["cw_sweep"] = {str(e): timed(f"cw eps {e}", lambda e=e: robust_acc(attack_broken(
            robust, x, y, loss="cw", eps=e, steps=steps, generator=gen))) for e in sweep_eps}
    if "served" in parts:
        served_ok = predict(served, x) == y
        broken = attack_broken(served, x, y, loss="cw", eps=eps, steps=steps, generator=gen)
        rep["served_cw_robust_accuracy"] = (served_ok & ~broken).float().mean().item()
        log(f"served under cw: {rep['served_cw_robust_accuracy']}")
    if "joint" in parts:
        ok = predict(served, x) == y
        xs, ys = x[ok], y[ok]
        t0 = time.time()
        held = joint_held([served, robust], xs, ys, eps=eps, steps=steps, restarts=restarts, losses=joint_losses,
                          generator=gen)
        rep.setdefault("seconds", {})["joint"] = round(time.time() - t0, 1)
        rep["joint"] = {"served_correct": int(ok.sum()), "held": int(held.sum()),
                        "held_fraction": held.float().mean().item(), "losses": joint_losses}
        log(f"joint: {rep['joint']}")
    return rep


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, required=True, help="folder with the robust model.safetensors")
    p.add_argument("--served", type=Path, default=Path("service/default_model/model.safetensors"))
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--eps", type=float, default=0.3)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--restarts", type=int, default=3)
    p.add_argument("--sweep-eps", default="0.1,0.2,0.3,0.4,0.5")
    p.add_argument("--joint-losses", default="min,sum")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    robust = load_weights(RobustMnistCNN(), args.weights / "model.safetensors")
    with safe_open(str(args.weights / "model.safetensors"), "pt") as f:
        step = (f.metadata() or {}).get("step")
    served = load_weights(MnistCNN(), args.served)
    x_te, y_te = load_idx_split(args.data_dir, "t10k")
    rep = evaluate(robust, served, torch.from_numpy(x_te), torch.from_numpy(y_te), n=args.n, eps=args.eps,
                   steps=args.steps, restarts=args.restarts,
                   sweep_eps=[float(e) for e in args.sweep_eps.split(",") if e],
                   joint_losses=[s for s in args.joint_losses.split(",") if s],
                   parts=[s for s in args.parts.split(",") if s], seed=args.seed,
                   log=lambda s: print(s, flush=True))
    rep["checkpoint_step"] = None if step is None else int(step)
    text = json.dumps(rep, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text, flush=True)


if __name__ == "__main__":
    main()
