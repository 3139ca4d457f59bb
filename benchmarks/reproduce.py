"""Reproduce the paper's Tables 1–3 (Schwinn et al., UAI 2021), find what drives GGA, and
measure the composite detector against it and every baseline.

    python -m benchmarks.reproduce --dataset mnist --data-dir ../shared/data [--quick] [--cache-dir DIR]
    python -m benchmarks.reproduce --dataset cifar10 --data-dir ../shared/data --n-test 500

The entry point; the pipeline lives in :mod:`benchmarks.repro`, one module per stage
(setup, attacks_stage, csms, methods, validation, composite_stage, evaluate, output,
main), whose package docstring states the protocol. The names below are re-exported for
the scripts that build on the reproduction (``benchmarks.splits``,
``benchmarks.select_composite``) and for the tests.
"""

from __future__ import annotations

from benchmarks.repro.attacks_stage import add_misclassified, build_split, get_split, load_split, save_split, split_key
from benchmarks.repro.csms import FAMILY_TEXT, CSMStore, default_families, family_csms, library_cotangents_precise
from benchmarks.repro.evaluate import evaluate, misclassification, val_summary
from benchmarks.repro.main import main, parse_args
from benchmarks.repro.output import _clean_json
from benchmarks.repro.setup import (
    ADAPTIVE,
    ATTACK_SETS,
    DEFAULT_OUT,
    FULL,
    QUICK,
    REPO,
    TABLE1,
    VAL_TYPES,
    Log,
    Setup,
    Sizes,
    Split,
    load_cifar,
    load_mnist,
    machine_info,
    resolve_sizes,
)
from detectors.signals import logit_margin

__all__ = [
    "ADAPTIVE", "ATTACK_SETS", "CSMStore", "DEFAULT_OUT", "FAMILY_TEXT", "FULL", "QUICK", "REPO", "TABLE1",
    "VAL_TYPES", "Log", "Setup", "Sizes", "Split", "_clean_json", "add_misclassified", "build_split",
    "default_families", "evaluate", "family_csms", "get_split", "library_cotangents_precise", "load_cifar",
    "load_mnist", "load_split", "logit_margin", "machine_info", "main", "misclassification", "parse_args",
    "resolve_sizes", "save_split", "split_key", "val_summary",
]

if __name__ == "__main__":
    main()
