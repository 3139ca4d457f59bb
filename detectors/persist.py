"""Loading any saved detector: the registry of kinds and :func:`load_detector`.

A saved detector is one folder (:mod:`detectors.storage`) whose JSON names its ``kind``.
:data:`DETECTORS` maps each kind to its class; :func:`load_detector` reads the kind and
hands the folder to that class's ``load`` (which checks the format version, the model
fingerprint and the state). A kind-specific ``load`` (``GGADetector.load``) refuses
another kind's folder and names this function instead.
"""

from __future__ import annotations

from pathlib import Path

import torch

from detectors.base import DetectorBase
from detectors.composite import CompositeDetector
from detectors.energy import Energy
from detectors.gga import GGADetector
from detectors.mahalanobis import Mahalanobis
from detectors.msp import MSP
from detectors.odin import ODIN
from detectors.storage import (
    META_FILE,
    TENSORS_FILE,
    FingerprintMismatchError,
    WrongDetectorKindError,
    detector_kind,
    read_meta,
    write_detector,
)

__all__ = ["DETECTORS", "META_FILE", "TENSORS_FILE", "FingerprintMismatchError", "WrongDetectorKindError",
           "detector_class", "detector_kind", "load_detector", "read_meta", "write_detector"]

DETECTORS: dict[str, type[DetectorBase]] = {
    cls.kind: cls for cls in (CompositeDetector, GGADetector, MSP, Energy, ODIN, Mahalanobis)
}


def detector_class(kind: str) -> type[DetectorBase]:
    """The class registered for ``kind``; ValueError naming the known kinds otherwise."""
    try:
        return DETECTORS[kind]
    except KeyError:
        raise ValueError(f"unknown detector kind {kind!r} (known kinds: {', '.join(sorted(DETECTORS))})") from None


def load_detector(directory: str | Path, model: torch.nn.Module, **options) -> DetectorBase:
    """The saved detector in ``directory``, of whatever kind, for ``model``.

    ``options`` go to the kind's ``load``: ``strategy`` for GGA and the composite,
    ``feature_fn`` for Mahalanobis, ``check_fingerprint`` for any.
    """
    meta = read_meta(directory)
    try:
        cls = detector_class(detector_kind(meta))
    except ValueError as exc:
        raise ValueError(f"{directory}: {exc}") from None
    return cls.load(directory, model, **options)
