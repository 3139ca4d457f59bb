"""The sets of ``gga-eval``: one ``.npz`` each, read and validated against the model.

``x`` (n, *input_shape) finite numbers, scaled as the model takes them; for the clean set
optionally ``y`` (n,) integer class indices in 0..n_classes-1. ``max_samples`` keeps the
first samples; every error is a :class:`UsageError` naming the file and what is expected.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.evaluation.errors import UsageError

CLEAN = "clean"  # the name of the in-distribution set (--in)


@dataclass
class DataSet:
    """One set as it is evaluated: its name (``clean`` or the ``--ood`` name), its file and its arrays."""

    name: str
    path: Path
    x: np.ndarray  # float32 (n, *input_shape)
    y: np.ndarray | None = None  # int64 (n,), the clean set only
    n_file: int = 0  # samples in the file, before --max-samples


def _read_npz(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "x" not in npz.files:
                raise UsageError(f"{path}: no array 'x' in the .npz (it holds {sorted(npz.files) or 'nothing'}); "
                                 "expected x (n, *input_shape)")
            return {k: npz[k] for k in keys if k in npz.files}
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - not an .npz, truncated, object arrays
        raise UsageError(f"{path}: cannot read it as an .npz of numeric arrays: {type(exc).__name__}: {exc}") from exc


def load_set(name: str, path: Path, input_shape: tuple[int, ...], n_classes: int, max_samples: int | None,
             with_labels: bool) -> DataSet:
    """One set, validated: x (n, *input_shape) finite numbers, y (n,) class indices when present."""
    arrays = _read_npz(path, ("x", "y") if with_labels else ("x",))
    x = arrays["x"]
    if x.dtype.kind not in "biuf":
        raise UsageError(f"{path}: x has dtype {x.dtype}; expected numbers (float32, scaled like the model's input)")
    if x.ndim != len(input_shape) + 1 or tuple(x.shape[1:]) != tuple(input_shape):
        hint = ""
        if x.ndim == 4 and len(input_shape) == 3 and tuple(x.shape[1:]) == (*input_shape[1:], input_shape[0]):
            hint = " (channels last? transpose to NCHW, e.g. detectors.datasets.load_cifar_npz for the CIFAR files)"
        raise UsageError(f"{path}: x has shape {tuple(x.shape)}; expected (n, {', '.join(map(str, input_shape))})"
                         f"{hint}")
    if len(x) == 0:
        raise UsageError(f"{path}: x holds no samples")
    n_file = len(x)
    if max_samples is not None:
        x = x[:max_samples]
    x = np.ascontiguousarray(x, dtype=np.float32)
    finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if not finite.all():
        raise UsageError(f"{path}: x[{int(np.flatnonzero(~finite)[0])}] holds NaN or infinite values")
    y = None
    if "y" in arrays:
        y = arrays["y"]
        if y.ndim != 1 or len(y) != n_file:
            raise UsageError(f"{path}: y has shape {tuple(y.shape)}; expected ({n_file},), one label per sample of x")
        if y.dtype.kind not in "biuf" or (y.dtype.kind == "f" and not np.all(np.isfinite(y) & (y == np.round(y)))):
            raise UsageError(f"{path}: y must hold integer class indices, got dtype {y.dtype}")
        if max_samples is not None:
            y = y[:max_samples]
        y = y.astype(np.int64)
        bad = np.flatnonzero((y < 0) | (y >= n_classes))
        if bad.size:
            raise UsageError(f"{path}: y[{int(bad[0])}] = {int(y[bad[0]])} is not a class of this model "
                             f"(0..{n_classes - 1})")
    return DataSet(name, path, x, y, n_file)
