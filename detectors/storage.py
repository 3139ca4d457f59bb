"""The files of a saved detector: one folder, ``detector.safetensors`` + ``detector.json``.

The JSON says which detector it is (``"kind"``; folders written before kinds existed are
GGA), its format version, its configuration and for which weights it was fitted (the model
fingerprint, :func:`detectors.fingerprint.model_fingerprint`); the safetensors file holds
its fitted state (``state_dict()``). Which class reads a folder is
:func:`detectors.persist.load_detector`'s business.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from detectors.fingerprint import model_fingerprint

TENSORS_FILE = "detector.safetensors"
META_FILE = "detector.json"


class FingerprintMismatchError(ValueError):
    """The detector was fitted for a model with other weights."""


class WrongDetectorKindError(ValueError):
    """A kind-specific loader was given another kind's folder."""


def write_detector(directory: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write the two files into ``directory`` and fsync them; returns the folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / TENSORS_FILE))
    (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    for name in (TENSORS_FILE, META_FILE):
        os.chmod(directory / name, 0o644)  # readable by every replica and by a non-root image user
        fd = os.open(directory / name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return directory


def read_meta(directory: str | Path) -> dict:
    """The JSON of the saved detector in ``directory``; FileNotFoundError when either file is missing."""
    directory = Path(directory)
    meta_path, tensor_path = directory / META_FILE, directory / TENSORS_FILE
    if not meta_path.exists() or not tensor_path.exists():
        raise FileNotFoundError(f"{directory} holds no saved detector ({META_FILE} + {TENSORS_FILE})")
    meta = json.loads(meta_path.read_text())
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path} does not hold a JSON object")
    return meta


def read_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    """The fitted state saved in ``directory`` (CPU tensors)."""
    return load_file(str(Path(directory) / TENSORS_FILE))


def detector_kind(meta: dict) -> str:
    """The kind a saved detector's JSON declares (``"gga"`` when it declares none: the oldest folders)."""
    return str(meta.get("kind", "gga"))


def check_fingerprint(meta: dict, model: torch.nn.Module, directory: str | Path) -> None:
    """Raise :class:`FingerprintMismatchError` unless ``model`` has the weights the detector was fitted for."""
    actual = model_fingerprint(model)
    expected = str(meta.get("model_fingerprint"))
    if expected != actual:
        raise FingerprintMismatchError(
            f"the detector in {directory} was fitted for another model (weights fingerprint "
            f"{expected[:12]}…, this model has {actual[:12]}…); fit a new detector for this model"
        )
