"""Build the evaluation splits of the reproduction once and keep them on disk.

    python -m benchmarks.splits --dataset mnist --data-dir ../shared/data --split val test

The attacks dominate the reproduction's runtime (about 20 of its 32 minutes on 2 cores),
and the same inputs serve the reproduction, the composite's selection on validation
data and the ablations. This command runs :func:`benchmarks.repro.attacks_stage.build_split`
with the reproduction's own seeds and sizes and writes ``<cache>/<dataset>_<split>.pt``
(a flat dict of tensors, read back with ``torch.load(weights_only=True)``) plus a JSON of
the attack records. ``benchmarks.reproduce --cache-dir`` reads them instead of attacking
again; a cache written with other sizes or another seed is refused. The cache functions
live in :mod:`benchmarks.repro.attacks_stage` (re-exported here).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.repro.attacks_stage import build_split, cache_paths, load_split, save_split, split_key
from benchmarks.repro.main import parse_args
from benchmarks.repro.setup import DEFAULT_OUT, Log, load_cifar, load_mnist, resolve_sizes

DEFAULT_CACHE = DEFAULT_OUT / "tmp"

__all__ = ["DEFAULT_CACHE", "cache_paths", "load_split", "main", "save_split", "split_key"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", nargs="+", choices=("val", "test"), default=["val", "test"])
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    own, rest = p.parse_known_args(argv)
    args = parse_args(rest)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = resolve_sizes(args)
    log = Log()
    setup = (load_mnist if args.dataset == "mnist" else load_cifar)(args, sizes)
    for prm in setup.model.parameters():
        prm.requires_grad_(False)
    for name in own.split:
        key = split_key(args, sizes, name)
        if load_split(own.cache_dir, args.dataset, name, key) is not None:
            log.info(f"{name}: cached already")
            continue
        log.stage(f"{args.dataset} {name} split")
        save_split(build_split(setup, name, sizes, args, log), own.cache_dir, args.dataset, key)
    log.finish()


if __name__ == "__main__":
    main()
