"""Build the evaluation splits of the reproduction once and keep them on disk.

    python -m benchmarks.splits --dataset mnist --data-dir ../shared/data --split val test

The attacks dominate the reproduction's runtime (about 20 of its 32 minutes on 2 cores),
and the same inputs serve the reproduction, the composite's selection on validation
data and the ablations. This command runs ``benchmarks.reproduce.build_split`` with the
reproduction's own seeds and sizes and writes ``<cache>/<dataset>_<split>.pt`` (a flat
dict of tensors, read back with ``torch.load(weights_only=True)``) plus a JSON of the
attack records. ``benchmarks.reproduce --cache-dir`` reads them instead of attacking
again; a cache written with other sizes or another seed is refused.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks import reproduce as R

DEFAULT_CACHE = R.DEFAULT_OUT / "tmp"


def cache_paths(cache_dir: Path, dataset: str, split: str) -> tuple[Path, Path]:
    return cache_dir / f"{dataset}_{split}.pt", cache_dir / f"{dataset}_{split}.json"


def save_split(sp: R.Split, cache_dir: Path, dataset: str, key: dict) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    tensors, meta = cache_paths(cache_dir, dataset, sp.name)
    flat = {f"set/{k}": v.contiguous() for k, v in sp.sets.items()}
    flat["clean_y"] = sp.clean_y
    torch.save(flat, tensors)
    meta.write_text(json.dumps({"key": key, "attacks": sp.attacks, "counts": sp.counts}, indent=1) + "\n")


def load_split(cache_dir: Path, dataset: str, name: str, key: dict) -> R.Split | None:
    """The cached split, or None when there is none or it was built with other sizes/seed."""
    tensors, meta = cache_paths(cache_dir, dataset, name)
    if not tensors.exists() or not meta.exists():
        return None
    info = json.loads(meta.read_text())
    if info["key"] != key:
        return None
    flat = torch.load(tensors, weights_only=True)
    sp = R.Split(name)
    sp.sets = {k.removeprefix("set/"): v for k, v in flat.items() if k.startswith("set/")}
    sp.clean_y = flat["clean_y"]
    sp.attacks, sp.counts = info["attacks"], info["counts"]
    return sp


def split_key(args, sizes: R.Sizes, name: str) -> dict:
    return {"dataset": args.dataset, "split": name, "seed": args.seed, "quick": bool(args.quick),
            "sizes": asdict(sizes)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", nargs="+", choices=("val", "test"), default=["val", "test"])
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    own, rest = p.parse_known_args(argv)
    args = R.parse_args(rest)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = R.resolve_sizes(args)
    log = R.Log()
    setup = (R.load_mnist if args.dataset == "mnist" else R.load_cifar)(args, sizes)
    for prm in setup.model.parameters():
        prm.requires_grad_(False)
    for name in own.split:
        key = split_key(args, sizes, name)
        if load_split(own.cache_dir, args.dataset, name, key) is not None:
            log.info(f"{name}: cached already")
            continue
        log.stage(f"{args.dataset} {name} split")
        save_split(R.build_split(setup, name, sizes, args, log), own.cache_dir, args.dataset, key)
    log.finish()


if __name__ == "__main__":
    main()
