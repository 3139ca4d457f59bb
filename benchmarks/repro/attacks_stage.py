"""The evaluation splits ("val", "test"): clean inputs, OOD sets and successful attacks.

The attacks dominate the reproduction's runtime, so a split can be kept on disk and read
back (``--cache-dir``; ``python -m benchmarks.splits`` builds the caches alone): a cache
is used only when its key (data set, split, seed, quick mode, every size) matches.

The misclassified clean images are not part of the cache: :func:`add_misclassified`
derives them from the split's clean sources and the model, for a built split and a
cached one alike.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks import attacks as A
from benchmarks.repro.setup import Log, Setup, Sizes, Split, _chunks, _gen, _predict


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



def add_misclassified(setup: Setup, sp: Split) -> Split:
    """Add the set ``misclassified``: the split's clean source images the model gets wrong
    (deterministic from ``setup.val_src`` / ``setup.test_src`` and the model), with their
    labels in ``sp.misclassified_y``. Checks that the split's clean counts agree."""
    x, y = setup.val_src if sp.name == "val" else setup.test_src
    wrong = _predict(setup.model, x).argmax(1) != y
    if sp.counts["clean_total"] != len(y) or sp.counts["clean_correct"] != int((~wrong).sum()):
        raise ValueError(f"split {sp.name!r}: {sp.counts['clean_correct']} of {sp.counts['clean_total']} clean "
                         f"images correct, but the model gets {int((~wrong).sum())} of {len(y)} right now: a cache "
                         "from another model? Rebuild it")
    sp.sets["misclassified"] = x[wrong]
    sp.misclassified_y = y[wrong]
    sp.counts["misclassified"] = int(wrong.sum())
    return sp


# ------------------------------------------------------------------------------ cache


def cache_paths(cache_dir: Path, dataset: str, split: str) -> tuple[Path, Path]:
    return Path(cache_dir) / f"{dataset}_{split}.pt", Path(cache_dir) / f"{dataset}_{split}.json"


def save_split(sp: Split, cache_dir: Path, dataset: str, key: dict) -> None:
    """Write the split (without ``misclassified``, which is derived) as a flat dict of tensors + a JSON."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tensors, meta = cache_paths(cache_dir, dataset, sp.name)
    flat = {f"set/{k}": v.contiguous() for k, v in sp.sets.items() if k != "misclassified"}
    flat["clean_y"] = sp.clean_y
    torch.save(flat, tensors)
    counts = {k: v for k, v in sp.counts.items() if k != "misclassified"}
    meta.write_text(json.dumps({"key": key, "attacks": sp.attacks, "counts": counts}, indent=1) + "\n")


def load_split(cache_dir: Path, dataset: str, name: str, key: dict) -> Split | None:
    """The cached split, or None when there is none or it was built with other sizes/seed."""
    tensors, meta = cache_paths(cache_dir, dataset, name)
    if not tensors.exists() or not meta.exists():
        return None
    info = json.loads(meta.read_text())
    if info["key"] != key:
        return None
    flat = torch.load(tensors, weights_only=True)
    sp = Split(name)
    sp.sets = {k.removeprefix("set/"): v for k, v in flat.items() if k.startswith("set/")}
    sp.clean_y = flat["clean_y"]
    sp.attacks, sp.counts = info["attacks"], info["counts"]
    return sp


def split_key(args, sizes: Sizes, name: str) -> dict:
    return {"dataset": args.dataset, "split": name, "seed": args.seed, "quick": bool(args.quick),
            "sizes": asdict(sizes)}


def get_split(setup: Setup, name: str, sizes: Sizes, args, log: Log, cache_dir: Path | None) -> Split:
    """The split from ``cache_dir`` when a cache with a matching key is there, else built (and saved
    there when ``cache_dir`` is given); ``misclassified`` added either way. ``sp.cache`` says which."""
    key = split_key(args, sizes, name)
    sp = load_split(cache_dir, args.dataset, name, key) if cache_dir is not None else None
    if sp is not None:
        log.info(f"{name}: read from {cache_paths(cache_dir, args.dataset, name)[0]}")
        sp.cache = "read"
    else:
        sp = build_split(setup, name, sizes, args, log)
        sp.cache = "built"
        if cache_dir is not None:
            save_split(sp, cache_dir, args.dataset, key)
            sp.cache = "built and saved"
    return add_misclassified(setup, sp)
